"""Aggregate the variants of a sweep: one table, plotly figures, and a self-contained HTML report.

Pure functions of registry rows; plotly is imported only when figures are built.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from llmops_jupyter.core.display import Table
from llmops_jupyter.core.errors import NotFoundError
from llmops_jupyter.core.files import atomic_write_text
from llmops_jupyter.registry import Registry


class Comparison:
    """The comparison of a sweep's variants: ``rows`` (dicts), ``table``, ``figures``; displays all in notebooks."""

    def __init__(self, sweep_id: str, rows: list[dict[str, Any]], params: list[str], metrics: list[str],
                 metric: str | None = None, report: Path | None = None, study: Any = None,
                 direction: str | None = None):
        self.sweep_id = sweep_id
        self.rows = rows
        self.params = params
        self.metrics = metrics
        self.metric = metric or (metrics[0] if metrics else None)
        self.report = report
        #: the Optuna study of an optuna sweep (its own figures are added), None for a grid
        self.study = study
        self.direction = direction
        self._figures: list[Any] | None = None

    @property
    def table(self) -> Table:
        cols = ["trial" if self.study is not None else "variant", "run", "status", *self.params, *self.metrics]
        body = [[r["index"], r["run_id"] or "", r["status"], *[_cell(r["params"].get(p)) for p in self.params],
                 *[r["metrics"].get(m) for m in self.metrics]] for r in self.rows]
        best = self.best()
        what = "trial" if self.study is not None else "variant"
        note = f"best {self.metric}: {what} {best['index']} ({best['run_id']})" if best else ""
        if self.report:
            note += ("; " if note else "") + f"report: {self.report}"
        return Table(cols, body, title=f"Sweep {self.sweep_id}: {len(self.rows)} {what}s", note=note)

    def best(self, metric: str | None = None, mode: str | None = None) -> dict[str, Any] | None:
        """Best variant by ``metric``: lowest for loss/perplexity-like names, else highest."""
        metric = metric or self.metric
        rows = [r for r in self.rows if metric and _num(r["metrics"].get(metric)) is not None
                and r["status"] != "pruned"]  # a pruned trial's last value is not a result
        if not rows:
            return None
        if mode is None and self.direction and metric == self.metric:
            mode = "min" if self.direction == "minimize" else "max"
        lower = mode == "min" or (mode is None and any(s in metric.lower() for s in ("loss", "ppl", "perplex",
                                                                                      "error", "latency")))
        return (min if lower else max)(rows, key=lambda r: r["metrics"][metric])

    @property
    def figures(self) -> list[Any]:
        if self._figures is None:
            self._figures = figures(self.rows, self.params, self.metrics, self.metric)
            if self.study is not None:
                from llmops_jupyter.pipelines.search import study_figures

                self._figures += study_figures(self.study)
        return self._figures

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([{"variant": r["index"], "run": r["run_id"], "status": r["status"], **r["params"],
                              **r["metrics"]} for r in self.rows])

    def __str__(self) -> str:
        return str(self.table)

    __repr__ = __str__

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.table)
        for fig in self.figures:
            display(fig)


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def compare_sweep(registry: Registry, sweep_ref: str, *, runs: list[str] | None = None, grid: list[str] | None = None,
                  variants: list[dict[str, Any]] | None = None, metrics: list[str] | None = None,
                  metric: str | None = None, study: Any = None) -> Comparison:
    """Rows for every pipeline run of a sweep (its children), with the grid parameters and final metrics.

    For an optuna sweep the rows are every trial of its study (resumed sweeps included), the parameters are the
    searched space and Optuna's own figures are added."""
    sweep = registry.get_run(sweep_ref)
    if sweep["stage"] != "sweep":
        raise NotFoundError(f"Run '{sweep['id']}' is a {sweep['stage']} run, not a sweep.",
                            fix="pass a sweep run id (`%llmops runs --stage sweep`)")
    sp = sweep["params"]
    if sp.get("search") == "optuna":
        return _compare_search(registry, sweep, metrics=metrics, metric=metric, study=study)
    grid = grid if grid is not None else list(sweep["params"].get("grid", {}))
    if runs is None:
        runs = [r["id"] for r in registry.child_runs(sweep["id"], "pipeline")]
    rows = []
    for run_id in runs:
        run = registry.get_run(run_id)
        params = run["params"].get("parameters", {})
        index = run["params"].get("variant")
        rows.append({"index": index if index is not None else len(rows), "run_id": run_id, "status": run["status"],
                     "params": {k: params.get(k) for k in grid}, "metrics": registry.metrics(run_id)})
    rows.sort(key=lambda r: r["index"])
    if metrics is None:
        seen: list[str] = []
        for r in rows:
            seen += [k for k in r["metrics"] if k not in seen]
        metrics = sorted(seen)
    return Comparison(sweep["id"], rows, grid, metrics, metric=metric)


def _compare_search(registry: Registry, sweep: dict[str, Any], *, metrics: list[str] | None, metric: str | None,
                    study: Any) -> Comparison:
    from llmops_jupyter.pipelines.search import load_study, trial_runs

    sp = sweep["params"]
    if study is None:
        study = load_study(sp["storage"], sp["study"])
    space = list(sp.get("space") or {})
    rows = []
    for t in trial_runs(study):
        if not t["run_id"]:
            continue
        try:
            run = registry.get_run(t["run_id"])
        except NotFoundError:  # a trial recorded in another registry
            continue
        rows.append({"index": t["trial"], "run_id": t["run_id"], "status": run["status"],
                     "params": {k: t["params"].get(k) for k in space}, "metrics": registry.metrics(t["run_id"])})
    rows.sort(key=lambda r: r["index"])
    if metrics is None:
        seen: list[str] = [sp["metric"]] if sp.get("metric") else []
        for r in rows:
            seen += [k for k in r["metrics"] if k not in seen]
        metrics = seen[:1] + sorted(seen[1:])
    return Comparison(sweep["id"], rows, space, metrics, metric=metric or sp.get("metric"), study=study,
                      direction=sp.get("direction"))


def figures(rows: list[dict[str, Any]], params: list[str], metrics: list[str], metric: str | None) -> list[Any]:
    """Parallel coordinates over parameters + metrics, and the chosen metric against each parameter."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    ok = [r for r in rows if r["metrics"]]
    if not ok or not metrics:
        return []
    metric = metric or metrics[0]
    dims = []
    for p in params:
        vals = [r["params"].get(p) for r in ok]
        nums = [_num(v) if not isinstance(v, bool) else None for v in vals]
        if all(n is not None for n in nums):
            dims.append({"label": p, "values": nums})
        else:  # categorical: positions with the values as tick labels
            cats = sorted({_label(v) for v in vals})
            dims.append({"label": p, "values": [cats.index(_label(v)) for v in vals],
                         "tickvals": list(range(len(cats))), "ticktext": cats})
    for m in metrics:
        dims.append({"label": m, "values": [_num(r["metrics"].get(m)) for r in ok]})
    color = [_num(r["metrics"].get(metric)) for r in ok]
    par = go.Figure(go.Parcoords(dimensions=dims, line={"color": color, "colorscale": "Viridis", "showscale": True,
                                                          "colorbar": {"title": metric}}))
    par.update_layout(title=f"Sweep: parameters and metrics (colour: {metric})", height=420)
    n = max(1, len(params))
    scat = make_subplots(rows=1, cols=n, subplot_titles=[f"{metric} vs {p}" for p in params] or [metric],
                         shared_yaxes=True)
    for i, p in enumerate(params or [""], start=1):
        xs = [_label(r["params"].get(p)) if p else r["index"] for r in ok]
        scat.add_trace(go.Scatter(
            x=xs, y=[_num(r["metrics"].get(metric)) for r in ok], mode="markers", name=p or "variant",
            text=[f"variant {r['index']} ({r['run_id']})<br>" + ", ".join(f"{k}={_label(v)}" for k, v in
                                                                           r["params"].items()) for r in ok],
            hoverinfo="text+y", marker={"size": 10}), row=1, col=i)
        scat.update_xaxes(title_text=p, row=1, col=i)
    scat.update_yaxes(title_text=metric, row=1, col=1)
    scat.update_layout(title=f"{metric} against each swept parameter", showlegend=False, height=380)
    return [par, scat]


def _label(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def write_report(comparison: Comparison, path: str | Path) -> Path:
    """A self-contained HTML file (plotly.js embedded once: opens offline) with the table and the figures."""
    path = Path(path)
    parts = [f"<h1>Sweep {html.escape(comparison.sweep_id)}</h1>", comparison.table._repr_html_()]
    for i, fig in enumerate(comparison.figures):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    doc = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Sweep "
           f"{html.escape(comparison.sweep_id)}</title></head><body>{''.join(parts)}</body></html>")
    atomic_write_text(path, doc)
    comparison.report = path
    return path

"""``%llmops select``: choose a model — quality vs cost vs latency over any set of eval runs, Pareto front marked.

::

    %llmops select eval@latest eval-1a2b3c4d --quality f1

One row per version of every run given (local models, endpoints, deployments alike), from the stored eval summaries:
the quality metric, cost (from the run's price snapshot; "unknown" when no price was known, never $0), cost per
example, p50/p95 latency, errors. A version is on the Pareto front when no other version is at least as good on all
three (quality higher, cost and latency lower) and better on one; a version with an unknown cost is never on the
front (it cannot be compared on cost) and is marked so. The same rows feed the notebook (table + plotly chart, whose
figure is saved in the ``.ipynb``), the HTML report and the Lab sidebar (``/llmops/api/selection``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.display import Table
from llmops_jupyter.core.stage import CommandEnv, command

LOWER_IS_BETTER = {"ppl", "loss", "latency_s", "refusal", "length"}


@dataclasses.dataclass
class SelectConfig(StageConfig):
    runs: list[str] = option(help="eval runs to choose among (ids, prefixes, eval@latest); every version in them "
                                  "is a candidate", positional=True)
    quality: str = option("f1", "quality metric on the y axis (higher is better; ppl/loss lower)")
    latency: str = option("latency_p50_s", "latency figure (latency_p50_s, latency_p95_s, ttft_p50_s, ...)")

    def validate(self) -> None:
        if isinstance(self.runs, str):
            self.runs = [r for r in self.runs.replace(",", " ").split() if r]
        if not self.runs:
            raise self.invalid("runs", "needs at least one eval run", fix="pass eval@latest or eval run ids")


def _num(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def selection_rows(registry: Any, runs: list[str], quality: str = "f1",
                   latency: str = "latency_p50_s") -> list[dict[str, Any]]:
    """One dict per version: run, model, label, quality, cost_usd (None = unknown), cost per example, latency,
    errors, n, pareto (bool), and ``why`` for a version kept off the front."""
    from llmops_jupyter.core.errors import StageError

    out: list[dict[str, Any]] = []
    for ref in runs:
        run_id = registry.resolve_run(ref)
        run = registry.get_run(run_id)
        if run["stage"] != "eval":
            raise StageError(f"'{ref}' is a {run['stage']} run, not an eval run.",
                             fix="pass eval runs (`%llmops runs --stage eval`)")
        labels = dict(zip((run.get("summary") or {}).get("models") or [], (run.get("summary") or {}).get("labels")
                          or []))
        for model_ref, s in registry.eval_summaries(run_id).items():
            n = _num(s.get("n_examples")) or 0
            cost = _num(s.get("cost_usd"))
            judge = _num(s.get("judge_cost_usd"))
            judged_unpriced = "judge_cost_usd" in s and judge is None  # judged, at an unknown price: not $0
            total = None if cost is None or judged_unpriced else cost + (judge or 0.0)
            out.append({"run": run_id, "model": model_ref, "label": labels.get(model_ref, model_ref),
                        "quality": _num(s.get(quality)), "cost_usd": total,
                        "cost_per_example_usd": None if total is None or not n else total / n,
                        "latency_s": _num(s.get(latency)), "latency_p95_s": _num(s.get("latency_p95_s")),
                        "errors": _num(s.get("errors")), "n": int(n)})
    mark_pareto(out, higher_is_better=quality not in LOWER_IS_BETTER)
    return out


def mark_pareto(rows: list[dict[str, Any]], *, higher_is_better: bool = True) -> None:
    """Set ``pareto`` on each row: not dominated on (quality, cost, latency) by any other comparable row."""
    sign = 1.0 if higher_is_better else -1.0

    def key(r: dict[str, Any]) -> tuple[float, float, float] | None:
        if r["quality"] is None or r["cost_usd"] is None or r["latency_s"] is None:
            return None
        return (sign * r["quality"], -r["cost_usd"], -r["latency_s"])  # all "higher is better"

    keys = [key(r) for r in rows]
    for r, k in zip(rows, keys):
        if k is None:
            r["pareto"] = False
            r["why"] = "cost unknown" if r["cost_usd"] is None else f"no {'quality' if r['quality'] is None else 'latency'}"
            continue
        dominated = any(o is not None and o != k and all(a >= b for a, b in zip(o, k)) for o in keys)
        r["pareto"] = not dominated
        r["why"] = "" if r["pareto"] else "dominated"


def _usd(v: float | None) -> str:
    from llmops_jupyter.models.cost import fmt_usd

    return fmt_usd(v)


def figure(rows: list[dict[str, Any]], quality: str = "f1", latency: str = "latency_p50_s") -> Any:
    """Quality (y) vs cost per example (x, log), marker size = latency; the Pareto front joined by a line. Versions
    with an unknown cost are listed in the title, not drawn at $0."""
    import plotly.graph_objects as go

    known = [r for r in rows if r["cost_per_example_usd"] is not None and r["quality"] is not None]
    fig = go.Figure()
    lat = [r["latency_s"] or 0.0 for r in known]
    top = max(lat) if lat and max(lat) > 0 else 1.0
    for on in (True, False):
        pts = [r for r in known if r["pareto"] == on]
        if not pts:
            continue
        fig.add_trace(go.Scatter(
            x=[r["cost_per_example_usd"] for r in pts], y=[r["quality"] for r in pts], mode="markers+text",
            text=[r["label"] for r in pts], textposition="top center", name="Pareto front" if on else "dominated",
            marker={"size": [12 + 28 * (r["latency_s"] or 0) / top for r in pts], "symbol": "star" if on else "circle",
                    "color": "#E45756" if on else "#4C78A8"},
            customdata=[[r["run"], r["latency_s"], _usd(r["cost_usd"])] for r in pts],
            hovertemplate=f"%{{text}}<br>{quality}=%{{y:.4g}}<br>cost/example=$%{{x:.3g}}<br>{latency}="
                          "%{customdata[1]:.3g}s<br>total %{customdata[2]}<br>%{customdata[0]}<extra></extra>"))
    front = sorted((r for r in known if r["pareto"]), key=lambda r: r["cost_per_example_usd"])
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=[r["cost_per_example_usd"] for r in front], y=[r["quality"] for r in front],
                                 mode="lines", line={"dash": "dot", "color": "#E45756"}, showlegend=False,
                                 hoverinfo="skip"))
    unknown = [r["label"] for r in rows if r["cost_usd"] is None]
    title = f"Choose a model: {quality} vs cost vs latency (marker size = {latency})"
    if unknown:
        title += f"<br><sub>cost unknown, not plotted: {', '.join(unknown)}</sub>"
    fig.update_layout(title=title, xaxis={"title": "cost per example (USD)", "type": "log"},
                      yaxis={"title": quality}, height=460, margin={"t": 90})
    return fig


COLUMNS = ["version", "run", "quality", "cost", "cost / example", "latency", "p95 latency", "errors", "Pareto"]


def table_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    return [[r["label"], r["run"], r["quality"], _usd(r["cost_usd"]), _usd(r["cost_per_example_usd"]),
             r["latency_s"], r["latency_p95_s"], r["errors"], "★ front" if r["pareto"] else r["why"]] for r in rows]


class Selection:
    """What ``%llmops select`` returns: the rows, a table and the chart (both displayed in the notebook)."""

    def __init__(self, rows: list[dict[str, Any]], quality: str, latency: str):
        self.rows, self.quality, self.latency = rows, quality, latency
        self.table = Table(COLUMNS[:2] + [quality] + COLUMNS[3:5] + [latency] + COLUMNS[6:], table_rows(rows),
                           title=f"Model selection ({len(rows)} versions)",
                           note="★ front: no other version is better on quality, cost and latency at once; "
                                "cost 'unknown' = no price known (never $0)")
        self._figure = None

    @property
    def figure(self) -> Any:
        if self._figure is None:
            self._figure = figure(self.rows, self.quality, self.latency)
        return self._figure

    @property
    def front(self) -> list[str]:
        return [r["label"] for r in self.rows if r["pareto"]]

    def __str__(self) -> str:
        return str(self.table)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return self.table._repr_html_()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.table)
        display(self.figure)  # plotly's mime bundle: the figure is saved in the .ipynb


@command("select", SelectConfig)
def select(cfg: SelectConfig, env: CommandEnv) -> Selection:
    """Choose a model: one table and a chart of quality vs cost vs latency over eval runs, Pareto front marked."""
    return Selection(selection_rows(env.registry, list(cfg.runs), cfg.quality, cfg.latency), cfg.quality,
                     cfg.latency)

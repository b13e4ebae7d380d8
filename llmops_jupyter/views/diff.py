"""``diff RUN_A RUN_B``: what differs between two runs, and what it did.

One table, the differences first: data version and how many examples changed, config values, chat template,
package versions, git commit, batching/attention kernel, hardware; then the metric deltas, with 95 % paired
bootstrap intervals (eval's :func:`~llmops_jupyter.stages.eval.gates.compare`) when both runs stored per-example
results on shared examples (runs of several model versions: per version with the same label). Fine-tune runs also get an overlay of their training curves (plotly, imported on use); two eval runs also get their shared
examples side by side in a notebook, each with an explain button (A's answer read by B's version).
Works for any two runs of a stage and for two pipeline or sweep runs (their parameters and copied metrics).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from typing import Any

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.display import Table
from llmops_jupyter.core.stage import CommandEnv, command

#: run-summary keys that describe how a run computed (batching mode, attention kernel, precision)
KERNEL_KEYS = ("batching", "attention_kernel", "attn_implementation", "attention", "kernels", "dtype", "optimizer",
               "launcher")
#: summary keys shown as run outcomes, not as causes
_SKIP_SUMMARY = {"checkpoints", "inputs", "cells", "children", "output_notebook", "notebook_artifact", "trials",
                 "variants", "base_model_path"}


@dataclasses.dataclass
class DiffConfig(StageConfig):
    run_a: str = option(help="the first run (id, prefix or 'finetune@latest')", positional=True)
    run_b: str = option(help="the second run", positional=True)
    all: bool = option(False, "also list what is the same")


@dataclasses.dataclass
class RunDiff:
    """Rows ``(section, what, a, b, note, differs)``, the metric deltas and an optional curve overlay."""

    a: dict[str, Any]
    b: dict[str, Any]
    rows: list[tuple[str, str, Any, Any, str, bool]]
    metrics: list[dict[str, Any]]
    curves: dict[str, dict[str, tuple[list, list]]]
    show_same: bool = False
    registry: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def differences(self) -> list[tuple[str, str, Any, Any, str, bool]]:
        return [r for r in self.rows if r[5]]

    def row(self, what: str) -> tuple[str, str, Any, Any, str, bool] | None:
        return next((r for r in self.rows if r[1] == what), None)

    @property
    def table(self) -> Table:
        body = [[sec, what, _short(a), _short(b), note] for sec, what, a, b, note, d in self.rows if d]
        for m in self.metrics:
            ci = (f"[{m['ci_low']:+.4g}, {m['ci_high']:+.4g}] (n={m['n']})" if m.get("ci_low") is not None
                  and not math.isnan(m["ci_low"]) else "")
            delta = f"{m['delta']:+.4g}" if m.get("delta") is not None else ""
            body.append(["metric", m["metric"], m["a"], m["b"], " ".join(x for x in (delta, ci) if x)])
        if self.show_same:
            body += [[sec, what, _short(a), _short(b), "same"] for sec, what, a, b, _n, d in self.rows if not d]
        same = sum(1 for r in self.rows if not r[5])
        note = f"{len(self.differences)} difference(s); {same} compared value(s) are the same"
        if not self.show_same and same:
            note += " (--all lists them)"
        return Table(["", "what", self.a["id"], self.b["id"], "Δ (B − A) / note"], body,
                     title=f"diff {self.a['id']} [{self.a['stage']}] → {self.b['id']} [{self.b['stage']}]", note=note)

    @property
    def figure(self) -> Any:
        """Training curves of both runs on one plot (None when neither logged any)."""
        if not any(self.curves.values()):
            return None
        import plotly.graph_objects as go

        fig = go.Figure()
        for run, dash in ((self.a, "solid"), (self.b, "dash")):
            for key, (steps, values) in sorted(self.curves.get(run["id"], {}).items()):
                fig.add_scatter(x=steps, y=values, name=f"{key} · {run['id']}", line={"dash": dash},
                                mode="lines+markers" if key == "eval_loss" else "lines")
        fig.update_layout(title=f"Training curves: {self.a['id']} (solid) vs {self.b['id']} (dashed)",
                          xaxis_title="step", yaxis_title="loss", height=380, template="plotly_white")
        return fig

    @functools.cached_property
    def examples(self) -> Any:
        """Two eval runs: their shared examples side by side, each with an explain button (A's answer read by B's
        version; runs of several versions: the first label both have). None for other runs."""
        if self.registry is None or self.a["stage"] != "eval" or self.b["stage"] != "eval":
            return None
        va, vb = _versions(self.registry, self.a), _versions(self.registry, self.b)
        if len(va) == 1 and len(vb) == 1:
            pair = (va[0][1], vb[0][1])
        else:
            refs_b = dict(vb)
            pair = next(((ref, refs_b[label]) for label, ref in va if label in refs_b), None)
        if pair is None:
            return None
        from llmops_jupyter.stages.eval.examples import EvalExamples

        view = EvalExamples(self.registry, self.a["id"], versions=[{"run_id": self.a["id"], "model_ref": pair[0]},
                                                                   {"run_id": self.b["id"], "model_ref": pair[1]}])
        return view if len(view) else None

    def __str__(self) -> str:
        return str(self.table)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return self.table._repr_html_()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.table)
        if self.figure is not None:
            display(self.figure)
        examples = self.examples
        if examples is not None:
            display(examples)

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a["id"], "b": self.b["id"], "metrics": self.metrics,
                "rows": [{"section": s, "what": w, "a": a, "b": b, "note": n, "differs": d}
                         for s, w, a, b, n, d in self.rows]}


def _short(v: Any) -> Any:
    if isinstance(v, (dict, list)):
        v = json.dumps(v, sort_keys=True, default=str)
    if isinstance(v, str) and len(v) > 60:
        return v[:57] + "…"
    return v


def _fingerprint(text: str | None) -> str | None:
    return hashlib.sha256(text.encode()).hexdigest()[:12] if text else None


def _dataset(registry: Any, ref: str | None) -> Any:
    if not ref:
        return None
    try:
        from llmops_jupyter.stages.data.format import load_dataset

        return load_dataset(ref, registry)
    except Exception:  # noqa: BLE001 - a dataset deleted since, or not a dataset: nothing to compare
        return None


def _data_ref(run: dict[str, Any]) -> str | None:
    s = run["summary"]
    if run["stage"] == "data":
        return run["id"]
    return s.get("dataset") or run["params"].get("data")


def _example_changes(da: Any, db: Any) -> tuple[str, int]:
    ids_a = {e["id"] for e in da.train + da.eval}
    ids_b = {e["id"] for e in db.train + db.eval}
    only_a, only_b = len(ids_a - ids_b), len(ids_b - ids_a)
    changed = min(only_a, only_b)
    parts = [f"{changed} changed"] if changed else []
    if only_b - changed:
        parts.append(f"{only_b - changed} added")
    if only_a - changed:
        parts.append(f"{only_a - changed} removed")
    return (", ".join(parts) or "same examples") + f" (of {len(ids_a)} → {len(ids_b)})", changed + abs(only_a - only_b)


def diff_runs(registry: Any, ref_a: str, ref_b: str, *, show_same: bool = False) -> RunDiff:
    """Compare two recorded runs (see the module docstring)."""
    a, b = registry.get_run(ref_a), registry.get_run(ref_b)
    rows: list[tuple[str, str, Any, Any, str, bool]] = []

    def add(section: str, what: str, va: Any, vb: Any, note: str = "") -> None:
        rows.append((section, what, va, vb, note, _norm(va) != _norm(vb)))

    add("run", "stage", a["stage"], b["stage"])
    # data: version and changed examples
    da, db = _dataset(registry, _data_ref(a)), _dataset(registry, _data_ref(b))
    if da is not None or db is not None:
        va, vb = (da.version if da else None), (db.version if db else None)
        note = _example_changes(da, db)[0] if da is not None and db is not None and va != vb else ""
        add("data", "data version", va, vb, note)
        ta = _fingerprint(da.manifest.get("chat_template") if da else None)
        tb = _fingerprint(db.manifest.get("chat_template") if db else None)
        add("data", "chat template", ta, tb, "template text differs" if ta != tb else "")
    # config values (a pipeline/sweep run: its notebook parameters)
    pa, pb = _config(a), _config(b)
    for k in sorted(set(pa) | set(pb)):
        if k in ("data",) and da is not None:
            continue  # shown as the data version
        add("config", k, pa.get(k), pb.get(k))
    # how it computed: batching / attention kernel / precision
    for k in KERNEL_KEYS:
        if k in a["summary"] or k in b["summary"]:
            add("kernel", k, a["summary"].get(k), b["summary"].get(k))
    # where: code, packages, hardware
    add("code", "git commit", (a.get("git_commit") or "")[:12] or None, (b.get("git_commit") or "")[:12] or None)
    ea, eb = a.get("env") or {}, b.get("env") or {}
    pk_a, pk_b = ea.get("packages") or {}, eb.get("packages") or {}
    for name in sorted(set(pk_a) | set(pk_b)):
        add("packages", name, pk_a.get(name), pk_b.get(name))
    add("hardware", "python", ea.get("python"), eb.get("python"))
    add("hardware", "platform", ea.get("platform"), eb.get("platform"))
    add("hardware", "gpus", ", ".join(ea.get("gpus") or []) or "cpu", ", ".join(eb.get("gpus") or []) or "cpu")
    add("hardware", "host", a.get("host"), b.get("host"))
    metrics = _metric_deltas(registry, a, b)
    curves = {r["id"]: _curves(registry, r) for r in (a, b)}
    rows.sort(key=lambda r: not r[5])  # differences first, each group in its section order
    return RunDiff(a, b, rows, metrics, curves, show_same, registry=registry)


def _norm(v: Any) -> Any:
    return json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list)) else v


def _config(run: dict[str, Any]) -> dict[str, Any]:
    p = dict(run["params"])
    if run["stage"] in ("pipeline", "sweep"):
        inner = p.pop("parameters", {}) or {}
        for k in ("notebook_hash", "input_hashes", "grid", "space", "search", "trials", "metric", "notebook"):
            if k in p:
                inner[k] = p[k]
        return inner
    return p


def _metric_deltas(registry: Any, a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Final metrics of both runs with B − A; eval runs with per-example results get paired bootstrap CIs."""
    from llmops_jupyter.governance.cards import is_resource_metric

    ma, mb = registry.metrics(a["id"]), registry.metrics(b["id"])
    cis = _bootstrap(registry, a, b)
    out = []
    for k in sorted(set(ma) | set(mb), key=lambda k: (k not in cis, is_resource_metric(k.rsplit("/", 1)[-1]), k)):
        va, vb = ma.get(k), mb.get(k)
        row = {"metric": k, "a": va, "b": vb,
               "delta": (vb - va) if va is not None and vb is not None else None}
        if k in cis:
            row.update(cis[k])
        out.append(row)
    return out


def _versions(registry: Any, run: dict[str, Any]) -> list[tuple[str, str]]:
    """``(label, model_ref)`` of each model version with stored results in an eval run, in evaluation order.

    Per-example rows are keyed by model reference, run metrics by label (``<label>/<metric>`` when the run
    evaluated several versions); the run summary's ``models``/``labels`` lists join the two."""
    versions = [v["model_ref"] for v in registry.eval_versions(run["id"])]
    refs, labels = run["summary"].get("models") or [], run["summary"].get("labels") or []
    if list(refs) == versions and len(labels) == len(refs):
        return list(zip(labels, versions))
    by_ref = dict(zip(refs, labels))
    return [(by_ref.get(ref, ref), ref) for ref in versions]


def _bootstrap(registry: Any, a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Paired bootstrap intervals keyed like the runs' metrics: two single-model runs compare their versions
    (``<metric>``); runs of several versions compare the versions with the same label (``<label>/<metric>``)."""
    va, vb = _versions(registry, a), _versions(registry, b)
    if not va or not vb:
        return {}
    if len(va) == 1 and len(vb) == 1:
        pairs = [("", va[0][1], vb[0][1])]
    else:
        refs_b = dict(vb)
        pairs = [(f"{label}/", ref, refs_b[label]) for label, ref in va if label in refs_b]
    out: dict[str, dict[str, Any]] = {}
    for prefix, ref_a, ref_b in pairs:
        paired = _paired_intervals(registry.eval_examples(a["id"], ref_a), registry.eval_examples(b["id"], ref_b))
        out.update({f"{prefix}{key}": entry for key, entry in paired.items()})
    return out


def _paired_intervals(ra: list[dict[str, Any]], rb: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-metric paired bootstrap of one version against another over the examples both scored."""
    if not ra or not rb:
        return {}
    from llmops_jupyter.stages.eval.gates import compare

    by_b = {r["id"]: r for r in rb}
    shared = [r["id"] for r in ra if r["id"] in by_b]
    if len(shared) < 2:
        return {}
    by_a = {r["id"]: r for r in ra}
    base = [by_a[i]["metrics"] for i in shared]
    cand = [by_b[i]["metrics"] for i in shared]
    keys = sorted({k for m in base for k in m} & {k for m in cand for k in m} - {"nll", "n_tokens", "ppl_example"})
    if all("nll" in m and "n_tokens" in m for m in base + cand):
        keys.append("ppl")
    out = {}
    for key in keys:
        try:
            bv, cv, d, lo, hi, _per = compare(key, base, cand)
        except Exception:  # noqa: BLE001 - a non-numeric per-example value
            continue
        out[key] = {"a": bv, "b": cv, "delta": d, "ci_low": lo, "ci_high": hi, "n": len(shared)}
    return out


def _curves(registry: Any, run: dict[str, Any]) -> dict[str, tuple[list, list]]:
    """Loss curves of a fine-tune run (or of the fine-tune a pipeline run made)."""
    target = run
    if run["stage"] in ("pipeline", "sweep"):
        kids = [c for c in registry.child_runs(run["id"]) if c["stage"] == "finetune"]
        if not kids:
            return {}
        target = kids[0]
    if target["stage"] != "finetune":
        return {}
    from llmops_jupyter.stages.finetune.plots import series

    return series(registry.metric_history(target["id"]), keys=("loss", "eval_loss"))


@command("diff", DiffConfig)
def diff(cfg: DiffConfig, env: CommandEnv) -> RunDiff:
    """What differs between two runs (data, config, template, packages, commit, kernel, hardware) and the metric
    deltas with paired bootstrap intervals; fine-tunes get their training curves overlaid."""
    return diff_runs(env.registry, cfg.run_a, cfg.run_b, show_same=cfg.all)


__all__ = ["DiffConfig", "RunDiff", "diff_runs"]

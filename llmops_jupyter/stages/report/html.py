"""The lifecycle report: one self-contained HTML page comparing model versions (base, fine-tuned, quantized...).

Built from what the registry already holds (eval summaries, training metric history, quantize metrics, lineage),
so it can be (re)generated at any time after the runs. plotly.js is inlined once, so the page opens offline
and from a mail attachment; figures are also returned as plotly objects for the notebook.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from typing import Any

from llmops_jupyter.core.display import fmt, fmt_duration, fmt_time
from llmops_jupyter.stages.eval import store as evalstore

#: metrics shown in the headline table (in this order) when the eval runs have them; others follow
HEADLINE = ("exact_match", "f1", "rougeL", "bleu", "chrf", "embed_sim", "ppl", "judge", "length", "refusal",
            "tokens_per_s")
#: metrics where lower is better (the "best" marker and deltas' colours use it)
LOWER_IS_BETTER = {"ppl", "loss", "nll", "latency_s", "length", "refusal"}
#: quantize-run metrics worth showing, with their labels
QUANT_KEYS = (("source_size_bytes", "source weights (MB)", 1e-6), ("size_bytes", "quantized weights (MB)", 1e-6),
              ("size_ratio", "size ratio", 1), ("source_perplexity", "source perplexity (whole text)", 1),
              ("perplexity", "quantized perplexity (whole text)", 1), ("source_tokens_per_s", "source tokens/s", 1),
              ("tokens_per_s", "quantized tokens/s", 1), ("quantize_s", "quantize time (s)", 1))


def collect_versions(registry: Any, evals: Sequence[tuple[str | None, str]]) -> list[dict[str, Any]]:
    """``[(label or None, eval run)]`` → ``[{label, run_id, model_ref, summary}]``.

    A labelled run contributes its first version (the one a gated eval compares); an unlabelled run all of its
    versions, labelled by model reference.
    """
    out: list[dict[str, Any]] = []
    for label, run in evals:
        run_id = registry.resolve_run(run)
        summ = evalstore.summaries(registry, run_id)
        refs = [v["model_ref"] for v in evalstore.versions(registry, run_id)]
        for ref in refs[:1] if label else refs:
            out.append({"label": label or ref, "run_id": run_id, "model_ref": ref, "summary": summ.get(ref, {})})
    return out


def metric_keys(versions: Sequence[dict[str, Any]], metrics: Sequence[str] | None = None) -> list[str]:
    if metrics:
        return list(metrics)
    present = list(dict.fromkeys(k for v in versions for k in v["summary"]))
    skip = {"n_examples", "nll", "n_tokens", "loss", "latency_s", "bleu_corpus", "chrf_corpus"}
    head = [k for k in HEADLINE if k in present]
    return head + [k for k in present if k not in head and k not in skip and "." not in k and "/" not in k]


def _nan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def delta_labels(versions: Sequence[dict[str, Any]]) -> list[str]:
    """One delta column per step: each version against the one before it (base → fine-tuned → quantized)."""
    return [f"Δ {b['label']} − {a['label']}" for a, b in zip(versions, versions[1:])]


def metrics_rows(versions: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[list[Any]]:
    """Rows ``[metric, value per version..., delta of each version vs the previous one...]``."""
    rows = []
    for k in keys:
        vals = [v["summary"].get(k) for v in versions]
        deltas = [None if _nan(a) or _nan(b) else b - a for a, b in zip(vals, vals[1:])]
        rows.append([k, *vals, *deltas])
    return rows


def gate_rows(registry: Any, versions: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """The regression gates the eval runs applied (from their ``gate.json``): one row per rule."""
    import json

    rows = []
    for v in versions:
        try:
            art = registry.get_artifact(f"{v['run_id']}:eval-results")
        except Exception:  # noqa: BLE001 - an eval run without stored results simply has no gate rows
            continue
        gate_file = art.path / "gate.json"
        if not gate_file.exists():
            continue
        for entry in json.loads(gate_file.read_text()):
            for r in entry.get("results", []):
                lo, hi = (r.get("ci") or [None, None])[:2]
                rows.append([v["label"], r["rule"], r.get("baseline"), r.get("candidate"), r.get("delta"),
                             f"[{fmt(lo)}, {fmt(hi)}]", "pass" if r.get("passed") else "FAIL"])
    return rows


def example_rows(registry: Any, versions: Sequence[dict[str, Any]], n: int = 8) -> list[list[Any]]:
    """The first ``n`` held-out examples: prompt, reference and every version's output."""
    tables = [{r["id"]: r for r in evalstore.load_examples(registry, v["run_id"], v["model_ref"])} for v in versions]
    ids = [i for i in tables[0] if all(i in t for t in tables[1:])][:n]
    return [[display_prompt(tables[0][i]["prompt"]), tables[0][i]["reference"], *[t[i]["output"] for t in tables]]
            for i in ids]


def display_prompt(prompt: str, limit: int = 240) -> str:
    """The last user turn of a chat-templated prompt (ChatML, Llama 3, [INST]), without special tokens."""
    text = re.split(r"<\|im_start\|>user|<\|start_header_id\|>user<\|end_header_id\|>|\[INST\]", prompt)[-1]
    text = re.sub(r"<\|[^|>]*\|>|\[/INST\]|</?s>", " ", text).strip()
    text = re.sub(r"\s*\bassistant\s*$", "", text).strip()
    return text if len(text) <= limit else "…" + text[-limit:]


def comparison_figure(versions: Sequence[dict[str, Any]], keys: Sequence[str]) -> Any:
    from llmops_jupyter.stages.eval.plots import summary_figure

    return summary_figure({v["label"]: v["summary"] for v in versions}, keys,
                          title="Held-out metrics per model version")


def _table_html(columns: Sequence[str], rows: Sequence[Sequence[Any]], best: dict[int, int] | None = None,
                wrap: bool = False) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for ri, r in enumerate(rows):
        cells = []
        for ci, v in enumerate(r):
            style = " class='best'" if best and best.get(ri) == ci else ""
            cells.append(f"<td{style}>{html.escape(fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cls = " class='wrap'" if wrap else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _best_columns(rows: Sequence[Sequence[Any]], n_versions: int) -> dict[int, int]:
    best = {}
    for ri, r in enumerate(rows):
        vals = [(ci, v) for ci, v in enumerate(r[1:1 + n_versions], start=1) if not _nan(v)]
        if len(vals) > 1 and len({v for _, v in vals}) > 1:
            pick = min if r[0] in LOWER_IS_BETTER else max
            best[ri] = pick(vals, key=lambda t: t[1])[0]
    return best


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ddd;padding:4px 10px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}td.best{font-weight:bold;background:#eef8ee}
table.wrap th{text-align:left}table.wrap td{text-align:left;white-space:pre-wrap;max-width:320px;font-size:.9em;vertical-align:top}
.note{color:#666;font-size:.9em}code{background:#f4f4f4;padding:1px 4px}
"""


def build_html(
    title: str,
    versions: Sequence[dict[str, Any]],
    keys: Sequence[str],
    *,
    figures: Sequence[tuple[str, Any]] = (),
    sections: Sequence[tuple[str, str]] = (),
    runs: Sequence[dict[str, Any]] = (),
    inline_plotlyjs: bool = True,
) -> str:
    """The report page. ``figures``: (heading, plotly figure); ``sections``: (heading, trusted HTML)."""
    rows = metrics_rows(versions, keys)
    columns = ["metric", *[v["label"] for v in versions], *delta_labels(versions)]
    parts = [f"<h1>{html.escape(title)}</h1>",
             "<h2>Held-out metrics</h2>",
             _table_html(columns, rows, _best_columns(rows, len(versions))),
             "<p class='note'>Bold: best version per metric (lower is better for "
             + ", ".join(sorted(k for k in LOWER_IS_BETTER if k in keys)) + "). Eval runs: "
             + ", ".join(f"{html.escape(v['label'])} = <code>{html.escape(v['run_id'])}</code> "
                         f"(<code>{html.escape(v['model_ref'])}</code>)" for v in versions) + "</p>"]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    first = True
    for heading, fig in figures:
        include: bool | str = ("inline" if inline_plotlyjs else "cdn") if first else False
        if include == "inline":
            include = True
        parts.append(f"<h2>{html.escape(heading)}</h2>" + fig.to_html(full_html=False, include_plotlyjs=include))
        first = False
    if runs:
        parts.append("<h2>Runs</h2>" + _table_html(
            ["run", "stage", "status", "started", "duration"],
            [[r["id"], r["stage"], r["status"], fmt_time(r.get("started_at")), fmt_duration(r.get("duration_s"))]
             for r in runs]))
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>")


def quantize_section(metrics: dict[str, float]) -> str | None:
    rows = [[label, metrics[k] * scale] for k, label, scale in QUANT_KEYS if k in metrics]
    return _table_html(["measure", "value"], rows) if rows else None

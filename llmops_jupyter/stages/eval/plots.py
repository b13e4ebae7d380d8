"""Plotly figures for evaluation results: pure functions of summary / per-example data (no registry, no widgets).

Static figures are returned in the eval stage's outputs, so a notebook saved by papermill still shows them
(widget state is not saved, plotly's JSON output is).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

#: metrics drawn in the summary by default (descriptive keys such as n_examples are left out)
SKIP = {"n_examples", "nll", "n_tokens",
        # usage and cost: shown by the selection view (quality vs cost vs latency), not as metric bars
        "prompt_tokens", "completion_tokens", "latency_p50_s", "latency_p95_s", "ttft_p50_s", "ttft_p95_s", "errors",
        "requests", "retries", "cache_hits", "cost_usd", "spent_usd", "judge_cost_usd"}


def summary_figure(summary: dict[str, dict[str, float]], metrics: Sequence[str] | None = None,
                   title: str = "Evaluation summary") -> Any:
    """Metric bars per version: one small panel per metric (scales differ: ppl vs F1), one bar per version."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    versions = list(summary)
    keys = list(metrics) if metrics else [k for k in dict.fromkeys(k for v in summary.values() for k in v)
                                          if k not in SKIP]
    keys = [k for k in keys if any(not _nan(summary[v].get(k)) for v in versions)] or ["n_examples"]
    cols = min(len(keys), 4)
    rows = math.ceil(len(keys) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=keys, vertical_spacing=0.25 if rows > 1 else 0.1)
    palette = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#FF9DA6", "#9D755D"]
    for vi, version in enumerate(versions):
        for ki, key in enumerate(keys):
            value = summary[version].get(key)
            fig.add_trace(go.Bar(x=[version], y=[None if _nan(value) else value], name=version,
                                 marker_color=palette[vi % len(palette)], legendgroup=version, showlegend=ki == 0,
                                 hovertemplate=f"{version}<br>{key}=%{{y:.4g}}<extra></extra>"),
                          row=ki // cols + 1, col=ki % cols + 1)
    fig.update_layout(title=title, barmode="group", height=260 * rows + 60, margin={"t": 80, "l": 40, "r": 20})
    fig.update_xaxes(showticklabels=False)
    return fig


def delta_figure(ids: Sequence[str], deltas: dict[str, Sequence[float]], title: str = "Per-example deltas") -> Any:
    """Scatter of per-example deltas (candidate - baseline) per series; hover shows the example id."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, values in deltas.items():
        ys = [None if _nan(v) else v for v in values]
        fig.add_trace(go.Scatter(x=list(range(len(ids))), y=ys, mode="markers", name=name, text=list(ids),
                                 hovertemplate="example %{text}<br>delta=%{y:.4g}<extra>" + name + "</extra>"))
    fig.add_hline(y=0, line_dash="dot", line_color="grey")
    fig.update_layout(title=title, xaxis_title="example", yaxis_title="delta (candidate - baseline)", height=360)
    return fig


def _nan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))

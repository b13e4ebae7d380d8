"""Monitoring dashboards: pure functions from logged request rows (``monitoring.analysis.load_records``) to plotly
figures. No registry access, no widgets — the monitor stage, notebooks and the Lab extension all call these."""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any

from llmops_jupyter.stages.monitor.analysis import _pct
from llmops_jupyter.stages.monitor.checks import flagged

CHECKS = ("injection", "pii_response", "refusal", "empty", "truncated", "toxic", "unsupported", "inconsistent")


def _bucket_size(rows: list[dict[str, Any]], buckets: int = 20) -> float:
    if len(rows) < 2:
        return 60.0
    span = rows[-1]["ts"] - rows[0]["ts"]
    raw = max(span / buckets, 1.0)
    for nice in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400):
        if raw <= nice:
            return float(nice)
    return 86400.0 * math.ceil(raw / 86400)


def buckets(rows: list[dict[str, Any]], size: float | None = None) -> list[tuple[_dt.datetime, list[dict]]]:
    """Rows grouped into equal time buckets (ordered); empty buckets kept so rates show gaps honestly."""
    if not rows:
        return []
    rows = sorted(rows, key=lambda r: r["ts"])
    size = size or _bucket_size(rows)
    start = math.floor(rows[0]["ts"] / size) * size
    n = int((rows[-1]["ts"] - start) // size) + 1
    out: list[list[dict]] = [[] for _ in range(n)]
    for r in rows:
        out[int((r["ts"] - start) // size)].append(r)
    return [(_dt.datetime.fromtimestamp(start + i * size), b) for i, b in enumerate(out)]


def _fig(title: str, ytitle: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.update_layout(title=title, yaxis_title=ytitle, template="plotly_white", height=320,
                      margin={"l": 50, "r": 20, "t": 50, "b": 40}, legend={"orientation": "h"})
    return fig


def latency_figure(rows: list[dict[str, Any]], size: float | None = None):
    import plotly.graph_objects as go

    fig = _fig("Latency percentiles", "seconds")
    bs = buckets([r for r in rows if r["status"] == 200 and r["latency_s"] is not None], size)
    for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
        fig.add_trace(go.Scatter(x=[t for t, _ in bs], y=[_pct([r["latency_s"] for r in b], q) if b else None
                                                          for _, b in bs], name=name, mode="lines+markers"))
    return fig


def throughput_figure(rows: list[dict[str, Any]], size: float | None = None):
    import plotly.graph_objects as go

    size = size or _bucket_size(rows)
    fig = _fig("Throughput", "requests / s")
    bs = buckets(rows, size)
    fig.add_trace(go.Bar(x=[t for t, _ in bs], y=[sum(r["status"] == 200 for r in b) / size for _, b in bs],
                         name="ok"))
    fig.add_trace(go.Bar(x=[t for t, _ in bs], y=[sum(r["status"] != 200 for r in b) / size for _, b in bs],
                         name="rejected/error"))
    fig.update_layout(barmode="stack")
    return fig


def tokens_figure(rows: list[dict[str, Any]], size: float | None = None):
    import plotly.graph_objects as go

    fig = _fig("Tokens per request", "tokens (mean)")
    bs = buckets([r for r in rows if r["status"] == 200], size)
    for key, name in (("tokens_in", "prompt"), ("tokens_out", "completion")):
        ys = []
        for _, b in bs:
            vals = [r[key] for r in b if r[key] is not None]
            ys.append(sum(vals) / len(vals) if vals else None)
        fig.add_trace(go.Scatter(x=[t for t, _ in bs], y=ys, name=name, mode="lines+markers"))
    return fig


def error_rate_figure(rows: list[dict[str, Any]], size: float | None = None):
    import plotly.graph_objects as go

    fig = _fig("Error rate by status", "share of requests")
    bs = buckets(rows, size)
    fig.add_trace(go.Scatter(x=[t for t, _ in bs], y=[(sum(r["status"] != 200 for r in b) / len(b)) if b else None
                                                      for _, b in bs], name="all errors", mode="lines+markers"))
    statuses = sorted({r["status"] for r in rows if r["status"] != 200})
    for s in statuses:
        fig.add_trace(go.Scatter(x=[t for t, _ in bs], y=[(sum(r["status"] == s for r in b) / len(b)) if b else None
                                                          for _, b in bs], name=str(s), mode="lines+markers"))
    return fig


def check_rates_figure(rows: list[dict[str, Any]], size: float | None = None):
    import plotly.graph_objects as go

    fig = _fig("Check hit rates", "share of requests")
    bs = buckets(rows, size)
    for check in CHECKS:
        if not any(check in r["checks"] for r in rows):
            continue
        ys = []
        for _, b in bs:
            judged = [r for r in b if check in r["checks"]]
            ys.append(sum(check in flagged(r["checks"]) or (check == "truncated" and r["checks"].get("truncated"))
                          for r in judged) / len(judged) if judged else None)
        fig.add_trace(go.Scatter(x=[t for t, _ in bs], y=ys, name=check, mode="lines+markers"))
    return fig


def drift_figure(history: list[dict[str, Any]], threshold: float | None = None):
    """``history``: ``[{"ts": float, "drift": float, "length_psi": float?}, ...]`` from monitor runs."""
    import plotly.graph_objects as go

    fig = _fig("Prompt drift vs reference", "score")
    xs = [_dt.datetime.fromtimestamp(h["ts"]) for h in history]
    fig.add_trace(go.Scatter(x=xs, y=[h.get("drift") for h in history], name="embedding drift",
                             mode="lines+markers"))
    if any(h.get("length_psi") is not None for h in history):
        fig.add_trace(go.Scatter(x=xs, y=[h.get("length_psi") for h in history], name="length PSI",
                                 mode="lines+markers"))
    if threshold is not None:
        fig.add_hline(y=threshold, line_dash="dash", annotation_text="threshold")
    return fig


def dashboard(rows: list[dict[str, Any]], drift_history: list[dict[str, Any]] | None = None,
              threshold: float | None = None) -> list[Any]:
    """All monitoring figures for a window of records."""
    figs = [latency_figure(rows), throughput_figure(rows), tokens_figure(rows), error_rate_figure(rows),
            check_rates_figure(rows)]
    if drift_history:
        figs.append(drift_figure(drift_history, threshold))
    return figs

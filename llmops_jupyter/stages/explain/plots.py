"""Pictures of an explanation: static HTML token views (no JavaScript: they survive in a saved .ipynb, on GitHub and
in the HTML report) and plotly heatmaps (saved as plotly JSON in the notebook, inlined in the report)."""

from __future__ import annotations

import html
import math
from typing import Any


def _shown(token: str) -> str:
    return html.escape(token.replace("\n", "↵").replace(" ", "·")) or "∅"


def _colour(value: float, scale: float, *, diverging: bool) -> str:
    """Background for a value: logprob 0 → white, very unlikely → red; a diverging diff: red (−) / blue (+)."""
    if value != value:
        return "#eeeeee"
    if diverging:
        x = max(-1.0, min(1.0, value / scale)) if scale else 0.0
        r, g, b = (255, int(255 * (1 + x)), int(255 * (1 + x))) if x < 0 else (int(255 * (1 - x)), int(255 * (1 - x)), 255)
        return f"rgb({r},{g},{b})"
    x = max(0.0, min(1.0, -value / scale)) if scale else 0.0
    return f"rgb(255,{int(255 * (1 - 0.75 * x))},{int(255 * (1 - 0.75 * x))})"


def token_html(label: str, scored: dict[str, Any], *, diff: list[float] | None = None, other: str | None = None) -> str:
    """The answer as coloured tokens: colour = logprob (or the B − A difference), hover = logprob, entropy, rank
    and the top alternatives; a table under it carries the same numbers for readers without hover."""
    spans, rows = [], []
    scale = max((abs(d) for d in diff or []), default=0.0) or 1.0
    for i, t in enumerate(scored["tokens"]):
        alts = ", ".join(f"{a!r} {math.exp(lp):.2f}" for a, lp in t["top"])
        tip = f"logprob {t['logprob']:.3f} (p={math.exp(t['logprob']):.3f}), entropy {t['entropy']:.2f}, rank " \
              f"{t['rank']}; top: {alts}"
        if diff is not None:
            tip = f"Δ logprob {diff[i]:+.3f}; " + tip
            bg = _colour(diff[i], scale, diverging=True)
        else:
            bg = _colour(t["logprob"], 10.0, diverging=False)
        spans.append(f"<span title='{html.escape(tip, quote=True)}' style='background:{bg};padding:1px 2px;"
                     f"margin:1px;border-radius:3px;font-family:monospace'>{_shown(t['token'])}</span>")
        cells = [str(i), _shown(t["token"]), f"{t['logprob']:.3f}", f"{t['entropy']:.2f}", str(t["rank"]),
                 html.escape(alts)]
        if diff is not None:
            cells.insert(3, f"{diff[i]:+.3f}")
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = ["#", "token", "logprob", "entropy", "rank", "top alternatives (p)"]
    if diff is not None:
        head.insert(3, f"Δ {html.escape(other or 'B')} − {html.escape(label)}")
    title = (f"{html.escape(other or 'B')} vs {html.escape(label)}: per-token logprob difference (blue: B likelier, "
             "red: less likely)") if diff is not None else \
        (f"{html.escape(label)}: answer log-likelihood {scored['logprob_sum']:.3f} over {scored['n_tokens']} tokens "
         "(white: likely, red: unlikely)")
    table = ("<details><summary>per-token numbers</summary><table class='llmops-explain'><thead><tr>"
             + "".join(f"<th style='text-align:left'>{h}</th>" for h in head) + "</tr></thead><tbody>"
             + "".join(rows) + "</tbody></table></details>")
    return f"<div class='llmops-explain'><b>{title}</b><div style='line-height:1.9'>{''.join(spans)}</div>{table}</div>"


def lens_figure(lens: dict[str, Any], answer_tokens: list[str], label: str) -> Any:
    """Heatmap layer × answer token of the answer token's probability under the lens; text = the lens's top-1."""
    import plotly.graph_objects as go

    z = [[math.exp(v) for v in row] for row in lens["logprob"]]
    fig = go.Figure(go.Heatmap(z=z, x=[f"{i}:{t!r}" for i, t in enumerate(answer_tokens)], y=lens["layers"],
                               text=lens["top"], texttemplate="%{text}", colorscale="Blues", zmin=0, zmax=1,
                               colorbar={"title": "p(answer token)"},
                               hovertemplate="layer %{y}, %{x}<br>p=%{z:.3f}<br>lens top-1: %{text}<extra></extra>"))
    fig.update_layout(title=f"Logit lens ({label}): final norm + lm_head on each layer's hidden state",
                      xaxis_title="answer token", yaxis_title="layer", height=max(260, 40 * len(z) + 120),
                      margin={"l": 50, "r": 10, "t": 40, "b": 60})
    return fig


def attribution_figure(attr: dict[str, Any], label: str) -> Any:
    """Heatmap answer token × prompt token of integrated-gradients attributions, with the convergence check in the
    title (IG's completeness: Σ attributions = f(x) − f(baseline))."""
    import plotly.graph_objects as go

    x = [f"{i}:{t!r}" for i, t in zip(attr["positions"], attr["input_tokens"])]
    y = [f"{i}:{t!r}" for i, t in enumerate(attr["output_tokens"])]
    z = attr["token_attr"]
    top = max((abs(v) for row in z for v in row), default=1.0) or 1.0
    fig = go.Figure(go.Heatmap(z=z, x=x, y=y, colorscale="RdBu", zmid=0, zmin=-top, zmax=top,
                               colorbar={"title": "attribution"},
                               hovertemplate="prompt %{x} → answer %{y}<br>%{z:.4f}<extra></extra>"))
    ok = "✓" if attr["relative_delta"] < 0.05 else "✗ (raise --ig-steps)"
    fig.update_layout(
        title=(f"Integrated gradients ({label}, {attr['steps']} steps): convergence Σattr − (f(x) − f(baseline)) = "
               f"{attr['delta']:+.2e}, {100 * attr['relative_delta']:.2f}% of |f(x) − f(baseline)| = "
               f"{abs(attr['f_x'] - attr['f_baseline']):.3g} {ok}"),
        xaxis_title="prompt token", yaxis_title="answer token", height=max(260, 28 * len(y) + 160),
        margin={"l": 60, "r": 10, "t": 50, "b": 80}, title_font_size=12)
    return fig


def contrast_figure(diff: list[float], tokens: list[str], a: str, b: str) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=[f"{i}:{t!r}" for i, t in enumerate(tokens)], y=diff,
                           marker_color=["#1f77b4" if d >= 0 else "#d62728" for d in diff]))
    fig.update_layout(title=f"Per-token logprob difference {b} − {a}", xaxis_title="answer token",
                      yaxis_title="Δ logprob", height=300, margin={"l": 50, "r": 10, "t": 40, "b": 60})
    return fig


class ExplainView:
    """The cell's static part: token views (and contrast) as HTML; text for terminals."""

    def __init__(self, parts: list[str], text: str):
        self.parts = parts
        self.text = text

    def _repr_html_(self) -> str:
        return "".join(self.parts)

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__

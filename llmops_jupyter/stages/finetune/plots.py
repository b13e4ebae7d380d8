"""Pure figure builders: registry rows → plotly figures (no registry access, no widgets, no side effects).

Rows are what :meth:`Registry.metric_history` returns: ``{"key", "value", "step", "ts"}``. Keeping these pure lets the
live dashboard, the static figure a finished cell leaves behind and papermill reports draw the same picture.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: (panel title, metric keys drawn in it) of the training figure, in grid order. The loss panel is retitled by
#: :func:`loss_panel_title` once a preference (DPO) run logs its reward margin.
TRAINING_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss", "eval_loss", "rewards/margins", "eval_kl_to_teacher")),
    ("learning rate", ("lr",)),
    ("tokens / s", ("tokens_per_s",)),
    ("peak memory (MB)", ("memory_mb",)),
)


def series(rows: Iterable[dict[str, Any]], keys: Iterable[str] | None = None) -> dict[str, tuple[list, list]]:
    """Group metric rows by key into ``(steps, values)``, ordered by step (rows without a step keep arrival order)."""
    wanted = set(keys) if keys is not None else None
    out: dict[str, list[tuple[float, float]]] = {}
    for i, r in enumerate(rows):
        key = r["key"]
        if (wanted is not None and key not in wanted) or r.get("value") is None:
            continue
        step = r.get("step")
        out.setdefault(key, []).append((step if step is not None else i, r["value"]))
    return {k: ([s for s, _ in sorted(v, key=lambda t: t[0])], [x for _, x in sorted(v, key=lambda t: t[0])])
            for k, v in out.items()}


PREFERENCE_KEY = "rewards/margins"


def loss_panel_title(keys: Iterable[str]) -> str:
    return "loss + reward margin (DPO)" if PREFERENCE_KEY in set(keys) else TRAINING_PANELS[0][0]


def training_figure(rows: Iterable[dict[str, Any]], *, title: str | None = None):
    """2×2 training dashboard: loss + eval loss, learning rate, tokens/s, peak memory against optimizer step.

    Every trace exists even without data, so a live view can append to it by name.
    """
    from plotly.subplots import make_subplots

    data = series(rows)
    titles = [loss_panel_title(data), *(p[0] for p in TRAINING_PANELS[1:])]
    fig = make_subplots(rows=2, cols=2, subplot_titles=titles, horizontal_spacing=0.1, vertical_spacing=0.16)
    for i, (_title, keys) in enumerate(TRAINING_PANELS):
        row, col = divmod(i, 2)
        for key in keys:
            steps, values = data.get(key, ([], []))
            fig.add_scatter(x=steps, y=values, name=key, mode="lines+markers" if key == "eval_loss" else "lines",
                            row=row + 1, col=col + 1)
    fig.update_xaxes(title_text="step", row=2)
    fig.update_layout(height=480, margin={"l": 40, "r": 20, "t": 60 if title else 40, "b": 40},
                      title=title, legend={"orientation": "h", "y": -0.15}, template="plotly_white")
    return fig


def loss_reduction(rows: Iterable[dict[str, Any]], key: str = "loss") -> float | None:
    """Last / first logged value of ``key`` (below 1 means the loss went down)."""
    _, values = series(rows, [key]).get(key, ([], []))
    if len(values) < 2 or not values[0]:
        return None
    return values[-1] / values[0]

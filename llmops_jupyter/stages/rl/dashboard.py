"""Live RL dashboard: reward (total and each component), reward std and the share of zero-variance groups, KL and
entropy, completion length and clipped ratio, a table of sampled completions (each reward component and the
advantage) and the guards' alerts — fed by runner events while training runs.

The figure builders are pure (metric rows → plotly figure; sample rows → table) so the live view, the static
figure a finished cell returns (saved in the .ipynb, as the fine-tuning dashboard's) and reports draw the same.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable
from typing import Any

from llmops_jupyter.core.runner import Event, EventType
from llmops_jupyter.stages.finetune.dashboard import TrainingDashboard, fmt_eta
from llmops_jupyter.stages.finetune.plots import series

#: (panel title, metric keys) in grid order; ``rewards/<fn>/mean`` keys join the first panel as they appear.
RL_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward (total and components)", ("reward",)),
    ("reward std / zero-variance groups", ("reward_std", "frac_reward_zero_std")),
    ("KL / entropy", ("kl", "entropy")),
    ("completion length / clipped ratio", ("completions/mean_length", "completions/clipped_ratio")),
)


def component_keys(keys: Iterable[str]) -> list[str]:
    return sorted(k for k in set(keys) if k.startswith("rewards/") and k.endswith("/mean"))


def reward_figure(rows: Iterable[dict[str, Any]], *, title: str | None = None, components: Iterable[str] = ()):
    """2×2 RL figure against the optimizer step; every trace exists even without data (the live view fills them),
    and held-out checks (``check/<fn>``) join the reward panel."""
    from plotly.subplots import make_subplots

    rows = list(rows)
    data = series(rows)
    comps = sorted(set(component_keys(data)) | {f"rewards/{c}/mean" for c in components})
    checks = sorted(k for k in data if k.startswith("check/"))
    fig = make_subplots(rows=2, cols=2, subplot_titles=[p[0] for p in RL_PANELS], horizontal_spacing=0.1,
                        vertical_spacing=0.16, specs=[[{}, {}], [{}, {"secondary_y": True}]])
    for i, (_title, keys) in enumerate(RL_PANELS):
        row, col = divmod(i, 2)
        extra = [*comps, *checks] if i == 0 else []
        for key in (*keys, *extra):
            steps, values = data.get(key, ([], []))
            kw = {"secondary_y": key == "completions/clipped_ratio"} if i == 3 else {}
            fig.add_scatter(x=steps, y=values, name=key, mode="lines+markers" if key.startswith("check/") else "lines",
                            row=row + 1, col=col + 1, **kw)
    fig.update_xaxes(title_text="step", row=2)
    fig.update_layout(height=520, margin={"l": 40, "r": 20, "t": 60 if title else 40, "b": 40}, title=title,
                      legend={"orientation": "h", "y": -0.15}, template="plotly_white")
    return fig


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.3g}"
    return str(v)


def completions_table(samples: list[dict[str, Any]], *, width: int = 160):
    """Sampled completions with each reward component, the total and the advantage (an HTML table that a saved
    notebook keeps)."""
    from llmops_jupyter.core.display import Table

    names = list(samples[0]["rewards"]) if samples else []
    rows = []
    for s in samples:
        comp = s["completion"].replace("\n", "⏎")
        rows.append([s["step"], s["group"], _short(s["prompt"], 60), _short(comp, width),
                     *(_fmt(s["rewards"].get(n)) for n in names), _fmt(s["total"]), _fmt(s["advantage"])])
    return Table(["step", "group", "prompt", "completion", *names, "total", "advantage"], rows,
                 title="Sampled completions")


def _short(text: str, width: int) -> str:
    text = text.replace("<|im_start|>", "").replace("<|im_end|>", "").strip().replace("\n", " ")
    return text if len(text) <= width else "…" + text[-(width - 1):]


class RLDashboard(TrainingDashboard):
    """Runner listener (the rl stage's ``live_view``): the fine-tuning dashboard (events, widget start-up, throttled
    redraw, status line) with the RL figure, the sampled-completions table and the guards' alerts."""

    progress_desc = "rl"
    end_title = "rl"

    def __init__(self, config: Any = None, *, front_end: str = "python",
                 display: Callable[[Any], None] | None = None, **kw: Any):
        super().__init__(config, front_end=front_end, display=display, **kw)
        self.samples: list[dict[str, Any]] = []
        self.alerts: list[str] = []
        self.components = [str(r) if isinstance(r, str) else getattr(r, "__name__", "reward")
                           for r in (getattr(config, "reward", None) or [])]
        self._table = self._alerts = None

    def figure(self, rows: list[dict[str, Any]], *, title: str | None = None) -> Any:
        return reward_figure(rows, title=title, components=self.components)

    def _on_event(self, event: Event) -> None:
        if event.type is EventType.LOG:
            if event.data.get("samples"):
                self.samples = list(event.data["samples"])
                self._draw_table()
            if event.data.get("alert"):
                self.alerts.append(event.data["message"])
                self._draw_alerts()

    def status_text(self) -> str:
        parts = [f"step {int(self.done)}" + (f"/{int(self.total)}" if self.total else "")]
        parts.append(self.ended or f"ETA {fmt_eta(self.eta_s())}")
        for key, label in (("reward", "reward"), ("reward_std", "std"), ("frac_reward_zero_std", "zero-std"),
                           ("kl", "KL"), ("completions/mean_length", "length")):
            v = self._latest(key)
            if v is not None:
                parts.append(f"{label} {v:.3g}")
        if self.alerts:
            parts.append(f"{len(self.alerts)} alert(s)")
        return html.escape(" · ".join(parts))

    def _layout(self, status: Any, fig: Any) -> list[Any]:
        import ipywidgets as w

        self._alerts, self._table = w.HTML(value=""), w.HTML(value="")
        return [status, self._alerts, fig, self._table]

    def _new_traces(self, data: dict[str, Any]) -> None:
        names = {t.name for t in self._fig.data}
        for key in data:
            if (key.startswith("rewards/") and key.endswith("/mean") or key.startswith("check/")) and key not in names:
                self._fig.add_scatter(x=[], y=[], name=key, row=1, col=1)

    def _draw_alerts(self) -> None:
        if self._alerts is not None:
            self._alerts.value = "".join(f"<div style='color:#b45309'>⚠ {html.escape(a)}</div>" for a in self.alerts)

    def _draw_table(self) -> None:
        if self._table is not None:
            self._table.value = completions_table(self.samples)._repr_html_()

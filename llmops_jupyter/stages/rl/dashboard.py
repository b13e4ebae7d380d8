"""Live RL dashboard: reward (total and each component), reward std and the share of zero-variance groups, KL and
entropy, completion length and clipped ratio, a table of sampled completions (each reward component and the
advantage) and the guards' alerts — fed by runner events while training runs.

The figure builders are pure (metric rows → plotly figure; sample rows → table) so the live view, the static
figure a finished cell returns (saved in the .ipynb, as the fine-tuning dashboard's) and reports draw the same.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Iterable
from typing import Any

from llmops_jupyter.core.runner import END_EVENTS, Event, EventType
from llmops_jupyter.stages.finetune.dashboard import fmt_eta
from llmops_jupyter.stages.finetune.plots import series

#: (panel title, metric keys) in grid order; ``rewards/<fn>/mean`` keys join the first panel as they appear.
RL_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward (total and components)", ("reward",)),
    ("reward std / zero-variance groups", ("reward_std", "frac_reward_zero_std")),
    ("KL / entropy", ("kl", "entropy")),
    ("completion length / clipped ratio", ("completions/mean_length", "completions/clipped_ratio")),
)
REDRAW_S = 0.5


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


class RLDashboard:
    """Runner listener (the rl stage's ``live_view``): draws widgets for the notebook front end, collects elsewhere."""

    def __init__(self, config: Any = None, *, front_end: str = "python",
                 display: Callable[[Any], None] | None = None, **_: Any):
        self.front_end, self._display = front_end, display
        self.rows: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.alerts: list[str] = []
        self.components = [str(r) if isinstance(r, str) else getattr(r, "__name__", "reward")
                           for r in (getattr(config, "reward", None) or [])]
        self._fig = self._status = self._table = self._alerts = None
        self._pending = 0
        self._last_draw = 0.0
        self._t0: float | None = None
        self._step0 = 0.0
        self.done, self.total = 0.0, None
        self.ended: str | None = None

    @property
    def live(self) -> bool:
        return self.front_end == "magic" and self._display is not None

    def __call__(self, event: Event) -> None:
        if event.type is EventType.METRIC:
            step = event.data.get("step")
            for key, value in event.data.get("values", {}).items():
                self.rows.append({"key": key, "value": value, "step": step, "ts": event.ts})
            self._pending += 1
            self._ensure_widgets()
            self._redraw()
        elif event.type is EventType.STARTED:
            self._ensure_widgets()
        elif event.type is EventType.LOG:
            if event.data.get("samples"):
                self.samples = list(event.data["samples"])
                self._draw_table()
            if event.data.get("alert"):
                self.alerts.append(event.data["message"])
                self._draw_alerts()
        elif event.type is EventType.PROGRESS and event.data.get("desc") == "rl":
            now = time.monotonic()
            if self._t0 is None:
                self._t0, self._step0 = now, event.data.get("done") or 0
            self.done, self.total = event.data.get("done") or 0, event.data.get("total")
            self._update_status()
        elif event.type in END_EVENTS:
            self.end(str(event.type))

    def eta_s(self) -> float | None:
        if self._t0 is None or not self.total or self.done <= self._step0:
            return None
        rate = (self.done - self._step0) / max(time.monotonic() - self._t0, 1e-9)
        return (self.total - self.done) / rate

    def _latest(self, key: str) -> float | None:
        for r in reversed(self.rows):
            if r["key"] == key:
                return r["value"]
        return None

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
        return " · ".join(parts)

    def end(self, status: str) -> None:
        if self.ended:
            return
        self.ended = status
        self._redraw(force=True)
        self._update_status()
        if self.live and status != "finished" and self.rows:
            self._display(reward_figure(self.rows, title=f"rl ({status})", components=self.components))

    def close(self) -> None:
        self._redraw(force=True)

    def _ensure_widgets(self) -> None:
        if not self.live or self._fig is not None:
            return
        import ipywidgets as w
        import plotly.graph_objects as go

        self._fig = go.FigureWidget(reward_figure([], components=self.components))
        self._status = w.HTML(value="starting…")
        self._alerts = w.HTML(value="")
        self._table = w.HTML(value="")
        self._display(w.VBox([self._status, self._alerts, self._fig, self._table]))

    def _update_status(self) -> None:
        if self._status is not None:
            frac = (self.done / self.total) if self.total else 0.0
            self._status.value = (f"<div style='font-family:monospace'><progress value='{frac:.4f}' max='1' "
                                  f"style='width:40%'></progress> {html.escape(self.status_text())}</div>")

    def _draw_alerts(self) -> None:
        if self._alerts is not None:
            self._alerts.value = "".join(f"<div style='color:#b45309'>⚠ {html.escape(a)}</div>" for a in self.alerts)

    def _draw_table(self) -> None:
        if self._table is not None:
            self._table.value = completions_table(self.samples)._repr_html_()

    def _redraw(self, force: bool = False) -> None:
        if self._fig is None or not self._pending:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < REDRAW_S:
            return
        data = series(self.rows)
        names = {t.name for t in self._fig.data}
        missing = [k for k in data if (k.startswith("rewards/") and k.endswith("/mean") or k.startswith("check/"))
                   and k not in names]
        with self._fig.batch_update():
            for key in missing:
                self._fig.add_scatter(x=[], y=[], name=key, row=1, col=1)
            for trace in self._fig.data:
                steps, values = data.get(trace.name, ([], []))
                trace.x, trace.y = steps, values
        self._pending = 0
        self._last_draw = now

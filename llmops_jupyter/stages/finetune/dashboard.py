"""Live training dashboard: a plotly ``FigureWidget`` (loss, eval loss, lr, tokens/s, memory) and a status line with
step, ETA, throughput, MFU (GPU; 4N FLOPs/token for LoRA), padding waste, the batching mode and attention kernel, fed by runner events — or, for detached runs, by
:class:`llmops_jupyter.stages.finetune.launch.RunWatcher` polling the registry.

Widgets are only drawn for the notebook front end; elsewhere the view is silent (the generic tqdm progress covers
the terminal). When a run ends without its static figure (interrupted / failed), the dashboard leaves a static plotly
figure in the output so saved notebooks still show the curves; finished runs return ``outputs["loss_figure"]``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from llmops_jupyter.core.runner import END_EVENTS, Event, EventType

#: Minimum seconds between figure redraws (bounds the dashboard's cost per training step).
REDRAW_S = 0.5
#: Minimum seconds between status-line updates.
STATUS_S = 0.25


def fmt_eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class TrainingDashboard:
    """Runner listener (the stage's ``live_view``). ``front_end='magic'`` draws widgets; others only collect.

    The base of every training view: metric events, widget start-up before the model loads, the throttled redraw,
    the status line and the static figure left behind by a run that did not finish. A subclass (the rl dashboard)
    sets ``progress_desc``/``end_title``, builds its own :meth:`figure` and adds widgets through :meth:`_layout`,
    other events through :meth:`_on_event` and traces that appear mid-run through :meth:`_new_traces`."""

    progress_desc = "finetune"  # the progress events this view follows (their ``desc``)
    end_title = "training"  # the static figure's title: "<end_title> (<status>)"

    def __init__(self, config: Any = None, *, front_end: str = "python",
                 display: Callable[[Any], None] | None = None, **_: Any):
        self.front_end = front_end
        self._display = display
        self.rows: list[dict[str, Any]] = []
        self._pending = 0
        self._last_draw = 0.0
        self._last_status = 0.0
        self._fig = None
        self._status = None
        self._t0: float | None = None
        self._step0 = 0
        self.done = 0.0
        self.total: float | None = None
        self.ended: str | None = None
        self.tags: dict[str, Any] = {}  # batching mode, attention kernel (sent with progress events)

    @property
    def live(self) -> bool:
        return self.front_end == "magic" and self._display is not None

    # -- events -------------------------------------------------------------------------------------------------------
    def __call__(self, event: Event) -> None:
        if event.type is EventType.METRIC:
            step = event.data.get("step")
            for key, value in event.data.get("values", {}).items():
                self.rows.append({"key": key, "value": value, "step": step, "ts": event.ts})
            self._pending += 1
            self._ensure_widgets()
            self._redraw()
        elif event.type is EventType.STARTED:
            self._ensure_widgets()  # drawn before the model loads: no widget start-up cost inside training
        elif event.type is EventType.PROGRESS and event.data.get("desc") == self.progress_desc:
            self.tags.update({k: event.data[k] for k in ("batching", "kernel", "flops_rule") if event.data.get(k)})
            self.progress(event.data.get("done") or 0, event.data.get("total"))
        elif event.type in END_EVENTS:
            self.end(str(event.type))
        else:
            self._on_event(event)

    def _on_event(self, event: Event) -> None:
        """Events the base does not draw (a subclass's hook)."""

    def figure(self, rows: list[dict[str, Any]], *, title: str | None = None) -> Any:
        """The static figure of these metric rows (the live widget starts from ``figure([])``)."""
        from llmops_jupyter.stages.finetune.plots import training_figure

        return training_figure(rows, title=title)

    def progress(self, done: float, total: float | None) -> None:
        now = time.monotonic()
        if self._t0 is None:
            self._t0, self._step0 = now, done
        self.done, self.total = done, total
        self._ensure_widgets()
        self._update_status()

    def eta_s(self) -> float | None:
        if self._t0 is None or not self.total or self.done <= self._step0:
            return None
        rate = (self.done - self._step0) / max(time.monotonic() - self._t0, 1e-9)
        return (self.total - self.done) / rate

    def end(self, status: str) -> None:
        if self.ended:
            return
        self.ended = status
        self._redraw(force=True)
        self._update_status()
        if self.live and status != "finished" and self.rows:
            self._display(self.figure(self.rows, title=f"{self.end_title} ({status})"))

    def close(self) -> None:
        self._redraw(force=True)

    # -- drawing ------------------------------------------------------------------------------------------------------
    def _ensure_widgets(self) -> None:
        if not self.live or self._fig is not None:
            return
        import ipywidgets as w
        import plotly.graph_objects as go

        self._fig = go.FigureWidget(self.figure([]))
        self._status = w.HTML(value="starting…")
        self._display(w.VBox(self._layout(self._status, self._fig)))

    def _layout(self, status: Any, fig: Any) -> list[Any]:
        """The widgets shown, top to bottom (a subclass adds its own around the status line and the figure)."""
        return [status, fig]

    def _new_traces(self, data: dict[str, Any]) -> None:
        """Add traces for keys that appeared mid-run (a subclass's hook; the training figure has all of its own)."""

    def _latest(self, key: str) -> float | None:
        for r in reversed(self.rows):
            if r["key"] == key:
                return r["value"]
        return None

    def status_text(self) -> str:
        parts = [f"step {int(self.done)}" + (f"/{int(self.total)}" if self.total else "")]
        if self.total:
            parts.append(f"{100 * self.done / self.total:.0f}%")
        if self.ended:
            parts.append(self.ended)
        else:
            parts.append(f"ETA {fmt_eta(self.eta_s())}")
        for key, label, fmt in (("loss", "loss", "{:.4f}"), ("eval_loss", "eval", "{:.4f}"),
                                ("rewards/margins", "margin", "{:+.3f}"),
                                ("tokens_per_s", "tok/s", "{:,.0f}"), ("mfu_pct", "MFU", "{:.1f}%"),
                                ("padding_pct", "padding", "{:.0f}%"), ("memory_mb", "mem MB", "{:,.0f}")):
            v = self._latest(key)
            if v is not None:
                if key == "mfu_pct" and self.tags.get("flops_rule"):
                    fmt = "{:.1f}% (" + self.tags["flops_rule"] + ")"
                parts.append(f"{label} {fmt.format(v)}")
        if self.tags.get("batching"):
            parts.append(f"batching {self.tags['batching']}"
                         + (f" · attention {self.tags['kernel']}" if self.tags.get("kernel") else ""))
        return " · ".join(parts)

    def _update_status(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._status is not None and (force or self.ended or now - self._last_status >= STATUS_S):
            self._last_status = now
            frac = (self.done / self.total) if self.total else 0.0
            self._status.value = (
                f"<div style='font-family:monospace'><progress value='{frac:.4f}' max='1' style='width:40%'>"
                f"</progress> {self.status_text()}</div>")

    def _redraw(self, force: bool = False) -> None:
        if self._fig is None or not self._pending:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < REDRAW_S:
            return
        from llmops_jupyter.stages.finetune.plots import TRAINING_PANELS, loss_panel_title, series

        data = series(self.rows)
        with self._fig.batch_update():
            self._new_traces(data)
            for trace in self._fig.data:
                steps, values = data.get(trace.name, ([], []))
                trace.x, trace.y = steps, values
            for note in self._fig.layout.annotations:  # subplot titles
                if note.text == TRAINING_PANELS[0][0]:
                    note.text = loss_panel_title(data)
        self._pending = 0
        self._last_draw = now

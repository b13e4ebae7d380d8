"""Live training dashboard: a plotly ``FigureWidget`` (loss, eval loss, lr, tokens/s, memory) and a status line with
step, ETA and throughput, fed by runner events — or, for detached runs, by polling the registry (:class:`RunWatcher`).

Widgets are only drawn for the notebook front end; elsewhere the view is silent (the generic tqdm progress covers
the terminal). When a run ends without its static figure (interrupted / failed), the dashboard leaves a static plotly
figure in the output so saved notebooks still show the curves; finished runs return ``outputs["loss_figure"]``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmops_jupyter.core.runner import Event, EventType

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
    """Runner listener (the stage's ``live_view``). ``front_end='magic'`` draws widgets; others only collect."""

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
        elif event.type is EventType.PROGRESS and event.data.get("desc") == "finetune":
            self.progress(event.data.get("done") or 0, event.data.get("total"))
        elif event.type in (EventType.FINISHED, EventType.FAILED, EventType.INTERRUPTED):
            self.end(str(event.type))

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
            from llmops_jupyter.stages.finetune.plots import training_figure

            self._display(training_figure(self.rows, title=f"training ({status})"))

    def close(self) -> None:
        self._redraw(force=True)

    # -- drawing ------------------------------------------------------------------------------------------------------
    def _ensure_widgets(self) -> None:
        if not self.live or self._fig is not None:
            return
        import ipywidgets as w
        import plotly.graph_objects as go

        from llmops_jupyter.stages.finetune.plots import training_figure

        self._fig = go.FigureWidget(training_figure([]))
        self._status = w.HTML(value="starting…")
        self._display(w.VBox([self._status, self._fig]))

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
                                ("tokens_per_s", "tok/s", "{:,.0f}"), ("memory_mb", "mem MB", "{:,.0f}")):
            v = self._latest(key)
            if v is not None:
                parts.append(f"{label} {fmt.format(v)}")
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
            for trace in self._fig.data:
                steps, values = data.get(trace.name, ([], []))
                trace.x, trace.y = steps, values
            for note in self._fig.layout.annotations:  # subplot titles
                if note.text == TRAINING_PANELS[0][0]:
                    note.text = loss_panel_title(data)
        self._pending = 0
        self._last_draw = now


class RunWatcher:
    """Re-opens the live view of a run from the registry (metrics table + the worker's progress file).

    ``follow()`` blocks until the run ends (scripts, papermill) and returns the static figure; ``start()`` polls in
    a background thread so the notebook stays usable. A run whose process died without recording an end is
    marked failed and reported.
    """

    def __init__(self, registry: Any, run_id: str, *, front_end: str = "python",
                 display: Callable[[Any], None] | None = None, poll_s: float = 1.0):
        self.registry = registry
        self.run_id = run_id
        self.poll_s = poll_s
        self.front_end = front_end
        self.display = display
        self.view = TrainingDashboard(front_end=front_end, display=display)
        self._rowid = 0
        self.status = "running"
        self.error: str | None = None
        self._thread: threading.Thread | None = None

    def poll(self) -> str:
        """One poll: new metric rows, progress, status (reaping a dead worker). Returns the run status."""
        from llmops_jupyter.stages.finetune.sft import reap_dead_run

        reap_dead_run(self.registry, self.run_id)
        rows = self.registry.query("SELECT rowid, key, value, step, ts FROM metrics WHERE run_id=? AND rowid>? "
                                   "ORDER BY rowid", (self.run_id, self._rowid))
        by_step: dict[Any, dict[str, float]] = {}
        for r in rows:
            self._rowid = r["rowid"]
            by_step.setdefault(r["step"], {})[r["key"]] = r["value"]
        for step, values in by_step.items():
            self.view(Event(EventType.METRIC, self.run_id, "finetune", {"values": values, "step": step}))
        progress = self.registry.home / "runs" / self.run_id / "progress.json"
        if progress.exists():
            try:
                p = json.loads(progress.read_text())
                self.view.progress(p.get("done") or 0, p.get("total"))
            except (ValueError, OSError):
                pass
        run = self.registry.get_run(self.run_id)
        self.status, self.error = run["status"], run["error"]
        if self.status != "running":
            self.view.end(self.status)
        return self.status

    def follow(self, timeout: float | None = None) -> Any:
        """Poll until the run ends; returns its static training figure. A dead worker raises StageError."""
        from llmops_jupyter.core.errors import StageError
        from llmops_jupyter.stages.finetune.plots import training_figure

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() == "running":
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(self.poll_s)
        if self.status == "failed":
            raise StageError(f"Run {self.run_id} failed: {self.error}",
                             fix=f"see `%llmops show {self.run_id}`; resume from its checkpoint with "
                                 f"`%llmops finetune --resume {self.run_id}`")
        return training_figure(self.registry.metric_history(self.run_id),
                               title=f"finetune {self.run_id} ({self.status})")

    def start(self) -> RunWatcher:
        def loop() -> None:
            try:
                while self.poll() == "running":
                    time.sleep(self.poll_s)
            except Exception as exc:  # noqa: BLE001 - a view thread must not raise into the kernel
                self.error = f"{type(exc).__name__}: {exc}"

        self._thread = threading.Thread(target=loop, name=f"llmops-attach-{self.run_id}", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


def progress_file(home: Path, run_id: str) -> Path:
    return Path(home) / "runs" / run_id / "progress.json"

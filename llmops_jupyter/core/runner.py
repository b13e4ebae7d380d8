"""The Runner: config → stage → events → registry. Every front end goes through :meth:`Runner.run`.

It owns what a stage must not: run status, timing, try/finally persistence, interrupt handling, staging-folder
cleanup and lineage (every output artifact gets an edge from every input the stage used). Stages only compute and
report through their :class:`RunContext`; widgets and progress bars subscribe to the events.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import gc
import hashlib
import html
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmops_jupyter.core.config import StageConfig, jsonable
from llmops_jupyter.core.env import current_notebook, environment, git_commit
from llmops_jupyter.core.errors import LlmopsError
from llmops_jupyter.core.pii import scrub_secrets
from llmops_jupyter.registry import Artifact, Registry, RunStatus

if TYPE_CHECKING:
    from llmops_jupyter.core.stage import Stage


class EventType(str, enum.Enum):
    STARTED = "started"
    PROGRESS = "progress"
    METRIC = "metric"
    ARTIFACT = "artifact"
    INPUT = "input"
    LOG = "log"
    FINISHED = "finished"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    DETACHED = "detached"  # the run goes on in another process (a detached worker); it ends here for listeners

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass
class Event:
    type: EventType
    run_id: str
    stage: str
    data: dict[str, Any]
    ts: float = dataclasses.field(default_factory=time.time)
    #: the registry the run is recorded in (set by :meth:`Runner.emit`), so listeners never have to search for it
    registry: Registry | None = dataclasses.field(default=None, repr=False, compare=False)


Listener = Callable[[Event], None]

#: Events after which this process sees no more of a run: listeners release what they hold for it.
END_EVENTS = frozenset({EventType.FINISHED, EventType.FAILED, EventType.INTERRUPTED, EventType.DETACHED})

#: What every Runner records besides the run itself: the audit log, resource sampling and automatic model cards.
#: An explicit list (like the command catalog), named ``module:attribute`` and imported when a Runner is made, so
#: ``core`` imports nothing above it and every process that runs a stage (kernel, CLI, detached worker, sweep worker,
#: Lab server) gets the same set without importing anything for its side effects.
DEFAULT_LISTENERS: tuple[str, ...] = (
    "llmops_jupyter.governance.audit:listener",
    "llmops_jupyter.governance.gpu:listener",
    "llmops_jupyter.governance.cards:auto_card_listener",
    "llmops_jupyter.pipelines.search:trial_listener",  # no-op unless the kernel runs an Optuna trial
)


_ACTIVE: dict[str, RunContext] = {}  # runs executing in this process, by id


def request_stop(run_id: str, reason: str) -> bool:
    """Ask a run executing in this process to stop early and cleanly (see :meth:`RunContext.request_stop`);
    for listeners, which see events, not contexts. Returns whether such a run is active here."""
    ctx = _ACTIVE.get(run_id)
    if ctx is not None:
        ctx.request_stop(reason)
    return ctx is not None


def default_listeners() -> list[Listener]:
    """The :data:`DEFAULT_LISTENERS`, imported."""
    import importlib

    out = []
    for ref in DEFAULT_LISTENERS:
        module, _, attr = ref.partition(":")
        out.append(getattr(importlib.import_module(module), attr))
    return out


class RunInterrupted(KeyboardInterrupt):
    """Raised (fresh, without the stage's frames) after an interrupted run was recorded and cleaned up."""

    def __init__(self, run_id: str, message: str):
        self.run_id = run_id
        super().__init__(message)


class RunContext:
    """What a stage sees of the outside world while it runs."""

    def __init__(self, runner: Runner, run_id: str, stage: str, config: StageConfig):
        self.runner = runner
        self.registry = runner.registry
        self.run_id = run_id
        self.stage = stage
        self.config = config
        self.inputs: list[Artifact] = []
        self.outputs: list[Artifact] = []
        self.summary: dict[str, Any] = {}
        self._staging: list[Path] = []
        self._metric_latest: dict[str, float] = {}
        self.handed_off: int | None = None
        self.stop_reason: str | None = None

    # -- reporting ------------------------------------------------------------------------------------------------
    def emit(self, type: EventType, **data: Any) -> None:
        self.runner.emit(Event(type, self.run_id, self.stage, data))

    def progress(self, done: float, total: float | None = None, desc: str | None = None, **extra: Any) -> None:
        self.emit(EventType.PROGRESS, done=done, total=total, desc=desc, **extra)

    def log(self, message: str) -> None:
        self.emit(EventType.LOG, message=message)

    def log_metrics(self, values: dict[str, float], step: int | None = None, *, persist: bool = True) -> None:
        clean = {k: float(v) for k, v in values.items() if v is not None}
        if persist and clean:
            self.registry.log_metrics(self.run_id, clean, step)
        self._metric_latest.update(clean)
        self.emit(EventType.METRIC, values=clean, step=step)

    def set_summary(self, **values: Any) -> None:
        self.summary.update(jsonable(values))

    def request_stop(self, reason: str) -> None:
        """Ask the stage to stop early and cleanly (listeners call this, e.g. a hyperparameter search's pruner on an
        intermediate eval loss). Stages that support it (fine-tuning) end at the next step; the run is then recorded
        with status ``pruned`` and the reason, not as failed."""
        self.stop_reason = reason

    def hand_off(self, pid: int) -> None:
        """The run continues in process ``pid`` (a detached worker): the Runner records no end for it here; that
        process records the end, or any registry reader marks the run failed once ``pid`` is gone."""
        self.registry.adopt_run(self.run_id, pid)
        self.handed_off = pid

    # -- artifacts & lineage --------------------------------------------------------------------------------------
    def staging_dir(self, prefix: str | None = None) -> Path:
        path = self.registry.staging_dir(prefix or self.stage)
        self._staging.append(path)
        return path

    def use(self, ref: str | Artifact) -> Artifact:
        """Declare an input artifact: recorded on the run and used as lineage parent of every output."""
        art = self.registry.link_input(self.run_id, ref)
        if art.hash not in {a.hash for a in self.inputs}:
            self.inputs.append(art)
            self.emit(EventType.INPUT, hash=art.hash, kind=art.kind, name=art.name, path=str(art.path))
        return art

    def save_artifact(
        self,
        path: str | Path,
        kind: str,
        *,
        name: str | None = None,
        meta: dict[str, Any] | None = None,
        inputs: list[Artifact | str] | None = None,
        relation: str | None = None,
    ) -> Artifact:
        """Store ``path`` in the content-addressed store with lineage edges from the run's inputs."""
        parents = [a.hash if isinstance(a, Artifact) else a for a in (inputs if inputs is not None else self.inputs)]
        art = self.registry.add_artifact(
            path, kind, name=name, run_id=self.run_id, meta=meta, move=True, inputs=parents,
            relation=relation or self.stage,
        )
        self.outputs.append(art)
        self.emit(EventType.ARTIFACT, hash=art.hash, kind=kind, name=name, path=str(art.path))
        return art

    def _cleanup(self) -> None:
        for path in self._staging:
            self.registry.release_staging(path)


@dataclasses.dataclass
class RunResult:
    run_id: str
    stage: str
    status: RunStatus
    params: dict[str, Any]
    metrics: dict[str, float]
    artifacts: list[Artifact]
    summary: dict[str, Any]
    outputs: dict[str, Any]
    duration_s: float
    registry_home: Path | None = None

    @property
    def artifact(self) -> Artifact | None:
        return self.artifacts[-1] if self.artifacts else None

    def __getitem__(self, key: str) -> Any:
        return self.outputs[key]

    def __repr__(self) -> str:
        parts = [f"run {self.run_id} [{self.stage}] {self.status} in {self.duration_s:.1f}s"]
        if self.metrics:
            parts.append("metrics: " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(self.metrics.items())))
        for a in self.artifacts:
            parts.append(f"artifact: {a.kind} {a.short} ({_size(a.size)}) {a.name or ''}".rstrip())
        return "\n".join(parts)

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in sorted(self.metrics.items())
        )
        arts = "".join(
            f"<li><code>{a.short}</code> {html.escape(a.kind)} {html.escape(a.name or '')} ({_size(a.size)})</li>"
            for a in self.artifacts
        )
        return (
            f"<div class='llmops-run'><b>run <code>{html.escape(self.run_id)}</code></b> "
            f"[{html.escape(self.stage)}] <b>{self.status}</b> in {self.duration_s:.1f}s"
            + (f"<table>{rows}</table>" if rows else "")
            + (f"<ul>{arts}</ul>" if arts else "")
            + "</div>"
        )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cache_key(stage: str, params: dict[str, Any], inputs: list[str]) -> str:
    blob = json.dumps({"stage": stage, "params": params, "inputs": sorted(inputs)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class Runner:
    """Executes stages. Every :class:`Event` goes to the :func:`default_listeners` (unless ``defaults=False``), then
    to the ``listeners`` passed here and those added with :meth:`subscribe` (front ends' progress views)."""

    def __init__(self, registry: Registry | None = None, listeners: list[Listener] | None = None, *,
                 defaults: bool = True):
        self.registry = registry or Registry.open()
        self.listeners: list[Listener] = [*(default_listeners() if defaults else []), *(listeners or [])]

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener) if listener in self.listeners else None

    def emit(self, event: Event) -> None:
        if event.registry is None:
            event.registry = self.registry
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception as exc:  # noqa: BLE001 - a broken view must never kill a training run
                print(f"llmops: event listener {listener!r} failed: {exc}", file=sys.stderr)

    def run(
        self,
        stage: str | type[Stage] | Stage,
        config: StageConfig | dict[str, Any] | None = None,
        *,
        name: str | None = None,
        tags: list[str] | None = None,
        parent_id: str | None = None,
        run_id: str | None = None,
        cache: bool | str = False,
        adopt: bool = False,
        **params: Any,
    ) -> RunResult:
        """Run a stage and record it.

        ``parent_id`` defaults to ``$LLMOPS_PIPELINE_RUN`` (set by the papermill glue), so stage runs made inside a
        pipeline notebook hang under that pipeline run. ``cache=True`` (or an explicit key string) reuses the
        outputs of an earlier finished run with the same cache key: a new run marked ``cached`` is recorded and
        returned without executing the stage. ``adopt=True`` continues the existing run ``run_id`` in this process
        (a detached worker taking over the run its launcher recorded) instead of recording a new one.

        SIGINT (Ctrl-C, the kernel's interrupt) and SIGTERM (``timeout``, a scheduler, ``kill``) stop the stage
        the same way: the run is recorded as ``interrupted`` with its resume hint before the process exits.
        """
        from llmops_jupyter.core.stage import get_stage

        stage_obj = get_stage(stage)() if isinstance(stage, (str, type)) else stage
        cfg_cls = stage_obj.config_cls
        if config is None or isinstance(config, dict):
            config = cfg_cls.from_dict(config or {}, **params)
        elif params:
            config = cfg_cls.from_dict({**config.to_dict(), **params})
        stage_name = stage_obj.name
        run_params = config.to_params()
        parent_id = parent_id or os.environ.get("LLMOPS_PIPELINE_RUN") or None
        key = (cache if isinstance(cache, str) else cache_key(stage_name, run_params, [])) if cache else None
        if key and not adopt:
            hit = self._from_cache(stage_name, key, run_params, name=name, tags=tags, parent_id=parent_id)
            if hit is not None:
                return hit
        if adopt:
            if not run_id:
                raise ValueError("adopt=True needs the run_id to continue")
            self.registry.adopt_run(run_id)
        else:
            run_id = self.registry.create_run(
                stage_name, run_params, name=name, notebook=current_notebook(), git_commit=git_commit(),
                env=environment(), parent_id=parent_id, tags=tags, run_id=run_id,
            )
        ctx = RunContext(self, run_id, stage_name, config)
        _ACTIVE[run_id] = ctx
        start = time.time()
        self.emit(Event(EventType.STARTED, run_id, stage_name, {"params": run_params, **({"adopted": True} if adopt
                                                                                          else {})}))
        outputs: dict[str, Any] = {}
        status = RunStatus.FAILED
        error: str | None = None
        hint = ""
        with _sigterm_interrupts() as signalled:
            try:
                from llmops_jupyter.core.capture import stage_output  # other libraries' output → the run's log

                with stage_output(ctx):
                    result = stage_obj.run(ctx)
                outputs = dict(result or {})
                status = RunStatus.FINISHED
            except KeyboardInterrupt:
                status = RunStatus.INTERRUPTED
                hint = getattr(stage_obj, "interrupt_hint", lambda _ctx: "")(ctx)
                error = (f"interrupted by {signalled[0]}" if signalled else "interrupted by user") + (
                    f". {hint}" if hint else "")
            except LlmopsError as exc:
                error = str(exc)
                raise
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                _ACTIVE.pop(run_id, None)
                ctx._cleanup()
                summary = dict(ctx.summary)
                if status is RunStatus.FINISHED and ctx.inputs:
                    summary.setdefault("inputs", [a.hash for a in ctx.inputs])
                if status is RunStatus.FINISHED and ctx.stop_reason:
                    status, error = RunStatus.PRUNED, ctx.stop_reason
                if status is RunStatus.FINISHED and ctx.handed_off:
                    status = RunStatus.RUNNING  # the worker records the end
                    if summary:
                        self.registry.update_run(run_id, summary=summary)
                    self.emit(Event(EventType.DETACHED, run_id, stage_name, {"pid": ctx.handed_off}))
                else:  # an exception's text may quote a key or a URL with a password: never store those
                    self.registry.finish_run(run_id, status, error=scrub_secrets(error) if error else None,
                                             summary=summary or None)
                if key and status is RunStatus.FINISHED:
                    self.registry.update_run(run_id, cache_key=key)
                if status in (RunStatus.FINISHED, RunStatus.PRUNED):
                    self.emit(Event(EventType.FINISHED, run_id, stage_name, {"duration_s": time.time() - start,
                                                                             "status": str(status)}))
                elif status is RunStatus.INTERRUPTED:
                    self.emit(Event(EventType.INTERRUPTED, run_id, stage_name, {"error": error}))
                elif status is RunStatus.FAILED:
                    self.emit(Event(EventType.FAILED, run_id, stage_name, {"error": error}))
        if status is RunStatus.INTERRUPTED:
            # Drop every reference to the stage and its tensors before raising a *fresh* exception, so the
            # traceback IPython keeps (sys.last_traceback) holds no model or GPU memory.
            del stage_obj, ctx, outputs
            free_memory()
            raise RunInterrupted(run_id, f"Run {run_id} interrupted and recorded as 'interrupted'. {hint}".strip())
        return RunResult(
            run_id=run_id, stage=stage_name, status=status, params=run_params,
            metrics=self.registry.metrics(run_id), artifacts=list(ctx.outputs), summary=summary, outputs=outputs,
            duration_s=time.time() - start, registry_home=self.registry.home,
        )

    def _from_cache(
        self, stage: str, key: str, params: dict[str, Any], *, name: str | None, tags: list[str] | None,
        parent_id: str | None,
    ) -> RunResult | None:
        """A finished run with this cache key whose outputs still exist → a new ``cached`` run sharing them."""
        reg = self.registry
        for row in reg.cached_runs(stage, key):
            arts = reg.run_artifacts(row["id"], "output")
            if not all(a.path.exists() for a in arts):
                continue
            metrics = reg.metrics(row["id"])
            summary = {**row["summary"], "cached_from": row["id"]}
            run_id = reg.create_run(stage, params, name=name, notebook=current_notebook(), git_commit=git_commit(),
                                    env=environment(), parent_id=parent_id, tags=tags)
            reg.link_outputs(run_id, [a.hash for a in arts])
            if metrics:
                reg.log_metrics(run_id, metrics)
            reg.finish_run(run_id, RunStatus.CACHED, summary=summary)
            reg.update_run(run_id, cache_key=key)
            self.emit(Event(EventType.STARTED, run_id, stage, {"params": params, "cached": True}))
            self.emit(Event(EventType.FINISHED, run_id, stage, {"duration_s": 0.0, "cached_from": row["id"]}))
            return RunResult(run_id=run_id, stage=stage, status=RunStatus.CACHED, params=params, metrics=metrics,
                             artifacts=arts, summary=summary, outputs={"cached_from": row["id"]}, duration_s=0.0,
                             registry_home=reg.home)
        return None


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[list[str]]:
    """While a stage runs in the main thread, SIGTERM stops it like Ctrl-C (KeyboardInterrupt), so the run is
    recorded as interrupted instead of staying 'running' after the process is gone. Yields the list that names the
    signal once one arrived."""
    got: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def on_term(signum: int, frame: Any) -> None:
        got.append(signal.Signals(signum).name)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except (ValueError, OSError):  # pragma: no cover - no signals here (embedded interpreters)
        yield got
        return
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, previous)


def free_memory() -> None:
    """Give a finished, failed or interrupted run's memory back (garbage, then the CUDA cache)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():  # pragma: no cover - GPU only
        torch.cuda.empty_cache()

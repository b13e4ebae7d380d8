"""Execute a notebook as a recorded, parameterised pipeline run (papermill on the project's kernel).

The pipeline run is an ordinary registry run of stage ``pipeline`` made through the :class:`~llmops_jupyter.core.runner.
Runner` (status, timing, interrupts, lineage come from there). The stage:

* stores the source notebook as a ``notebook`` artifact (its hash is the input hash) and declares it as input;
* injects the validated parameters after the ``parameters`` cell; secrets become ``os.environ[...]`` lookups;
* starts the kernel with ``LLMOPS_NOTEBOOK``, ``LLMOPS_PIPELINE_RUN`` and ``LLMOPS_HOME`` set, so stage runs made
  inside record the notebook and hang under this run (``parent_id``);
* saves the executed notebook as a ``notebook`` artifact, records per-cell timings from papermill's metadata, the
  child stage runs and their metrics; a failing cell or a dead kernel becomes a :class:`StageError`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmops_jupyter.core.capture import PROGRESS_FILE, VERBOSE_ENV, is_verbose, run_log_path
from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.errors import LlmopsError, StageError
from llmops_jupyter.core.files import hash_tree
from llmops_jupyter.core.runner import RunContext, Runner, RunResult, cache_key
from llmops_jupyter.core.stage import Stage
from llmops_jupyter.pipelines.params import (
    ResolvedParams,
    SecretRef,
    load_params_file,
    parameters_cell_index,
    read_notebook,
    resolve_parameters,
)
from llmops_jupyter.registry import Registry

PROJECT_KERNEL = "llmops-jupyter"


@dataclasses.dataclass
class PipelineRunConfig(StageConfig):
    """What a pipeline run records as its parameters (secrets only as ``env:VAR`` references)."""

    notebook: str = option(help="the notebook executed")
    notebook_hash: str = option("", "content hash of the source notebook")
    parameters: dict[str, Any] = option({}, "validated parameters (secrets as env:VAR)")
    input_hashes: dict[str, str] = option({}, "content hashes of files / registry refs named by parameters")
    kernel: str = option("python3", "kernel spec the notebook ran on")
    sweep: str | None = option(None, "sweep run this variant belongs to")
    variant: int | None = option(None, "index of the variant in its sweep")


PipelineRunConfig.command = "pipeline"


def choose_kernel(nb: Any, requested: str | None = None) -> str:
    """``llmops-jupyter`` when installed (``make install`` creates it), else the notebook's own, else python3."""
    if requested:
        return requested
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        specs = KernelSpecManager().find_kernel_specs()
    except Exception:  # noqa: BLE001 - no jupyter config at all: fall back to the native kernel
        specs = {}
    if PROJECT_KERNEL in specs:
        return PROJECT_KERNEL
    name = (nb.metadata.get("kernelspec") or {}).get("name")
    if name and name in specs:
        return name
    return "python3"


def _ipc_prefix() -> str | None:
    """A fresh socket path prefix in the (owner-only) Jupyter runtime dir, or None where IPC cannot be used
    (not POSIX, or a path too long for a UNIX socket): the kernel then uses TCP on localhost as usual."""
    if os.name != "posix":
        return None
    import uuid

    from jupyter_core.paths import jupyter_runtime_dir

    runtime = Path(jupyter_runtime_dir())
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    prefix = str(runtime / f"llmops-{uuid.uuid4().hex[:12]}")
    return prefix if len(prefix) + 8 < 104 else None  # sun_path holds 104-108 bytes; "-<port>" is appended


def _kernel_manager_class(extra_env: dict[str, str], log_path: Path | None = None):
    """An AsyncKernelManager that starts the kernel with ``extra_env`` on top of this process's environment, its
    client polling in short slices (:mod:`llmops_jupyter.pipelines.kernel_client`: no cell waits out a missed wake-up).

    Passing the environment to the kernel (instead of setting ``os.environ``) lets several pipelines run at once in
    threads (a Dask worker) without seeing each other's run ids or GPU pins. On POSIX the kernel talks over IPC
    sockets in the Jupyter runtime dir (owner-only) rather than TCP ports on localhost: nothing else on the machine
    can connect to a pipeline's kernel. With ``log_path`` the kernel process's own stdout/stderr (its
    ``[IPKernelApp]`` messages, C libraries' prints) go to that file instead of this process's terminal.
    """
    from llmops_jupyter.pipelines.kernel_client import SlicedPollKernelManager

    class EnvKernelManager(SlicedPollKernelManager):
        def __init__(self, **kw: Any) -> None:
            ipc = _ipc_prefix()
            if ipc is not None:  # a prefix of its own: kernels started at once in threads never share sockets
                kw.setdefault("transport", "ipc")
                kw.setdefault("ip", ipc)
            super().__init__(**kw)

        async def start_kernel(self, **kw: Any) -> None:
            env = dict(kw.pop("env", None) or os.environ)
            env.update(extra_env)
            if log_path is None:
                return await super().start_kernel(env=env, **kw)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "ab") as log:  # the kernel keeps its own copy of the descriptor
                kw.setdefault("stdout", log)
                kw.setdefault("stderr", log)
                return await super().start_kernel(env=env, **kw)

    return EnvKernelManager


def _first_line(source: str) -> str:
    for line in source.splitlines():
        if line.strip():
            return line.strip()[:80]
    return ""


def _one_line(text: str, limit: int = 300) -> str:
    """An error value as one line: a failure is reported as a single line; the detail is in the executed notebook."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    out = lines[0] if lines else ""
    if len(lines) > 1:
        out += " …"
    return out if len(out) <= limit else out[: limit - 1] + "…"


def _inject(nb: Any, params: ResolvedParams) -> tuple[Any, int]:
    """Add the ``injected-parameters`` cell after the ``parameters`` cell (or first). Returns (nb, index)."""
    import nbformat

    lines = ["# Parameters (injected by llmops)"]
    for name, value in sorted(params.plain.items()):
        lines.append(f"{name} = {value!r}")
    for name, ref in sorted(params.secrets.items()):
        lines.append(f"{name} = __import__('os').environ[{ref.var!r}]  # secret: passed by environment reference")
    cell = nbformat.v4.new_code_cell("\n".join(lines))
    cell.metadata["tags"] = ["injected-parameters"]
    cells = [c for c in nb.cells if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    idx = parameters_cell_index(nb)
    pos = idx + 1 if idx >= 0 else 0
    nb.cells = cells[:pos] + [cell] + cells[pos:]
    return nb, pos


def _scrub(path: Path, secrets: list[str]) -> None:
    """Belt and braces: should a cell print a secret, it never reaches the stored notebook."""
    secrets = [s for s in secrets if s and len(s) >= 4]
    if not secrets or not path.exists():
        return
    text = path.read_text(encoding="utf-8")
    clean = text
    for s in secrets:
        clean = clean.replace(s, "***").replace(json.dumps(s)[1:-1], "***")
    if clean != text:
        path.write_text(clean, encoding="utf-8")


def input_hashes(values: dict[str, Any], registry: Registry, base: Path) -> dict[str, str]:
    """Hashes of the inputs parameters name: existing files/folders and moving registry refs (``x@latest``)."""
    out: dict[str, str] = {}
    for name, value in values.items():
        if not isinstance(value, str) or not value or "\n" in value or len(value) > 4096:
            continue
        p = Path(value).expanduser()
        p = p if p.is_absolute() else base / p
        try:
            if p.exists():
                out[name] = hash_tree(p)
                continue
        except OSError:
            continue
        if value.endswith(("@latest", ":latest")):
            try:
                out[name] = registry.get_artifact(value).hash
            except LlmopsError:
                continue
    return out


class _ProgressSink(io.TextIOBase):
    """papermill drives a tqdm bar per executed cell; this file-like sink turns its lines into PROGRESS events."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    def write(self, text: str) -> int:
        for line in text.replace("\r", "\n").splitlines():
            parts = line.strip().split()
            if len(parts) == 3 and parts[0] == "cells" and parts[1].isdigit():
                total = int(parts[2]) if parts[2].isdigit() else None
                self.ctx.progress(int(parts[1]), total, "cells")
        return len(text)


def _cell_progress(ctx: RunContext) -> dict[str, Any]:
    return {"file": _ProgressSink(ctx), "mininterval": 0, "bar_format": "cells {n} {total}\n"}


class PipelineWatch:
    """Reports the stage runs a pipeline notebook makes while its kernel works: a line when one starts or ends, and
    a progress line (step/total, %, latest loss, ETA) at most every ``every`` seconds per run, read from the registry
    and each run's ``progress.json`` (kept by the Runner in the kernel). ``$LLMOPS_PROGRESS_EVERY`` sets the rate.
    """

    def __init__(self, registry: Registry, run_id: str, out: Callable[[str], None], *, every: float | None = None,
                 poll: float = 1.0):
        if every is None:
            try:
                every = float(os.environ.get("LLMOPS_PROGRESS_EVERY", "") or 5.0)
            except ValueError:
                every = 5.0
        self.registry = registry
        self.run_id = run_id
        self.out = out
        self.every = every
        self.poll_s = min(poll, max(every, 0.1))
        self.t0 = time.time()
        self._status: dict[str, str] = {}
        self._printed: dict[str, tuple[float, Any]] = {}  # run id → (when, done) of the last progress line
        self._first: dict[str, tuple[float, float]] = {}  # run id → (ts, done) of the first progress seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"llmops-watch-{run_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.poll()  # the runs that ended since the last poll

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def _line(self, text: str) -> None:
        try:
            self.out(f"  [{_clock(time.time() - self.t0)}] {text}")
        except Exception:  # noqa: BLE001 - a closed stdout must not stop the pipeline
            pass

    def poll(self) -> None:
        try:
            children = self.registry.child_runs(self.run_id)
        except Exception:  # noqa: BLE001 - the registry may be busy (another writer): next tick
            return
        for run in children:
            rid, stage, status = run["id"], run["stage"], run["status"]
            before = self._status.get(rid)
            if before is None:
                self._line(f"{stage:<9} {rid:<18} started")
            if status == "running":
                self._progress(rid, stage)
            elif before != status:
                self._progress(rid, stage, final=True)
                took = f" in {_clock(run['duration_s'])}" if run.get("duration_s") else ""
                error = f": {_one_line(run['error'], 160)}" if run.get("error") else ""
                self._line(f"{stage:<9} {rid:<18} {status}{took}{error}")
            self._status[rid] = status

    def _progress(self, rid: str, stage: str, *, final: bool = False) -> None:
        path = Path(self.registry.home) / "runs" / rid / PROGRESS_FILE
        try:
            p = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        done, total = p.get("done"), p.get("total")
        if done is None:
            return
        now = time.time()
        self._first.setdefault(rid, (float(p.get("ts") or now), float(done)))
        last = self._printed.get(rid)
        if last is not None and (last[1] == done or (not final and now - last[0] < self.every)):
            return
        self._printed[rid] = (now, done)
        parts = [f"{stage:<9} {rid:<18}", f"step {done:g}/{total:g}" if total else f"step {done:g}"]
        if total:
            parts.append(f"{100.0 * float(done) / float(total):3.0f}%")
        loss = self._loss(rid)
        if loss is not None:
            parts.append(f"loss {loss:.4g}")
        t_first, d_first = self._first[rid]
        if total and float(done) > d_first and float(done) < float(total):
            rate = (float(done) - d_first) / max(float(p.get("ts") or now) - t_first, 1e-6)
            parts.append(f"ETA {_clock((float(total) - float(done)) / rate)}")
        if p.get("desc") and p["desc"] != stage:
            parts.append(f"({p['desc']})")
        self._line(" ".join(parts))

    def _loss(self, rid: str) -> float | None:
        try:
            metrics = self.registry.metrics(rid)
        except Exception:  # noqa: BLE001
            return None
        for key in ("loss", "train_loss", "train/loss"):
            if metrics.get(key) is not None:
                return metrics[key]
        return next((v for k, v in metrics.items() if k.endswith("loss") and v is not None), None)


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


class PipelineStage(Stage):
    """Runs one notebook through papermill (not registered as a command: ``run``/``pipeline run`` drive it)."""

    name = "pipeline"
    config_cls = PipelineRunConfig

    def __init__(self, source: Path, params: ResolvedParams, *, cwd: Path, timeout: int | None = None,
                 env: dict[str, str] | None = None, source_env: dict[str, str] | None = None,
                 progress: Callable[[str], None] | None = None, progress_every: float | None = None):
        self.source = source
        self.params = params
        self.cwd = cwd
        self.timeout = timeout
        self.env = dict(env or {})
        self.source_env = source_env if source_env is not None else os.environ
        self.progress = progress
        self.progress_every = progress_every

    def run(self, ctx: RunContext) -> dict[str, Any]:
        import papermill
        from nbclient.exceptions import CellTimeoutError, DeadKernelError
        from papermill.exceptions import PapermillExecutionError

        cfg: PipelineRunConfig = ctx.config
        reg = ctx.registry
        src_art = ctx.use(reg.add_artifact(self.source, "notebook", name=self.source.name,
                                           meta={"role": "source", "path": str(self.source)}))
        reg.update_run(ctx.run_id, notebook=str(self.source))
        nb = read_notebook(self.source)
        nb, injected = _inject(nb, self.params)
        nb.metadata["llmops"] = {"pipeline_run": ctx.run_id, "parameters": self.params.record,
                                 "source_hash": src_art.hash}
        secrets = {ref.var: ref.value(self.source_env) for ref in self.params.secrets.values()}
        verbose = is_verbose()
        env = {
            **self.env,
            **secrets,
            "LLMOPS_NOTEBOOK": str(self.source),
            "LLMOPS_PIPELINE_RUN": ctx.run_id,
            "LLMOPS_HOME": str(reg.home),
            **({VERBOSE_ENV: "1"} if verbose else {}),
        }
        out_dir = ctx.staging_dir("notebook")
        out_path = out_dir / f"{self.source.stem}.out.ipynb"
        ctx.log(f"executing {self.source.name} on kernel '{cfg.kernel}'")
        error: StageError | None = None
        kernel_log = None if verbose else run_log_path(reg.home, ctx.run_id)
        watch = None
        if self.progress is not None:
            watch = PipelineWatch(reg, ctx.run_id, self.progress, every=self.progress_every)
            watch.start()
        try:
            _fresh_context(lambda: papermill.execute_notebook(
                nb, str(out_path), kernel_name=cfg.kernel, cwd=str(self.cwd), progress_bar=_cell_progress(ctx),
                log_output=False, request_save_on_cell_execute=True, execution_timeout=self.timeout,
                kernel_manager_class=_kernel_manager_class(env, kernel_log),
            ))
        except PapermillExecutionError as exc:
            idx = exc.cell_index - (1 if exc.cell_index > injected else 0)
            value = _one_line(_scrub_text(str(exc.evalue), secrets.values()))
            error = StageError(
                f"Notebook {self.source.name} failed in cell {idx} (`{_first_line(exc.source)}`): "
                f"{exc.ename}: {value}",
                fix=f"see the executed notebook (`%llmops show {ctx.run_id}`), fix the cell and run again")
        except CellTimeoutError:
            idx, line = _running_cell(out_path, injected)
            where = f"cell {idx} (`{line}`)" if idx is not None else "a cell"
            error = StageError(
                f"Notebook {self.source.name} timed out in {where}: it ran longer than --timeout {self.timeout}s.",
                fix=f"raise --timeout (or drop it), or make the cell faster; the executed notebook "
                    f"(`%llmops show {ctx.run_id}`) shows where it stopped")
        except DeadKernelError:
            idx, line = _running_cell(out_path, injected)
            where = f" while running cell {idx} (`{line}`)" if idx is not None else ""
            error = StageError(
                f"The kernel of {self.source.name} died{where}.",
                fix="the process was killed or exited (out of memory? os._exit?); check memory with "
                    "`%llmops plan` and run again")
        except RuntimeError as exc:  # papermill/nbclient report a kernel that cannot start this way
            if "kernel" not in str(exc).lower():
                raise
            error = StageError(f"The kernel '{cfg.kernel}' for {self.source.name} failed: {_one_line(str(exc))}",
                               fix="check `jupyter kernelspec list`; `make install` creates 'llmops-jupyter'")
        finally:
            if watch is not None:
                watch.stop()
        cells = _cell_timings(out_path, injected)
        children = _children(reg, ctx.run_id)
        summary: dict[str, Any] = {"notebook": str(self.source), "notebook_artifact": src_art.hash, "kernel": cfg.kernel,
                                   "cells": cells, "children": children,
                                   "duration_cells_s": round(sum(c["duration_s"] or 0 for c in cells), 3)}
        out_art = None
        if out_path.exists():
            _scrub(out_path, list(secrets.values()))
            out_art = ctx.save_artifact(out_dir, "notebook", name=out_path.name,
                                        meta={"role": "output", "source": src_art.hash, "file": out_path.name})
            summary["output_notebook"] = out_art.hash
        _copy_child_metrics(ctx, children)
        ctx.set_summary(**summary)
        if error is not None:
            raise error
        return {"notebook": out_art.file(out_path.name) if out_art else None, "cells": cells}


def _fresh_context(fn: Any) -> Any:
    """Run ``fn`` in an empty contextvars context with its own event loop, closed afterwards.

    jupyter_core keeps "the event loop of this thread" in a ContextVar; thread pools (Dask workers) copy the
    submitter's context, so two variants in two threads would share - and collide on - one loop.
    """
    import contextvars

    def call() -> Any:
        try:
            return fn()
        finally:
            try:
                from jupyter_core.utils import _loop

                loop = _loop.get()
                if loop is not None and not loop.is_running() and not loop.is_closed():
                    loop.close()
            except Exception:  # noqa: BLE001 - private helper moved: leave the loop to the GC
                pass

    return contextvars.Context().run(call)


def _scrub_text(text: str, secrets: Any) -> str:
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, "***")
    return text


def _read_out(out_path: Path):
    if not out_path.exists():
        return None
    try:
        import nbformat

        return nbformat.read(out_path, as_version=4)
    except Exception:  # noqa: BLE001 - half-written notebook of a dead kernel
        return None


def _running_cell(out_path: Path, injected: int) -> tuple[int | None, str]:
    """The cell a dead kernel was running: papermill saved it with a start time (the last one that has one)."""
    nb = _read_out(out_path)
    if nb is None:
        return None, ""
    started = [i for i, c in enumerate(nb.cells) if c.get("metadata", {}).get("papermill", {}).get("start_time")]
    if not started:
        return None, ""
    i = started[-1]
    return i - (1 if i > injected else 0), _first_line(nb.cells[i].source)


def _cell_timings(out_path: Path, injected: int) -> list[dict[str, Any]]:
    nb = _read_out(out_path)
    if nb is None:
        return []
    rows = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        pm = cell.get("metadata", {}).get("papermill", {})
        source_index = None if i == injected else i - (1 if i > injected else 0)
        rows.append({"index": source_index, "first_line": _first_line(cell.source),
                     "duration_s": pm.get("duration"), "status": pm.get("status"),
                     "injected": i == injected})
    return rows


def _children(reg: Registry, run_id: str) -> list[dict[str, Any]]:
    return [{"id": r["id"], "stage": r["stage"], "status": r["status"]} for r in reg.child_runs(run_id)]


def _copy_child_metrics(ctx: RunContext, children: list[dict[str, Any]]) -> None:
    """The pipeline run carries its stages' final metrics (``key``, or ``stage.key`` when two stages share it)."""
    reg = ctx.registry
    per_stage: dict[str, dict[str, float]] = {}
    for child in children:
        per_stage.setdefault(child["stage"], {}).update(
            {k: v for k, v in reg.metrics(child["id"]).items() if v is not None})
    counts: dict[str, int] = {}
    for metrics in per_stage.values():
        for k in metrics:
            counts[k] = counts.get(k, 0) + 1
    own = reg.metrics(ctx.run_id)
    values = {}
    for stage, metrics in per_stage.items():
        for k, v in metrics.items():
            key = k if counts[k] == 1 else f"{stage}.{k}"
            if key not in own:
                values[key] = v
    if values:
        ctx.log_metrics(values)


# -- the public entry point ---------------------------------------------------------------------------------------
def gather_params(pairs: dict[str, Any] | None = None, file: str | os.PathLike | None = None) -> dict[str, Any]:
    """``-f params.yaml`` first, ``-p`` pairs on top."""
    out: dict[str, Any] = {}
    if file:
        out.update(load_params_file(file))
    out.update(pairs or {})
    return out


def prepare(notebook: str | os.PathLike, parameters: dict[str, Any] | None, *, registry: Registry,
            env: dict[str, str] | None = None):
    """Validate everything a pipeline run needs; no kernel is started here."""
    source = Path(notebook).expanduser().resolve()
    nb = read_notebook(source)
    src_env = {**os.environ, **(env or {})}
    params = resolve_parameters(nb, parameters, path=source.name, env=src_env)
    return source, nb, params, src_env


def run_pipeline(
    notebook: str | os.PathLike,
    parameters: dict[str, Any] | None = None,
    *,
    registry: Registry | None = None,
    cache: bool = True,
    name: str | None = None,
    parent_id: str | None = None,
    sweep: str | None = None,
    variant: int | None = None,
    env: dict[str, str] | None = None,
    kernel: str | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: int | None = None,
    tags: list[str] | None = None,
    listeners: list | None = None,
    progress: Callable[[str], None] | None = None,
    progress_every: float | None = None,
) -> RunResult:
    """Validate ``parameters`` against ``notebook`` (before any kernel starts), execute it, record the run.

    ``env`` adds environment variables for the kernel (e.g. ``CUDA_VISIBLE_DEVICES``); secrets are given as
    ``"env:VAR"`` values. ``cache=True`` returns the earlier run when the notebook, parameters and the files they
    name are unchanged (the result's status is ``cached``). ``progress`` (e.g. ``print``) gets a line per stage run
    start/end and per progress step of the notebook's stages, at most every ``progress_every`` seconds (default 5,
    or ``$LLMOPS_PROGRESS_EVERY``); see :class:`PipelineWatch`.
    """
    registry = registry or Registry.open()
    source, nb, params, src_env = prepare(notebook, parameters, registry=registry, env=env)
    if params.note:  # papermill runs such a cell; say once which lines gave no parameter
        print(f"llmops: note: {params.note}", file=sys.stderr, flush=True)
    kernel_name = choose_kernel(nb, kernel)
    work = Path(cwd).resolve() if cwd else source.parent
    from llmops_jupyter.core.files import sha256_file

    hashes = input_hashes(params.plain, registry, work)
    config = PipelineRunConfig(notebook=str(source), notebook_hash=sha256_file(source), parameters=params.record,
                               input_hashes=hashes, kernel=kernel_name, sweep=sweep, variant=variant)
    # GPU pins and run ids are not inputs: a variant that ran on another GPU is still the same computation.
    key = cache_key("pipeline", {"notebook": config.notebook_hash, "parameters": params.record, "inputs": hashes}, [])
    stage = PipelineStage(source, params, cwd=work, timeout=timeout, env=env, source_env=src_env, progress=progress,
                          progress_every=progress_every)
    runner = Runner(registry, listeners=listeners)
    return runner.run(stage, config, name=name, parent_id=parent_id, tags=tags, cache=key if cache else False)


__all__ = ["PipelineRunConfig", "PipelineStage", "SecretRef", "choose_kernel", "gather_params", "prepare",
           "run_pipeline"]


def rerun_pipeline(ref: str, *, registry: Registry | None = None, rtol: float = 1e-6, atol: float = 1e-9,
                   kernel: str | None = None) -> tuple[RunResult, list[dict[str, Any]], bool]:
    """Re-execute a recorded pipeline run with its exact notebook (the stored copy) and parameters, never cached.

    Returns the new run, one row per metric (original, new, match) and whether all metrics match within tolerance.
    """
    import math

    from llmops_jupyter.core.errors import NotFoundError

    registry = registry or Registry.open()
    run = registry.get_run(ref)
    if run["stage"] != "pipeline":
        raise NotFoundError(f"Run '{run['id']}' is a {run['stage']} run, not a pipeline run.",
                            fix="pass a run listed by `%llmops runs --stage pipeline`")
    sources = [a for a in registry.run_artifacts(run["id"], "input") if a.kind == "notebook"]
    if not sources:
        raise NotFoundError(f"Pipeline run '{run['id']}' has no recorded source notebook.",
                            fix="re-run it with `llmops run` to record one")
    src = sources[0]
    files = sorted(src.path.glob("*.ipynb")) if src.path.is_dir() else [src.path]
    if not files:
        raise NotFoundError(f"The stored notebook of run '{run['id']}' is missing from {src.path}.")
    original = Path(run["params"].get("notebook") or files[0])
    cwd = original.parent if original.parent.exists() else files[0].parent
    new = run_pipeline(files[0], run["params"].get("parameters") or {}, registry=registry, cache=False,
                       name=f"rerun of {run['id']}", cwd=cwd, kernel=kernel or run["params"].get("kernel"),
                       tags=[f"rerun:{run['id']}"])
    old_m = registry.metrics(run["id"])
    rows, ok = [], True
    for key in sorted(set(old_m) | set(new.metrics)):
        a, b = old_m.get(key), new.metrics.get(key)
        match = a is not None and b is not None and math.isclose(a, b, rel_tol=rtol, abs_tol=atol)
        ok = ok and match
        rows.append({"metric": key, "original": a, "rerun": b,
                     "diff": (b - a) if a is not None and b is not None else None, "match": match})
    registry.update_run(new.run_id, summary={**new.summary, "rerun_of": run["id"], "metrics_match": ok,
                                             "rtol": rtol, "atol": atol})
    return new, rows, ok

"""Out-of-kernel training for ``%llmops finetune`` and ``%llmops rl``: detached runs, ``accelerate launch`` ranks,
``%llmops attach``.

Entry points of the worker processes:

``python -m llmops_jupyter.stages.finetune.launch run --home H --run-id R --config JSON [--stage rl]``
    a detached run: takes over run ``R`` that ``%llmops finetune --detach`` (or ``rl --detach``) recorded (one
    training, one run), executes the stage through the Runner, and keeps ``runs/R/progress.json`` current for
    ``%llmops attach``. SIGINT/SIGTERM stop it like Ctrl-C (recorded as interrupted, with its last checkpoint).

``python -m llmops_jupyter.stages.finetune.launch train --spec FILE``
    one rank under ``accelerate launch``: trains, rank 0 reports through the events file named in the spec.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmops_jupyter.core.capture import PROGRESS_FILE
from llmops_jupyter.core.env import pid_alive, process_gone
from llmops_jupyter.core.errors import NotFoundError, ResourceError, StageError
from llmops_jupyter.core.files import atomic_write_json
from llmops_jupyter.core.runner import Event, EventType
from llmops_jupyter.stages.finetune.dashboard import TrainingDashboard
from llmops_jupyter.stages.finetune.train import Reporter, TrainOutput, run_dir

if TYPE_CHECKING:
    from llmops_jupyter.core.runner import RunContext
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.stages.finetune.config import AttachConfig, FinetuneConfig

import argparse


def _interrupt(signum, frame):  # SIGTERM behaves like Ctrl-C: stop cleanly, keep the checkpoint
    raise KeyboardInterrupt


def run_detached(home: str, run_id: str, params: dict, stage: str = "finetune") -> int:
    os.environ["LLMOPS_HOME"] = home
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.registry import Registry

    # The Runner keeps runs/<run>/progress.json current while the stage runs (core.capture), as in any process.
    try:
        Runner(Registry(home)).run(stage, params, run_id=run_id, adopt=True)
    except KeyboardInterrupt:
        return 130
    return 0


def train_rank(spec_path: str) -> int:
    from llmops_jupyter.stages.data.format import Dataset
    from llmops_jupyter.stages.finetune.config import FinetuneConfig
    from llmops_jupyter.stages.finetune.sft import train

    spec = json.loads(Path(spec_path).read_text())
    cfg = FinetuneConfig.from_dict({**spec["config"], "launcher": "none", "num_processes": 1, "detach": False,
                                    "resume": None})
    data = Dataset(Path(spec["data_path"]))
    reporter = FileReporter(Path(spec["events"]), stop_file=Path(spec["stop_file"]) if spec.get("stop_file") else None)
    out = train(cfg, Path(spec["model_path"]), data.train, data.eval, Path(spec["out_dir"]), reporter,
                resume_from=Path(spec["resume_from"]) if spec.get("resume_from") else None,
                adapter_dir=Path(spec["adapter_dir"]), model_ref=spec["config"].get("model", ""))
    reporter._write(type="result", metrics=out.metrics, info=out.info)
    return 0


def accelerate_command(num_processes: int, spec: Path, *, cpu: bool, port: int | None = None) -> list[str]:
    """``accelerate launch`` command line for the training worker (one process per device).

    More than one process always goes through accelerate's distributed launcher (``--multi_gpu``, i.e.
    ``torch.distributed.run``): with ``--cpu`` accelerate falls back to a single process, while the distributed
    launcher on a CPU-only machine runs the ranks with the gloo backend (how the CPU test runs 2 processes).
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes > 1:
        cmd += ["--multi_gpu", "--main_process_port", str(port or _free_port())]
    elif cpu:
        cmd.append("--cpu")
    return [*cmd, "-m", "llmops_jupyter.stages.finetune.launch", "train", "--spec", str(spec)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FileReporter:
    """Reporter for worker processes: appends JSON events to a file the parent relays (rank 0 only).

    A stop request (a search's pruner, :func:`llmops_jupyter.core.runner.request_stop`) reaches the parent's run
    context; the parent then writes ``stop_file``. :meth:`poll_stop` (called by the training callback after every
    step) looks for it, agreed across ranks, so every rank ends at the same step and none waits in a collective
    for a rank that stopped."""

    def __init__(self, path: Path, stop_file: Path | None = None):
        self.path = path
        self.stop_file = stop_file
        self.stop_reason: str | None = None
        self.rank0 = int(os.environ.get("RANK", 0)) == 0

    def poll_stop(self) -> str | None:
        if self.stop_reason is not None or self.stop_file is None:
            return self.stop_reason
        seen = self.stop_file.exists()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([int(seen)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            seen = bool(flag.item())
        if seen:
            try:
                self.stop_reason = self.stop_file.read_text(encoding="utf-8").strip() or "stop requested"
            except OSError:
                self.stop_reason = "stop requested"
        return self.stop_reason

    def _write(self, **event: Any) -> None:
        if self.rank0:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(event) + "\n")

    def progress(self, done: float, total: float | None = None, desc: str | None = None, **extra: Any) -> None:
        self._write(type="progress", done=done, total=total, desc=desc)

    def log_metrics(self, values: dict[str, float], step: int | None = None) -> None:
        self._write(type="metrics", values=values, step=step)

    def log(self, message: str) -> None:
        self._write(type="log", message=message)


def relay_events(path: Path, offset: int, ctx: Reporter) -> int:
    """Forward new complete lines of a worker's events file to ``ctx``; returns the new offset."""
    if not path.exists():
        return offset
    with open(path, encoding="utf-8") as fh:
        fh.seek(offset)
        while True:
            line = fh.readline()
            if not line.endswith("\n"):
                break
            offset += len(line.encode())
            ev = json.loads(line)
            if ev["type"] == "progress":
                ctx.progress(ev["done"], ev.get("total"), ev.get("desc"))
            elif ev["type"] == "metrics":
                ctx.log_metrics(ev["values"], ev.get("step"))
            elif ev["type"] == "log":
                ctx.log(ev["message"])
            elif ev["type"] == "result":
                return -offset - 1  # sentinel: result line reached (never negative otherwise)
    return offset


def run_accelerate(ctx: RunContext, cfg: FinetuneConfig, model_path: Path, data_path: Path, folder: Path,
                   adapter_dir: Path, resume_ckpt: Path | None) -> TrainOutput:
    """Train under ``accelerate launch``; relay rank 0's events to the run while waiting."""
    import torch

    events = folder / "events.jsonl"
    events.unlink(missing_ok=True)
    stop_file = folder / "stop-request"
    stop_file.unlink(missing_ok=True)
    spec = folder / "accelerate-spec.json"
    atomic_write_json(spec, {"config": cfg.to_params(), "model_path": str(model_path), "data_path": str(data_path),
                             "out_dir": str(folder / "checkpoints"), "adapter_dir": str(adapter_dir),
                             "resume_from": str(resume_ckpt) if resume_ckpt else None, "events": str(events),
                             "stop_file": str(stop_file)})
    cmd = accelerate_command(cfg.num_processes, spec, cpu=not torch.cuda.is_available())
    ctx.log("launch: " + " ".join(cmd))
    log = folder / "accelerate.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    offset, result = 0, None
    try:
        while True:
            rc = proc.poll()
            new = relay_events(events, offset, ctx)
            if new < 0:
                result = _read_result(events)
                offset = -new - 1
            else:
                offset = new
            if rc is not None:
                break
            if ctx.stop_reason and not stop_file.exists():  # a listener asked to stop: the ranks end at a step
                ctx.log(f"stop requested: {ctx.stop_reason}; the workers end after their current step")
                stop_file.write_text(ctx.stop_reason, encoding="utf-8")
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.25)
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait()
        raise
    if proc.returncode != 0 or result is None:
        tail = log.read_text(errors="replace")[-1500:]
        if "OutOfMemoryError" in tail:
            raise ResourceError(f"A worker ran out of GPU memory (see {log}).",
                                fix=f"run `%llmops plan --model {cfg.model}`; lower --batch-size or --seq-len")
        raise StageError(f"accelerate launch exited with code {proc.returncode}: ...{tail[-600:]}",
                         fix=f"see the full log at {log}")
    return TrainOutput(adapter_dir, result["metrics"], result["info"])


def _read_result(events: Path) -> dict[str, Any] | None:
    for line in events.read_text(encoding="utf-8").splitlines():
        ev = json.loads(line)
        if ev["type"] == "result":
            return ev
    return None


def worker_command(home: Path, run_id: str, params: dict[str, Any], stage: str = "finetune") -> list[str]:
    return [sys.executable, "-m", "llmops_jupyter.stages.finetune.launch", "run", "--home", str(home),
            "--run-id", run_id, "--config", json.dumps(params), "--stage", stage]


def launch_detached(ctx: RunContext, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hand this run to a worker process (one training, one run), supervised by a thread that records its death.
    ``params`` (default: the run's config without ``detach``) are what the worker's stage config is built from."""
    params = params if params is not None else {**ctx.config.to_params(), "detach": False}
    folder = run_dir(ctx.registry, ctx.run_id)
    log = folder / "worker.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as fh:  # the worker starts in this process's directory: modules beside the notebook import
        proc = subprocess.Popen(worker_command(ctx.registry.home, ctx.run_id, params, ctx.stage), stdout=fh,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    ctx.hand_off(proc.pid)
    handle = DetachedRun(ctx.registry.home, ctx.run_id, proc.pid, log, proc, stage=ctx.stage)
    threading.Thread(target=handle._supervise, name=f"llmops-supervise-{ctx.run_id}", daemon=True).start()
    ctx.log(f"detached: run {ctx.run_id} continues in worker pid {proc.pid} (log: {log})")
    return {"run": handle}


def reap_dead_run(registry: Registry, run_id: str, *, returncode: int | None = None, log: Path | None = None,
                  stage: str = "finetune") -> bool:
    """If ``run_id`` is still 'running' but its process is gone, mark it failed with why. Returns True if so."""
    from llmops_jupyter.registry import RunStatus

    try:
        run = registry.get_run(run_id, check=False)  # this function says why, with the exit code when known
    except NotFoundError:
        run = None
    if run is not None and run["status"] != RunStatus.RUNNING.value:
        return False
    if run is not None and returncode is None:
        if not process_gone(run["pid"], run["host"], run.get("proc_start")):
            return False
    how = (f"killed by signal {signal.Signals(-returncode).name}" if returncode is not None and returncode < 0
           else f"exited with code {returncode}" if returncode is not None else "is gone")
    where = f"; see {log}" if log else ""
    error = f"worker process {how} before the run finished{where}"
    if run is None:
        registry.create_run(stage, {}, run_id=run_id, status=RunStatus.FAILED)
    registry.finish_run(run_id, RunStatus.FAILED, error=error)
    return True


class DetachedRun:
    """Handle on a detached training run (finetune, rl): ``wait()``, ``stop()``; displays as its live view in a
    notebook."""

    def __init__(self, home: Path, run_id: str, pid: int, log: Path, proc: subprocess.Popen | None = None, *,
                 stage: str = "finetune"):
        self.home, self.run_id, self.pid, self.log, self.proc = Path(home), run_id, pid, log, proc
        self.stage = stage
        self._done = threading.Event()

    def _registry(self) -> Registry:
        from llmops_jupyter.registry import Registry

        return Registry.open(self.home)

    def _supervise(self) -> None:
        rc = self.proc.wait()
        try:
            reap_dead_run(self._registry(), self.run_id, returncode=rc, log=self.log, stage=self.stage)
        finally:
            self._done.set()

    def status(self) -> str:
        try:
            return self._registry().get_run(self.run_id)["status"]
        except NotFoundError:
            return "starting"

    def wait(self, timeout: float | None = None, poll_s: float = 0.5) -> dict[str, Any]:
        """Block until the run ends; raise :class:`StageError` if it failed (e.g. the worker died)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.proc is None:
                reap_dead_run(self._registry(), self.run_id, log=self.log)
            if self.proc is None or self._done.is_set():
                st = self.status()
                if st not in ("running", "starting"):
                    break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {self.run_id} still {self.status()} after {timeout}s")
            time.sleep(poll_s)
        run = self._registry().get_run(self.run_id)
        if run["status"] == "failed":
            raise StageError(f"Detached run {self.run_id} failed: {run['error']}", fix=f"see {self.log}")
        return run

    def stop(self) -> None:
        """Interrupt the worker like Ctrl-C: it records 'interrupted' and keeps its last checkpoint."""
        if pid_alive(self.pid):
            os.kill(self.pid, signal.SIGINT)

    def __repr__(self) -> str:
        return (f"detached {self.stage} run {self.run_id} (worker pid {self.pid}); watch it with "
                f"`%llmops attach {self.run_id}`, log: {self.log}")

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(repr(self))
        RunWatcher(self._registry(), self.run_id, front_end="magic", display=display).start()


def attach_run(cfg: AttachConfig, env: Any) -> Any:
    """Body of ``%llmops attach``: stop, wait (scripts) or live background view (notebooks)."""
    run = env.registry.get_run(cfg.run)
    if cfg.stop:
        if run["status"] != "running" or not pid_alive(run["pid"]) or run["host"] != os.uname().nodename:
            raise StageError(f"Run {run['id']} is not running on this machine (status {run['status']}).",
                             fix="nothing to stop; `%llmops runs` shows run states")
        os.kill(run["pid"], signal.SIGINT)
        return f"asked run {run['id']} (pid {run['pid']}) to stop; it keeps its last checkpoint"
    watcher = RunWatcher(env.registry, run["id"], front_end=env.front_end, display=env.display, poll_s=cfg.poll_s)
    if env.front_end == "cli":  # a terminal gets the final numbers, not a figure's JSON
        from llmops_jupyter.core.display import Table

        watcher.follow()
        metrics = env.registry.metrics(run["id"])
        return Table(["metric", "value"], sorted(metrics.items()), title=f"run {run['id']}: {watcher.status}")
    if cfg.wait or env.front_end != "magic":
        return watcher.follow()
    watcher.start()
    return None


def watch_view(stage: str, **kw: Any) -> TrainingDashboard:
    """The live view of a ``stage`` run (its catalog ``live_view``: the rl dashboard for rl runs), fed by polling."""
    import importlib

    from llmops_jupyter.core.stage import get_stage

    try:
        module, _, attr = (get_stage(stage).live_view or "").partition(":")
        cls = getattr(importlib.import_module(module), attr) if module else TrainingDashboard
    except Exception:  # noqa: BLE001 - an unknown or unavailable stage is watched as a training run
        cls = TrainingDashboard
    return cls(**kw) if isinstance(cls, type) and issubclass(cls, TrainingDashboard) else TrainingDashboard(**kw)


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
        self.stage = registry.get_run(run_id)["stage"]
        self.view = watch_view(self.stage, front_end=front_end, display=display)
        self._rowid = 0
        self.status = "running"
        self.error: str | None = None
        self._thread: threading.Thread | None = None

    def poll(self) -> str:
        """One poll: new metric rows, progress, status (reaping a dead worker). Returns the run status."""
        reap_dead_run(self.registry, self.run_id)
        rows = self.registry.metric_rows_after(self.run_id, self._rowid)
        by_step: dict[Any, dict[str, float]] = {}
        for r in rows:
            self._rowid = r["rowid"]
            by_step.setdefault(r["step"], {})[r["key"]] = r["value"]
        for step, values in by_step.items():
            self.view(Event(EventType.METRIC, self.run_id, self.stage, {"values": values, "step": step}))
        progress = run_dir(self.registry, self.run_id) / PROGRESS_FILE
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

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() == "running":
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(self.poll_s)
        if self.status == "failed":
            raise StageError(f"Run {self.run_id} failed: {self.error}",
                             fix=f"see `%llmops show {self.run_id}`; resume from its checkpoint with "
                                 f"`%llmops {self.stage} --resume {self.run_id}`")
        return self.view.figure(self.registry.metric_history(self.run_id),
                                title=f"{self.stage} {self.run_id} ({self.status})")

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmops_jupyter.stages.finetune.launch")
    sub = parser.add_subparsers(dest="mode", required=True)
    run = sub.add_parser("run", help="a detached finetune run")
    run.add_argument("--home", required=True)
    run.add_argument("--run-id", required=True)
    run.add_argument("--config", required=True, help="JSON parameters of the stage")
    run.add_argument("--stage", default="finetune", choices=["finetune", "rl"])
    tr = sub.add_parser("train", help="one accelerate rank")
    tr.add_argument("--spec", required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    if args.mode == "run":
        return run_detached(args.home, args.run_id, json.loads(args.config), args.stage)
    return train_rank(args.spec)


if __name__ == "__main__":
    sys.exit(main())

"""Running deployments: uvicorn in a background thread of the kernel, in the foreground (CLI), or as a separate
process (``--detach``), plus the registry's ``deployments`` status table and graceful stop.

Graceful stop = uvicorn stops accepting, lets in-flight requests (streams included) finish within the grace
period, then the engine drains its queue and the request log flushes; only then is the status ``stopped``.
The listening socket is bound by the caller (port 0 → a free port, known before the server starts) and handed
to uvicorn (or to the child process as an inherited file descriptor), so there is no port race.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from llmops_jupyter.core.env import pid_alive
from llmops_jupyter.core.errors import NotFoundError, StageError
from llmops_jupyter.registry import Registry

#: deployments served by threads of this process: id → Deployment
LOCAL: dict[str, Deployment] = {}


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StageError(f"Cannot listen on {host}:{port} ({exc.strerror or exc}).",
                         fix="pick another --port (0 = any free port) or stop what uses it") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_for(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/v1"


# -- generated API keys ---------------------------------------------------------------------------------------
def api_key_path(home: str | os.PathLike[str], deployment: str) -> Path:
    """Where a deployment's generated key is kept: ``<registry home>/deployments/<id>/api_key``."""
    return Path(home) / "deployments" / deployment / "api_key"


def write_api_key(home: str | os.PathLike[str], deployment: str, key: str) -> Path:
    """Write ``key`` to :func:`api_key_path`, created 0600 (folders 0700) so no other user can read it."""
    path = api_key_path(home, deployment)
    path.parent.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    os.fchmod(fd, 0o600)  # whatever the umask
    with os.fdopen(fd, "w") as f:
        f.write(key)  # no newline: open(path).read() is the key
    return path


def remove_api_key(home: str | os.PathLike[str], deployment: str) -> None:
    """Delete a stopped deployment's key file (the key no longer opens anything; no reason to keep it on disk)."""
    path = api_key_path(home, deployment)
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:  # not empty, or already gone
        pass


# -- registry status ------------------------------------------------------------------------------------------
def record(registry: Registry, dep_id: str, **fields: Any) -> None:
    """Create or update a deployment's status row (see :meth:`Registry.record_deployment`)."""
    registry.record_deployment(dep_id, **fields)


def list_deployments(registry: Registry, *, status: str | None = None) -> list[dict[str, Any]]:
    """Deployments, newest first; running ones whose process is gone are reported (and recorded) as ``lost``."""
    rows = registry.deployments()
    host = os.uname().nodename
    for r in rows:
        if r["status"] in ("starting", "running", "stopping") and r["host"] == host:
            local = r["id"] in LOCAL and r["mode"] == "thread"
            if not local and not (r["mode"] != "thread" and pid_alive(r["pid"])) and \
                    not (r["mode"] == "thread" and r["pid"] != os.getpid() and pid_alive(r["pid"])):
                r["status"] = "lost"
                record(registry, r["id"], status="lost", stopped_at=time.time())
    return [r for r in rows if status is None or r["status"] == status]


def get_deployment(registry: Registry, ref: str | None = None) -> dict[str, Any]:
    """By id, unique id prefix, ``latest`` (newest) or ``None`` (the newest running one)."""
    rows = list_deployments(registry)
    if not rows:
        raise NotFoundError(f"No deployments in the registry at '{registry.home}'.",
                            fix="start one with `%llmops serve --model <run>`")
    if ref in (None, "", "running"):
        running = [r for r in rows if r["status"] == "running"]
        if not running:
            raise NotFoundError("No running deployment.", fix="start one with `%llmops serve --model <run>`")
        return running[0]
    if ref == "latest":
        return rows[0]
    hits = [r for r in rows if r["id"] == ref] or [r for r in rows if r["id"].startswith(ref)]
    if len(hits) != 1:
        what = "ambiguous" if hits else "unknown"
        raise NotFoundError(f"Deployment '{ref}' is {what}.",
                            fix="list them with `%llmops deployments`; pass the full id")
    return hits[0]


# -- running ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Deployment:
    id: str
    url: str
    mode: str
    server: Any = None
    thread: threading.Thread | None = None
    serve_ctx: Any = None
    registry: Registry | None = None

    def stop(self, timeout: float = 60.0) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                raise StageError(f"Deployment {self.id} did not stop within {timeout:g}s.",
                                 fix="requests are still running; try again or raise --grace")


def make_server(app: Any, grace: float):
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=grace, timeout_keep_alive=5)
    return uvicorn.Server(config)


def _cleanup(serve_ctx: Any, registry: Registry, dep_id: str, error: str | None = None) -> None:
    try:
        serve_ctx.engine.stop()
    finally:
        if serve_ctx.log is not None:
            serve_ctx.log.close()
        remove_api_key(registry.home, dep_id)  # a generated key dies with its deployment
        record(registry, dep_id, status="failed" if error else "stopped", stopped_at=time.time(), error=error)
        LOCAL.pop(dep_id, None)


def start_thread(serve_ctx: Any, sock: socket.socket, registry: Registry, url: str, *, grace: float,
                 startup_timeout: float = 30.0) -> Deployment:
    """Serve from a daemon thread of this process (the kernel stays usable)."""
    from llmops_jupyter.stages.serve.app import create_app

    server = make_server(create_app(serve_ctx), grace)
    dep = Deployment(serve_ctx.deployment, url, "thread", server=server, serve_ctx=serve_ctx, registry=registry)
    error: list[str] = []

    def main() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # noqa: BLE001 - reported through the status table
            error.append(f"{type(exc).__name__}: {exc}")
        finally:
            sock.close()
            _cleanup(serve_ctx, registry, dep.id, error[0] if error else None)

    dep.thread = threading.Thread(target=main, name=f"llmops-serve-{dep.id}", daemon=True)
    LOCAL[dep.id] = dep
    dep.thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not dep.thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise StageError(f"The server did not start: {error[0] if error else 'timed out'}.",
                             fix="see the kernel log; check --host/--port")
        time.sleep(0.02)
    return dep


def serve_foreground(serve_ctx: Any, sock: socket.socket, registry: Registry, *, grace: float) -> None:
    """Block serving until SIGINT/SIGTERM (what ``llmops serve`` and the detached child do)."""
    from llmops_jupyter.stages.serve.app import create_app

    server = make_server(create_app(serve_ctx), grace)
    signals: list[int] = []
    previous = {s: signal.signal(s, lambda num, frame: signals.append(num)) for s in (signal.SIGINT, signal.SIGTERM)}
    error = None
    try:
        server.run(sockets=[sock])
    except BaseException as exc:  # noqa: BLE001
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        sock.close()
        _cleanup(serve_ctx, registry, serve_ctx.deployment, error)


def spawn_process(spec: dict[str, Any], sock: socket.socket, registry: Registry, *, startup_timeout: float = 300.0):
    """Start ``python -m llmops_jupyter.stages.serve.process`` on the inherited socket; wait until it serves."""
    import subprocess

    logs = registry.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{spec['deployment']}.log"
    env = {**os.environ, "LLMOPS_SERVE_SPEC": json.dumps({**spec, "fd": sock.fileno()}),
           "LLMOPS_HOME": str(registry.home)}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "llmops_jupyter.stages.serve.process"], env=env,
                                stdout=log, stderr=subprocess.STDOUT, pass_fds=[sock.fileno()],
                                start_new_session=True)
    sock.close()
    record(registry, spec["deployment"], pid=proc.pid)
    deadline = time.monotonic() + startup_timeout
    while True:
        row = registry.deployment(spec["deployment"])
        status = row["status"] if row else "starting"
        if status == "running":
            return proc
        if proc.poll() is not None or status == "failed" or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.terminate()
            tail = log_path.read_text(errors="replace")[-800:] if log_path.exists() else ""
            record(registry, spec["deployment"], status="failed", stopped_at=time.time(),
                   error=(row["error"] if row and row["error"] else tail[-300:]))
            raise StageError(f"The detached server exited before serving. Log tail:\n{tail}",
                             fix=f"see {log_path}")
        time.sleep(0.1)


def stop(registry: Registry, ref: str | None = None, *, timeout: float = 60.0) -> list[str]:
    """Stop one deployment (or, with ``ref=None``, every running one this process can stop). Returns ids."""
    if ref is None:
        targets = [r for r in list_deployments(registry, status="running")
                   if r["id"] in LOCAL or r["mode"] != "thread"]
        if not targets:
            raise NotFoundError("No running deployment to stop.", fix="`%llmops deployments` lists them")
    else:
        targets = [get_deployment(registry, ref)]
    stopped = []
    for row in targets:
        dep_id = row["id"]
        if dep_id in LOCAL:
            record(registry, dep_id, status="stopping")
            LOCAL[dep_id].stop(timeout)
        elif row["status"] in ("running", "starting") and row["mode"] != "thread" and pid_alive(row["pid"]):
            record(registry, dep_id, status="stopping")
            os.kill(row["pid"], signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while pid_alive(row["pid"]) and time.monotonic() < deadline:
                current = registry.deployment(dep_id)
                if current and current["status"] in ("stopped", "failed"):
                    break
                time.sleep(0.05)
            else:
                if pid_alive(row["pid"]):
                    raise StageError(f"Deployment {dep_id} (pid {row['pid']}) did not stop within {timeout:g}s.",
                                     fix=f"kill {row['pid']} if it hangs")
            # reap our own child if it is one
            try:
                os.waitpid(row["pid"], os.WNOHANG)
            except ChildProcessError:
                pass
        elif row["status"] in ("running", "starting", "stopping"):
            raise StageError(f"Deployment {dep_id} runs in another kernel (pid {row['pid']}).",
                             fix="stop it from the notebook that started it")
        stopped.append(dep_id)
    return stopped

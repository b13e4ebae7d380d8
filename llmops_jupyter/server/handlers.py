"""REST routes under ``/llmops/`` for the Lab extension.

Every handler is a jupyter-server ``APIHandler`` behind ``@tornado.web.authenticated`` *and* ``@authorized``: the
same token/cookie as the rest of Jupyter, no extra port, and the server's ``Authorizer`` decides per action on the
resource ``"llmops"`` (:data:`AUTH_RESOURCE`), as jupyter-server's own handlers do for ``contents``/``kernels``.
Reading runs, lineage, resources, parameters and jobs needs ``read``; starting a pipeline (it executes a notebook
in a kernel) needs ``execute``; cancelling one needs ``write``. Refused → 403. Input errors come back as one JSON object ``{"error", "field", "fix"}`` with 400;
notebook paths are resolved inside the server root and anything escaping it is refused with 403.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import tornado.web
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler

from llmops_jupyter.core.errors import ConfigError, LlmopsError, NotFoundError
from llmops_jupyter.registry import Registry, RunStatus
from llmops_jupyter.server import resources
from llmops_jupyter.server.pipeline import PipelineJobs, coerce_parameters, notebook_parameters

_STATUSES = {s.value for s in RunStatus}
#: the resource name our routes are authorized on (``Authorizer.is_authorized(handler, user, action, "llmops")``)
AUTH_RESOURCE = "llmops"


class RequestError(Exception):
    """A client error: becomes ``{"error": message, "field": ..., "fix": ...}`` with its HTTP status."""

    def __init__(self, status: int, message: str, *, field: str | None = None, fix: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.fix = status, message, field, fix


def confine(root: Path, rel: Any, *, field: str = "path", suffix: str | None = ".ipynb") -> Path:
    """Resolve a client-given path inside ``root``; refuse absolute paths, ``..`` and symlinks leading out."""
    if not isinstance(rel, str) or not rel.strip():
        raise RequestError(400, f"'{field}' must be a non-empty path relative to the server root.", field=field,
                           fix="pass the notebook path as Lab shows it, e.g. templates/finetune.ipynb")
    if "\x00" in rel or rel.startswith(("/", "\\", "~")) or os.path.isabs(rel) or ".." in Path(rel).parts:
        raise RequestError(403, f"'{field}' must stay inside the server root (got {rel!r}).", field=field,
                           fix="use a path relative to the Jupyter root without '..'")
    root = root.resolve()
    target = (root / rel).resolve()
    if not target.is_relative_to(root):
        raise RequestError(403, f"'{field}' resolves outside the server root (got {rel!r}).", field=field,
                           fix="use a path relative to the Jupyter root")
    if suffix and target.suffix != suffix:
        raise RequestError(400, f"'{field}' must be a {suffix} file (got {rel!r}).", field=field)
    if not target.is_file():
        raise RequestError(404, f"No file '{rel}' under the server root.", field=field,
                           fix="check the path in the file browser")
    return target


def _int_arg(handler: APIHandler, name: str, default: int, lo: int, hi: int) -> int:
    raw = handler.get_query_argument(name, None)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise RequestError(400, f"'{name}' must be an integer (got {raw!r}).", field=name) from None
    if not lo <= value <= hi:
        raise RequestError(400, f"'{name}' must be between {lo} and {hi} (got {value}).", field=name)
    return value


class LlmopsHandler(APIHandler):
    """Shared helpers: the registry, the server root, JSON errors."""

    auth_resource = AUTH_RESOURCE

    @property
    def root(self) -> Path:
        return Path(self.settings["llmops_root"])

    @property
    def registry(self) -> Registry:
        return Registry.open(self.settings["llmops_home"])

    @property
    def jobs(self) -> PipelineJobs:
        return self.settings["llmops_jobs"]

    def reply(self, payload: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(payload, default=str))

    def fail(self, exc: Exception) -> None:
        if isinstance(exc, RequestError):
            status, body = exc.status, {"error": exc.message, "field": exc.field, "fix": exc.fix}
        elif isinstance(exc, NotFoundError):
            status, body = 404, {"error": exc.message, "field": None, "fix": exc.fix}
        elif isinstance(exc, ConfigError):
            status, body = 400, {"error": exc.message, "field": exc.field, "fix": exc.fix}
        elif isinstance(exc, LlmopsError):
            status, body = 400, {"error": exc.message, "field": None, "fix": exc.fix}
        else:
            raise exc
        self.reply(body, status)

    def body_json(self) -> dict[str, Any]:
        try:
            body = json.loads(self.request.body or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"Request body is not valid JSON ({exc}).", field="body",
                               fix="send a JSON object") from None
        if not isinstance(body, dict):
            raise RequestError(400, "Request body must be a JSON object.", field="body", fix="send a JSON object")
        return body

    def _user_name(self) -> str | None:
        """The Jupyter identity making the request (recorded as the user of the runs it starts)."""
        user = self.current_user
        return getattr(user, "username", None) or getattr(user, "name", None) or None

    def notebook_rel(self, notebook: str | None) -> str | None:
        """A run's recorded notebook as a path Lab can open (relative to the root), or None."""
        if not notebook:
            return None
        path = Path(notebook)
        try:
            full = path.resolve() if path.is_absolute() else (self.root / path).resolve()
            rel = full.relative_to(self.root.resolve())
        except (ValueError, OSError):
            return None
        return rel.as_posix() if full.is_file() else None


def _run_row(reg: Registry, run: dict[str, Any]) -> dict[str, Any]:
    from llmops_jupyter.views.runs import key_metrics

    metrics = dict(key_metrics(run["stage"], reg.metrics(run["id"]), n=None))  # the sidebar shows the head
    return {k: run[k] for k in ("id", "stage", "name", "status", "created_at", "started_at", "finished_at",
                                "duration_s", "notebook", "error", "tags", "user", "host")} | {"metrics": metrics}


class RunsHandler(LlmopsHandler):
    @tornado.web.authenticated
    @authorized("read")
    def get(self) -> None:
        try:
            status = self.get_query_argument("status", None) or None
            if status is not None and status not in _STATUSES:
                raise RequestError(400, f"'status' must be one of {', '.join(sorted(_STATUSES))} (got {status!r}).",
                                   field="status")
            stage = self.get_query_argument("stage", None) or None
            user = self.get_query_argument("user", None) or None  # the recorded user (JUPYTERHUB_USER, ...)
            limit = _int_arg(self, "limit", 200, 1, 5000)
            reg = self.registry
            runs = [_run_row(reg, r) for r in reg.list_runs(stage=stage, status=status, limit=limit, user=user)]
            self.reply({"home": str(reg.home), "runs": runs, "users": reg.run_users(), "now": time.time()})
        except (RequestError, LlmopsError) as exc:
            self.fail(exc)


def _graph_for(reg: Registry, hashes: list[str]) -> dict[str, Any]:
    nodes: dict[str, dict] = {}
    edges: dict[tuple, dict] = {}
    for h in hashes:
        g = reg.lineage(h, "both")
        for n in g["nodes"]:
            nodes[n["hash"]] = n
        for e in g["edges"]:
            edges[(e["src"], e["dst"], e["relation"])] = e
    return {"nodes": list(nodes.values()), "edges": list(edges.values())}


def _art(a) -> dict[str, Any]:
    return {"hash": a.hash, "kind": a.kind, "name": a.name, "size": a.size, "run_id": a.run_id,
            "created_at": a.created_at, "meta": a.meta}


class RunHandler(LlmopsHandler):
    @tornado.web.authenticated
    @authorized("read")
    def get(self, ref: str) -> None:
        try:
            reg = self.registry
            run = reg.get_run(ref)
            outputs = reg.run_artifacts(run["id"], "output")
            inputs = reg.run_artifacts(run["id"], "input")
            history = reg.metric_history(run["id"])
            out = run | {
                "metrics": reg.metrics(run["id"]),
                "metric_history": history[-500:],
                "inputs": [_art(a) for a in inputs],
                "outputs": [_art(a) for a in outputs],
                "lineage": _graph_for(reg, [a.hash for a in outputs + inputs]),
                "notebook_path": self.notebook_rel(run["notebook"]),
            }
            self.reply(out)
        except (RequestError, LlmopsError) as exc:
            self.fail(exc)


class LineageHandler(LlmopsHandler):
    @tornado.web.authenticated
    @authorized("read")
    def get(self, ref: str) -> None:
        try:
            direction = self.get_query_argument("direction", "both")
            if direction not in ("both", "up", "down"):
                raise RequestError(400, f"'direction' must be both, up or down (got {direction!r}).",
                                   field="direction")
            self.reply(self.registry.lineage(ref, direction))
        except (RequestError, LlmopsError) as exc:
            self.fail(exc)


class ResourcesHandler(LlmopsHandler):
    @tornado.web.authenticated
    @authorized("read")
    def get(self) -> None:
        try:
            self.reply({"gpus": resources.gpu_status(), "host": resources.host_memory(),
                        "running": resources.running_runs(self.registry),
                        "pipelines": [j for j in self.jobs.list() if j["status"] == "running"],
                        "time": time.time()})
        except (RequestError, LlmopsError) as exc:
            self.fail(exc)


class SelectionHandler(LlmopsHandler):
    """``GET /llmops/selection?runs=A,B&quality=f1``: the model-selection rows (quality, cost, latency, Pareto
    front) of ``%llmops select``; without ``runs``, the newest 5 eval runs."""

    @tornado.web.authenticated
    @authorized("read")
    def get(self) -> None:
        from llmops_jupyter.views.select import COLUMNS, selection_rows

        try:
            runs = [r for r in (self.get_query_argument("runs", "") or "").split(",") if r.strip()]
            quality = self.get_query_argument("quality", "f1") or "f1"
            if not runs:
                runs = [r["id"] for r in self.registry.list_runs(stage="eval", limit=5)]
            self.reply({"quality": quality, "columns": COLUMNS,
                        "rows": selection_rows(self.registry, runs, quality) if runs else []})
        except (RequestError, LlmopsError) as exc:
            self.fail(exc)


class ParametersHandler(LlmopsHandler):
    @tornado.web.authenticated
    @authorized("read")
    def get(self) -> None:
        try:
            path = confine(self.root, self.get_query_argument("path", None))
            self.reply({"path": path.relative_to(self.root.resolve()).as_posix(),
                        "parameters": notebook_parameters(path)})
        except (RequestError, LlmopsError) as exc:
            self.fail(exc)


class PipelineHandler(LlmopsHandler):
    @tornado.web.authenticated
    @authorized("read")
    def get(self) -> None:
        self.reply({"jobs": self.jobs.list()})

    @tornado.web.authenticated
    @authorized("execute")
    def post(self) -> None:
        try:
            body = self.body_json()
            unknown = set(body) - {"notebook", "parameters"}
            if unknown:
                raise RequestError(400, f"Unknown field(s) {', '.join(sorted(unknown))}.", field=sorted(unknown)[0],
                                   fix="send {notebook, parameters}")
            path = confine(self.root, body.get("notebook"), field="notebook")
            rel = path.relative_to(self.root.resolve()).as_posix()
            params = coerce_parameters(notebook_parameters(path), body.get("parameters", {}))
            self.reply(self.jobs.start(rel, params, user=self._user_name()), 202)
        except (RequestError, LlmopsError) as exc:
            self.fail(exc)


class PipelineJobHandler(LlmopsHandler):
    @tornado.web.authenticated
    @authorized("read")
    def get(self, job_id: str) -> None:
        job = self.jobs.jobs.get(job_id)
        if job is None:
            return self.fail(RequestError(404, f"No pipeline job '{job_id}'.", field="job"))
        self.reply(dict(job))

    @tornado.web.authenticated
    @authorized("write")
    def delete(self, job_id: str) -> None:
        if job_id not in self.jobs.jobs:
            return self.fail(RequestError(404, f"No pipeline job '{job_id}'.", field="job"))
        self.reply(self.jobs.cancel(job_id))


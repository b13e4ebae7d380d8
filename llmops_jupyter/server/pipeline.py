"""Run a notebook as a pipeline from the Lab extension.

:func:`run_pipeline` is the one entry point. It delegates to ``llmops_jupyter.pipelines.run_pipeline`` when that
module provides one (the project's papermill glue, with stage caching and parameter validation against the stage
configs); until then it calls papermill directly and records a ``pipeline`` run itself, so the Lab feature works
either way. The server never executes a notebook in its own process: :class:`PipelineJobs` starts
``python -m llmops_jupyter.server.pipeline SPEC`` as a child process (a stuck kernel cannot block Tornado, and a
job can be cancelled) and reads its progress lines.
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from llmops_jupyter.core.errors import ConfigError, DataError

PROGRESS_TAG = "LLMOPS-PROGRESS"
RESULT_TAG = "LLMOPS-RESULT"
_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "list": list, "dict": dict}


# -- parameters ---------------------------------------------------------------------------------------------------
def _literal(text: str) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False, None


def _type_name(annotation: str, default: Any, is_literal: bool) -> str:
    ann = (annotation or "").strip().lower()
    for name in ("bool", "int", "float", "str", "list", "dict"):
        if ann == name or ann.startswith(name + "["):
            return name
    if is_literal and default is not None:
        tname = type(default).__name__
        if tname == "tuple":
            return "list"
        return tname if tname in _TYPES else "str"
    return "any"  # None default or an expression: passed through as JSON


def notebook_parameters(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The parameters of a notebook's ``parameters``-tagged cell, typed.

    Papermill's inspector finds the cell and the names; its type comes only from annotations, so the type is
    taken from the annotation when there is one, else from the literal default (``lr = 2e-4`` → float).
    """
    from papermill.inspection import inspect_notebook

    try:
        found = inspect_notebook(str(path))
    except Exception as exc:  # noqa: BLE001 - nbformat/JSON errors: report the file
        raise DataError(f"Cannot read notebook '{Path(path).name}': {exc}.", path=str(path),
                        fix="open it in Lab and save it again") from None
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    if not any("parameters" in (c.get("metadata", {}).get("tags") or []) for c in nb.cells):
        raise DataError(f"Notebook '{Path(path).name}' has no cell tagged 'parameters'.", path=str(path),
                        fix="add the tag 'parameters' to the cell that defines the defaults (Property Inspector)")
    params = []
    for name, info in found.items():
        is_lit, value = _literal(info.get("default") or "")
        params.append({
            "name": name,
            "type": _type_name(info.get("inferred_type_name") or "", value, is_lit),
            "default": value if is_lit else info.get("default"),
            "help": info.get("help") or "",
        })
    return params


def coerce_parameters(spec: list[dict[str, Any]], values: dict[str, Any]) -> dict[str, Any]:
    """Check ``values`` against the notebook's parameters: unknown names and wrong types are refused with the name,
    the expected type and the bad value, before any kernel starts."""
    if not isinstance(values, dict):
        raise ConfigError("parameters must be a JSON object of name → value.", field="parameters",
                          fix='send {"parameters": {"lr": 0.001}}')
    by_name = {p["name"]: p for p in spec}
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name not in by_name:
            raise ConfigError(f"Unknown parameter '{name}'.", field=name, value=value,
                              fix=f"the notebook's parameters are: {', '.join(by_name) or '(none)'}")
        tname = by_name[name]["type"]
        ok = True
        if tname == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif tname == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif tname in _TYPES:
            ok = isinstance(value, _TYPES[tname])
        if not ok:
            raise ConfigError(f"Parameter '{name}' must be {tname} (got {value!r}).", field=name, value=value,
                              fix=f"give a {tname} value")
        out[name] = value
    return out


# -- execution ----------------------------------------------------------------------------------------------------
def run_pipeline(notebook: str | os.PathLike, params: dict[str, Any], *, output: str | os.PathLike,
                 cwd: str | os.PathLike | None = None, registry_home: str | os.PathLike | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Execute ``notebook`` with ``params`` through the project's pipeline runner (``llmops run``), copy the
    executed notebook to ``output`` and report per-cell progress on stdout for the job follower.

    Returns ``{"run_id", "output", "status", "error", "stage_runs"}``.
    """
    from llmops_jupyter.pipelines import run_pipeline as run

    def report(event) -> None:
        if progress and str(event.type) == "progress" and event.stage == "pipeline":
            print(f"{PROGRESS_TAG} {int(event.data.get('done') or 0)} {int(event.data.get('total') or 0)}",
                  flush=True)

    return run(notebook, params, output=output, cwd=cwd, registry_home=registry_home, listeners=[report])


class PipelineJobs:
    """Pipeline jobs started from Lab, one child process each; kept in memory for the life of the server."""

    def __init__(self, root: Path, registry_home: Path):
        self.root = root
        self.registry_home = registry_home
        self.jobs: dict[str, dict[str, Any]] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def start(self, notebook_rel: str, params: dict[str, Any], *, user: str | None = None) -> dict[str, Any]:
        """Start a job; ``user`` is the Jupyter identity the server authorized to execute it (shown in the job)."""
        src = self.root / notebook_rel
        stamp = time.strftime("%Y%m%d-%H%M%S")
        job_id = secrets.token_hex(4)
        out_rel = (Path(notebook_rel).parent / "pipeline-runs" / f"{src.stem}-{stamp}-{job_id}.ipynb").as_posix()
        spec = {"notebook": str(src), "params": params, "output": str(self.root / out_rel),
                "cwd": str(src.parent), "registry_home": str(self.registry_home)}
        env = dict(os.environ, LLMOPS_HOME=str(self.registry_home), PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, "-m", "llmops_jupyter.server.pipeline", json.dumps(spec)],
                                cwd=str(src.parent), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        job = {"id": job_id, "notebook": notebook_rel, "output": out_rel, "parameters": params, "user": user,
               "status": "running", "done": 0, "total": None, "started_at": time.time(), "finished_at": None,
               "run_id": None, "stage_runs": [], "error": None}
        with self._lock:
            self.jobs[job_id] = job
            self._procs[job_id] = proc
        threading.Thread(target=self._follow, args=(job_id, proc), daemon=True).start()
        return dict(job)

    def _follow(self, job_id: str, proc: subprocess.Popen) -> None:
        job = self.jobs[job_id]
        stderr_tail: list[str] = []
        t = threading.Thread(target=lambda: stderr_tail.extend(proc.stderr.read().splitlines()[-20:]), daemon=True)
        t.start()
        for line in proc.stdout:
            m = re.search(PROGRESS_TAG + r" (\d+) (\d+)", line)
            if m:
                job["done"], job["total"] = int(m.group(1)), int(m.group(2))
            elif line.startswith(RESULT_TAG):
                result = json.loads(line[len(RESULT_TAG):])
                job.update(run_id=result.get("run_id"), stage_runs=result.get("stage_runs", []),
                           error=result.get("error"), status=result.get("status", "failed"))
        rc = proc.wait()
        t.join(timeout=5)
        if job["status"] == "running":  # the worker died before reporting
            job["status"] = "failed"
            job["error"] = job["error"] or (stderr_tail[-1] if stderr_tail else f"worker exited with {rc}")
        job["finished_at"] = time.time()

    def cancel(self, job_id: str) -> dict[str, Any]:
        proc = self._procs.get(job_id)
        if proc is not None and proc.poll() is None:
            import signal

            os.killpg(proc.pid, signal.SIGINT)
        return dict(self.jobs[job_id])

    def list(self) -> list[dict[str, Any]]:
        return sorted((dict(j) for j in self.jobs.values()), key=lambda j: -j["started_at"])


def _main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    try:
        result = run_pipeline(spec["notebook"], spec["params"], output=spec["output"], cwd=spec.get("cwd"),
                              registry_home=spec.get("registry_home"))
    except KeyboardInterrupt:
        result = {"status": "interrupted", "error": "cancelled"}
    print(RESULT_TAG + json.dumps(result, default=str), flush=True)
    return 0 if result.get("status") == "finished" else 1


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))

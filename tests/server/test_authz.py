"""The /llmops routes ask Jupyter's Authorizer, not only the authenticator: a read-only identity can look at runs but
cannot execute a notebook as a pipeline (403), nor cancel a job. Checked on a real jupyter server configured with
``--ServerApp.authorizer_class`` (a custom ``Authorizer`` importable from a tmp dir on PYTHONPATH)."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("jupyter_server")

from llmops_jupyter.testing import wait_until  # noqa: E402 - after the import skips

ROOT = Path(__file__).resolve().parents[2]

AUTHORIZER = '''\
import json
import os

from jupyter_server.auth import Authorizer


class ReadOnlyAuthorizer(Authorizer):
    """Grants only 'read', on every resource; logs each decision (JSON lines) for the test."""

    def is_authorized(self, handler, user, action, resource):
        allowed = action == "read"
        with open(os.environ["AUTHZ_LOG"], "a") as f:
            f.write(json.dumps({"path": handler.request.path, "method": handler.request.method,
                                "action": action, "resource": resource, "allowed": allowed}) + "\\n")
        return allowed
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _up(url: str, headers: dict[str, str]) -> bool:
    try:
        return httpx.get(f"{url}/api/status", headers=headers, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _notebook(path: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("steps = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("open('executed.txt', 'w').write(str(steps))")]
    nbformat.write(nb, str(path))


@pytest.fixture(scope="module")
def readonly_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("authz")
    root, plugin, cfg, data, rt = (base / n for n in ("root", "plugin", "config", "data", "runtime"))
    for d in (root, plugin, cfg, data):
        d.mkdir()
    _notebook(root / "pipeline.ipynb")
    (plugin / "llmops_test_authz.py").write_text(AUTHORIZER)
    (cfg / "jupyter_server_config.json").write_text(json.dumps(
        {"ServerApp": {"jpserver_extensions": {"llmops_jupyter": True}}}))
    authz_log = base / "authz.jsonl"
    token = secrets.token_hex(16)
    port = _free_port()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(cfg), JUPYTER_PATH=str(data), JUPYTER_RUNTIME_DIR=str(rt),
               JUPYTER_PLATFORM_DIRS="1", LLMOPS_HOME=str(root / ".llmops"), AUTHZ_LOG=str(authz_log),
               PYTHONPATH=os.pathsep.join([str(plugin), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    log = base / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", "--ServerApp.allow_root=True",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--ServerApp.authorizer_class=llmops_test_authz.ReadOnlyAuthorizer"],
        cwd=str(root), env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"token {token}"}
    try:
        wait_until(lambda: _up(url, headers), 90, what="jupyter server to answer /api/status",
                   abort=lambda: proc.poll() is not None and f"the server exited ({proc.returncode})",
                   details=lambda: log.read_text()[-3000:])
    except AssertionError as exc:
        proc.kill()
        pytest.fail(str(exc))
    assert "/llmops routes enabled" in log.read_text(), log.read_text()[-3000:]
    try:
        yield {"url": url, "headers": headers, "root": root, "authz_log": authz_log, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _decisions(server) -> list[dict]:
    text = server["authz_log"].read_text() if server["authz_log"].exists() else ""
    return [json.loads(line) for line in text.splitlines() if "/llmops/" in line]


@pytest.mark.parametrize("path", ["runs", "resources", "pipeline", "parameters?path=pipeline.ipynb"])
def test_read_only_identity_can_read(readonly_server, path):
    r = httpx.get(f"{readonly_server['url']}/llmops/{path}", headers=readonly_server["headers"], timeout=30)
    assert r.status_code == 200, r.text
    decided = [d for d in _decisions(readonly_server) if d["path"] == f"/llmops/{path.split('?')[0]}"]
    assert decided and decided[-1] == {"path": f"/llmops/{path.split('?')[0]}", "method": "GET", "action": "read",
                                       "resource": "llmops", "allowed": True}


def test_read_only_identity_cannot_execute_a_pipeline(readonly_server):
    url, headers, root = readonly_server["url"], readonly_server["headers"], readonly_server["root"]
    r = httpx.post(f"{url}/llmops/pipeline", headers=headers, json={"notebook": "pipeline.ipynb"}, timeout=30)
    assert r.status_code == 403, r.text
    # A job is registered before the POST answers (PipelineJobs.start adds it, then returns 202) and only a job
    # starts a kernel, so an empty job list right after the 403 proves none ran: no wait can add to that.
    assert httpx.get(f"{url}/llmops/pipeline", headers=headers, timeout=30).json()["jobs"] == []
    assert not (root / "pipeline-runs").exists() and not (root / "executed.txt").exists()
    post = [d for d in _decisions(readonly_server) if d["method"] == "POST"]
    assert post and post[-1] | {"path": None} == {"path": None, "method": "POST", "action": "execute",
                                                   "resource": "llmops", "allowed": False}


def test_read_only_identity_cannot_cancel_a_job(readonly_server):
    url, headers = readonly_server["url"], readonly_server["headers"]
    r = httpx.delete(f"{url}/llmops/pipeline/abcdef12", headers=headers, timeout=30)
    assert r.status_code == 403, r.text  # refused before it is even looked up
    (d,) = [d for d in _decisions(readonly_server) if d["method"] == "DELETE"]
    assert (d["action"], d["resource"], d["allowed"]) == ("write", "llmops", False)


def test_every_route_method_is_authorized():
    """No route method is left with authentication only: each picks its action (a guard for new handlers)."""
    import inspect
    import re

    from llmops_jupyter.server import handlers

    src = inspect.getsource(handlers)
    methods = re.findall(r"\n    def (get|post|put|patch|delete)\(self", src)
    guarded = re.findall(r'\n    @tornado\.web\.authenticated\n    @authorized\("(\w+)"\)\n    def (\w+)\(self', src)
    assert methods and len(guarded) == len(methods)
    assert {m: a for a, m in guarded} == {"get": "read", "post": "execute", "delete": "write"}
    assert handlers.LlmopsHandler.auth_resource == "llmops"

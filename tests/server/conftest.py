"""Fixtures for the Lab extension tests: a server root holding a registry with a lineage chain and a template
notebook, and a real JupyterLab server on loopback (random port, token auth) serving the built extension.

Loaded by pytest for the tests in this folder; one server per session, shared by the
route tests and the browser test.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llmops_jupyter.core.env import pid_alive
from llmops_jupyter.testing import wait_until

ROOT = Path(__file__).resolve().parents[2]
LABEXT = ROOT / "llmops_jupyter" / "labextension"
RUNNING_STEPS = 100_000  # the "running" fine-tune's --max-steps: it never gets there

PARAMS_SRC = 'lr = 0.001\nsteps = 3\nuse_lora = True\nrun_name = "demo"\nlayers = [1, 2]'
TRAIN_SRC = '''\
import dataclasses
from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.registry import Registry
from llmops_jupyter.core.runner import Runner
from llmops_jupyter.core.stage import Stage


@dataclasses.dataclass
class ToyConfig(StageConfig):
    lr: float = option(1e-3, "learning rate", min=0)
    steps: int = option(3, "optimizer steps", min=1)


class ToyTrain(Stage):
    name = "toy-train"
    config_cls = ToyConfig

    def run(self, ctx):
        for step in range(1, ctx.config.steps + 1):
            ctx.log_metrics({"loss": 1.0 / step, "lr": ctx.config.lr}, step=step)
        return {}


result = Runner(Registry.open()).run(ToyTrain, {"lr": lr, "steps": steps}, name=run_name)
print(result.run_id, result.status)
'''


def write_template(path: Path) -> None:
    """A small pipeline notebook: a ``parameters`` cell and a cell that records a stage run."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Toy training pipeline"),
        nbformat.v4.new_code_cell(PARAMS_SRC, metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(TRAIN_SRC),
    ]
    nbformat.write(nb, str(path))


@dataclass
class Populated:
    ids: dict[str, str]
    worker: Any  # the detached fine-tune still running (DetachedRun); killed at teardown

    def stop(self) -> None:
        """Kill the detached worker (paused or not); its supervisor records the run as failed."""
        if self.worker is not None and pid_alive(self.worker.pid):
            os.kill(self.worker.pid, signal.SIGKILL)
            try:
                self.worker.wait(timeout=30)
            except Exception:  # noqa: BLE001 - "killed by SIGKILL" is the expected ending
                pass


def populate(home: Path, scratch: Path, tiny_model: Path) -> Populated:
    """Real stage runs on the tiny model: data → finetune → merge → quantize (bnb-4bit) → serve (started, then
    stopped), an eval of the adapter that fails its gate, and a detached finetune still running (its worker paused
    with SIGSTOP after its first logged step, so it holds no CPU; killed at teardown). Returns run ids by role."""
    from llmops_jupyter.core.errors import GateError
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.stages.serve import server
    from llmops_jupyter.testing import tiny_records

    scratch.mkdir(parents=True, exist_ok=True)
    source = scratch / "support.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in tiny_records(48)))
    ids: dict[str, str] = {}
    worker = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMOPS_HOME", str(home))
        mp.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        mp.setenv("OMP_NUM_THREADS", "1")  # the detached worker inherits it
        mp.chdir(scratch)
        reg = Registry(home)
        runner = Runner(reg)
        ft_opts = {"model": str(tiny_model), "batch_size": 4, "seq_len": 64, "lr": 1e-2, "log_every": 1,
                   "checkpoint_every": 0}
        data = runner.run("data", {"source": str(source), "tokenizer": str(tiny_model), "eval_fraction": 0.1,
                                   "name": "support-v1"})
        ids["data"] = data.run_id
        mp.setenv("LLMOPS_NOTEBOOK", str(home.parent / "template.ipynb"))  # as recorded from a kernel in Lab
        mp.setenv("LLMOPS_RESOURCE_SAMPLING", "on")  # sampled resources, as on a GPU machine
        mp.setenv("LLMOPS_SAMPLE_S", "0.2")
        ft = runner.run("finetune", {**ft_opts, "data": data.run_id, "rank": 8, "max_steps": 6,
                                     "adapter_name": "support-lora"}, name="support-lora")
        ids["finetune"] = ft.run_id
        for var in ("LLMOPS_NOTEBOOK", "LLMOPS_RESOURCE_SAMPLING", "LLMOPS_SAMPLE_S"):
            mp.delenv(var)
        ids["merge"] = runner.run("merge", {"adapter": ft.run_id, "name": "support-merged"}).run_id
        ids["quantize"] = runner.run("quantize", {"model": ids["merge"], "method": "bnb-4bit", "eval_samples": 4,
                                                  "generate_tokens": 4, "compare_eval": False,
                                                  "name": "support-bnb4"}).run_id
        dep = runner.run("serve", {"model": ids["quantize"], "auth": False, "foreground": False}, name="support-endpoint")
        ids["serve"] = dep.run_id
        server.stop(reg, dep.run_id, timeout=30)  # a deployment record, no server left running
        with pytest.raises(GateError):  # the adapter vs its base with a gate no model can pass
            runner.run("eval", {"model": [str(tiny_model), ft.run_id], "data": data.run_id, "limit": 4,
                                "max_new_tokens": 4, "metrics": ["exact_match"], "gate": "exact_match>=1.01"},
                       name="eval-gate")
        ids["eval"] = reg.list_runs(stage="eval", limit=1)[0]["id"]
        detached = runner.run("finetune", {**ft_opts, "data": data.run_id, "max_steps": RUNNING_STEPS,
                                           "detach": True}, name="still-training")
        worker = detached.outputs["run"]
        try:
            wait_until(lambda: "loss" in reg.metrics(worker.run_id), 120, what="the detached finetune's first loss",
                       abort=lambda: not pid_alive(worker.pid) and "its worker process exited",
                       details=lambda: worker.log.read_text()[-3000:])
            os.kill(worker.pid, signal.SIGSTOP)
        except BaseException:
            Populated(ids, worker).stop()
            raise
        ids["running"] = worker.run_id
    return Populated(ids, worker)


def server_up(url: str, token: str) -> bool:
    """Whether the Jupyter server at ``url`` answers its status route (False while it is still starting)."""
    import httpx

    try:
        return httpx.get(f"{url}/api/status", headers={"Authorization": f"token {token}"}, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LabServer:
    url: str
    token: str
    root: Path
    home: Path
    ids: dict[str, str]
    log: Path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}


@pytest.fixture(scope="session")
def lab_server(tmp_path_factory, tiny_model) -> LabServer:
    if not (LABEXT / "package.json").exists():
        pytest.fail("The Lab extension is not built: run `make labext` (npm + jupyter-builder) first.")
    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    root.mkdir()
    write_template(root / "template.ipynb")
    home = root / ".llmops"
    populated = populate(home, base / "scratch", tiny_model)
    try:
        yield from _serve_lab(base, root, home, populated.ids)
    finally:
        populated.stop()


@pytest.fixture()
def start_lab(tmp_path):
    """More Jupyter servers for one test: ``start_lab(root, home, name, VAR=value)`` starts one with those
    environment variables (``None``: unset) and returns its :class:`LabServer`; all are stopped at teardown."""
    running = []

    def start(root: Path, home: Path, name: str, **env: str | None) -> LabServer:
        base = tmp_path / f"lab-{name}"
        base.mkdir()
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                if value is None:
                    mp.delenv(key, raising=False)
                else:
                    mp.setenv(key, value)
            gen = _serve_lab(base, root, home, {})
            server = next(gen)  # the server process took the environment above
        running.append(gen)
        return server

    yield start
    for gen in running:
        next(gen, None)  # past its yield: terminates the server


def _serve_lab(base: Path, root: Path, home: Path, ids: dict[str, str]):
    # Isolated Jupyter dirs: only our extension config + the worktree's built labextension.
    cfg, data, rt = base / "config", base / "data", base / "runtime"
    cfg.mkdir()
    (data / "labextensions").mkdir(parents=True)
    (data / "labextensions" / "llmops-jupyter").symlink_to(LABEXT, target_is_directory=True)
    (cfg / "jupyter_server_config.json").write_text(json.dumps(
        {"ServerApp": {"jpserver_extensions": {"llmops_jupyter": True}}}))
    news = base / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')  # no news prompt offline
    token = secrets.token_hex(16)
    port = free_port()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(cfg), JUPYTER_PATH=str(data), JUPYTER_RUNTIME_DIR=str(rt),
               JUPYTERLAB_SETTINGS_DIR=str(base / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(base / "ws"),
               LLMOPS_HOME=str(home), PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", JUPYTER_PLATFORM_DIRS="1")
    log = base / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         "--ServerApp.port_retries=0", "--ServerApp.allow_root=True", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.expose_app_in_browser=True"],  # window.jupyterapp: tests wait on the kernel's real status
        cwd=str(root), env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: server_up(url, token), 90, what="JupyterLab to answer /api/status",
                   abort=lambda: proc.poll() is not None and f"the server exited ({proc.returncode})",
                   details=lambda: log.read_text()[-3000:])
    except AssertionError as exc:
        proc.kill()
        pytest.fail(str(exc))
    yield LabServer(url=url, token=token, root=root, home=home, ids=ids, log=log)
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()

"""Fixtures for the Lab extension tests: a server root holding a registry with a lineage chain and a template
notebook, and a real JupyterLab server on loopback (random port, token auth) serving the built extension.

Loaded by pytest for the tests in this folder; one server per session, shared by the
route tests and the browser test.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LABEXT = ROOT / "llmops_jupyter" / "labextension"

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


def populate(home: Path, scratch: Path) -> dict[str, str]:
    """Runs through the Registry API: data → finetune → merge → quantize → serve (a lineage chain), plus a failed
    eval and a running finetune. Returns run ids by role."""
    from llmops_jupyter.registry import Registry, RunStatus

    reg = Registry(home)
    ids: dict[str, str] = {}

    def artifact(run: str, kind: str, name: str, parents: list, stage: str):
        folder = scratch / name
        folder.mkdir(parents=True)
        (folder / "content.txt").write_text(f"{kind} {name} {secrets.token_hex(4)}")
        return reg.add_artifact(folder, kind, name=name, run_id=run, inputs=[p.hash for p in parents],
                                relation=stage)

    base_dir = scratch / "tiny-base"
    base_dir.mkdir(parents=True)
    (base_dir / "config.json").write_text('{"model_type": "llama"}')
    base = reg.add_reference(base_dir, "base-model", name="tiny-llama")

    def run(stage: str, params: dict, inputs: list, kind: str | None, name: str, metrics: dict,
            notebook: str | None = None, status=RunStatus.FINISHED):
        rid = reg.create_run(stage, params, notebook=notebook, name=name)
        for a in inputs:
            reg.link_input(rid, a.hash)
        out = artifact(rid, kind, name, inputs, stage) if kind else None
        for step in (1, 2, 3):
            reg.log_metrics(rid, {k: v / step for k, v in metrics.items()}, step=step)
        if status != RunStatus.RUNNING:
            reg.finish_run(rid, status, error="GateError: rougeL 0.1 < 0.3" if status == RunStatus.FAILED else None)
        ids[stage] = rid
        return out

    ds = run("data", {"source": "support.jsonl", "eval_fraction": 0.1}, [], "dataset", "support-v1",
             {"n_train": 90.0})
    ad = run("finetune", {"lr": 2e-4, "rank": 8, "max_steps": 50}, [ds, base], "adapter", "support-lora",
             {"cpu_rss_mb": 900.0, "loss": 1.9, "eval_loss": 2.1}, notebook="template.ipynb")
    mg = run("merge", {"dtype": "float16"}, [ad, base], "merged", "support-merged", {"max_logit_diff": 1e-4})
    qt = run("quantize", {"method": "gptq", "bits": 4}, [mg], "quantized", "support-gptq4", {"ppl_ratio": 1.03})
    run("serve", {"port": 8000}, [qt], "deployment", "support-endpoint", {"p50_ms": 41.0})
    run("eval", {"metrics": ["rougeL"]}, [ad], None, "eval-gate", {"rougeL": 0.1}, status=RunStatus.FAILED)
    run("finetune", {"lr": 1e-4, "max_steps": 100}, [ds, base], None, "still-training", {"loss": 2.5},
        status=RunStatus.RUNNING)
    ids["running"] = ids.pop("finetune")
    ids["finetune"] = next(r["id"] for r in reg.list_runs(stage="finetune", limit=None) if r["name"] == "support-lora")
    reg.close()
    return ids


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
def lab_server(tmp_path_factory) -> LabServer:
    if not (LABEXT / "package.json").exists():
        pytest.fail("The Lab extension is not built: run `make labext` (npm + jupyter-builder) first.")
    import httpx

    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    root.mkdir()
    write_template(root / "template.ipynb")
    home = root / ".llmops"
    ids = populate(home, base / "scratch")
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
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=str(root), env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            if httpx.get(f"{url}/api/status", headers={"Authorization": f"token {token}"}, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"JupyterLab did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    yield LabServer(url=url, token=token, root=root, home=home, ids=ids, log=log)
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()

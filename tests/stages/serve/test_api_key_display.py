"""A generated serve key never lands in a saved file: not in the notebook's outputs (saved in the .ipynb and in every
pipeline notebook), not in the registry, not on the CLI's stdout. It is written to a 0600 file in the registry home
and the output says where, and how to use it with the official ``openai`` client."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from llmops_jupyter.testing import sliced_kernel_manager

pytestmark = pytest.mark.slow  # real kernels, servers or killed processes: over ~20 s on 2 cores

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[3]


def _files_bytes(home: Path, skip: Path) -> bytes:
    """Every file of the registry home but the key file (the database and its WAL read out of process)."""
    from llmops_jupyter.testing import read_bytes_elsewhere

    paths = [p for p in home.rglob("*") if p.is_file() and p != skip]
    return b"".join(read_bytes_elsewhere(paths).values())


def _check_key_file(path: Path, url: str) -> str:
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    key = open(path).read()  # noqa: SIM115 - exactly what the output tells the user to write
    assert key.startswith("sk-llmops-") and len(key) > 30
    client = openai.OpenAI(base_url=url, api_key=open(path).read(), max_retries=0, timeout=60)  # noqa: SIM115
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    bad = openai.OpenAI(base_url=url, api_key="sk-wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    return key


def test_generated_key_is_not_in_the_saved_notebook_nor_the_registry(tiny_model, home, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    from llmops_jupyter.registry import Registry

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("%load_ext llmops_jupyter"),
                nbformat.v4.new_code_cell(f"%llmops serve --model {tiny_model}"),
                nbformat.v4.new_code_cell(f"res = %llmops serve --model {tiny_model}\nres.outputs['deployment']"),
                nbformat.v4.new_code_cell("%llmops deployments"),
                nbformat.v4.new_code_cell("%llmops serve --stop")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    client = NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}},
                            kernel_manager_class=sliced_kernel_manager())
    keys: list[str] = []
    with client.setup_kernel():
        for i in range(4):
            client.execute_cell(nb.cells[i], i)
        reg = Registry(home)
        deps = sorted(r["id"] for r in reg.list_runs(stage="serve", limit=None))
        assert len(deps) == 2
        for dep in deps:
            row = reg.deployment(dep)
            assert row["status"] == "running"
            path = home / "deployments" / dep / "api_key"
            keys.append(_check_key_file(path, row["url"]))
        client.execute_cell(nb.cells[4], 4)
    saved = tmp_path / "served.ipynb"
    nbformat.write(nb, str(saved))
    text = saved.read_text()
    for dep, key in zip(deps, keys):
        path = home / "deployments" / dep / "api_key"
        assert key not in text
        assert str(path) in text  # the output says where the key is and how to use it
        assert not path.exists()  # stopped: the key file went with the deployment
    assert "api_key=open(" in text and "export OPENAI_API_KEY=$(cat " in text
    blob = _files_bytes(home, skip=Path("/nonexistent"))
    for key in keys:
        assert key.encode() not in blob


def test_cli_serve_prints_the_key_file_not_the_key(tiny_model, home, tmp_path):
    from llmops_jupyter.registry import Registry

    env = dict(os.environ, LLMOPS_HOME=str(home),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cli = [sys.executable, "-m", "llmops_jupyter.frontends.cli"]
    out = subprocess.run([*cli, "serve", "--model", str(tiny_model), "--detach"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    reg = Registry(home)
    (run,) = reg.list_runs(stage="serve", limit=None)
    dep = run["id"]
    path = home / "deployments" / dep / "api_key"
    try:
        key = _check_key_file(path, reg.deployment(dep)["url"])
        assert key not in out.stdout and key not in out.stderr
        assert str(path) in out.stdout and "api_key=open(" in out.stdout
        assert key.encode() not in _files_bytes(home, skip=path)
    finally:
        stop = subprocess.run([*cli, "serve", "--stop", dep], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr[-2000:]
    assert reg.deployment(dep)["status"] == "stopped"
    assert not path.exists()

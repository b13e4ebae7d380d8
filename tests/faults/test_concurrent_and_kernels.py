"""Several writers at once (two sweeps and a detached fine-tune), and a pipeline kernel killed mid-cell: every run
ends recorded as what happened, and the registry database and artifacts stay sound."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llmops_jupyter.testing import toy_train_cell, wait_until

pytestmark = pytest.mark.slow  # real kernels, servers or killed processes: over ~20 s on 2 cores

nbformat = pytest.importorskip("nbformat")
ROOT = Path(__file__).resolve().parents[2]


def notebook(path: Path, params: str, body: str) -> Path:
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(params)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


TOY = toy_train_cell(20)


def llmops(home: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "LLMOPS_HOME": str(home), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "llmops_jupyter.frontends.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_two_sweeps_and_a_detached_finetune_write_at_once(backend, registry, tiny_model, tiny_dataset, tmp_path,
                                                          monkeypatch):
    """On SQLite and on PostgreSQL (``backend``): the sweeps' kernels and the worker inherit LLMOPS_REGISTRY."""
    from llmops_jupyter.core.runner import Runner

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    nb = notebook(tmp_path / "toy.ipynb", "rank = 1", TOY)
    sweeps = [llmops(registry.home, "sweep", str(nb), "--grid", f"rank={a},{b}", "--parallel", "1", "--no-cache")
              for a, b in ((1, 2), (3, 4))]
    ft = Runner(registry).run("finetune", {"model": str(tiny_model), "data": tiny_dataset.hash, "max_steps": 12,
                                           "batch_size": 4, "log_every": 1, "checkpoint_every": 3, "detach": True})
    assert ft.outputs["run"].wait(timeout=600)["status"] == "finished"
    for proc in sweeps:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
    runs = registry.list_runs(limit=None)
    assert {r["status"] for r in runs} == {"finished"}, [(r["id"], r["status"], r["error"]) for r in runs]
    toys = [r for r in runs if r["stage"] == "toy-train"]
    assert sorted(r["params"]["rank"] for r in toys) == [1, 2, 3, 4]
    assert all(len(registry.metric_history(r["id"], "loss")) == 20 for r in toys)  # no write lost
    assert registry.integrity_check() == [] and registry.verify_artifacts() == []
    assert registry.backend.name == backend


def test_pipeline_kernel_killed_mid_cell_is_recorded_failed(home, tmp_path):
    from llmops_jupyter.registry import Registry

    pid_file = tmp_path / "kernel.pid"
    nb = notebook(tmp_path / "slow.ipynb", "seconds = 600",
                  f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(seconds)")
    proc = llmops(home, "run", str(nb))
    wait_until(lambda: pid_file.exists() and pid_file.read_text(), 120, what="the kernel to write its pid",
               abort=lambda: proc.poll() is not None and f"`llmops run` exited early: {proc.stdout.read()[-3000:]}")
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0
    reg = Registry(home)
    (run,) = reg.list_runs(stage="pipeline")
    assert run["status"] == "failed" and "kernel" in run["error"].lower(), run["error"]
    assert reg.integrity_check() == [] and reg.verify_artifacts() == []

"""Several writers at once (two sweeps, a detached fine-tune and a served deployment's request log), and a pipeline
kernel killed mid-cell: every run ends recorded as what happened, every request is logged, and the registry database
and artifacts stay sound."""

from __future__ import annotations

import json
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


#: requests sent to the served deployment while the sweeps and the fine-tune write
N_REQUESTS = 24


def _send_requests(url: str, n: int, ids: list[str], errors: list[BaseException]) -> None:
    """``n`` chat requests with the official client, one after another; the response ids are collected."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    try:
        for i in range(n):
            reply = client.chat.completions.create(model="tiny-llama", max_tokens=4, temperature=0,
                                                   messages=[{"role": "user", "content": f"request {i}"}])
            ids.append(reply.id)
    except BaseException as exc:  # noqa: BLE001 - reported by the test thread
        errors.append(exc)


def test_two_sweeps_a_detached_finetune_and_a_served_request_log_write_at_once(backend, registry, tiny_model,
                                                                               tiny_dataset, tmp_path, monkeypatch):
    """On SQLite and on PostgreSQL (``backend``): the sweeps' kernels, the fine-tune worker and the detached serve
    process inherit LLMOPS_REGISTRY; requests sent with the ``openai`` client while the others write are every one
    in the request log (checked while the deployment still runs, not only after its shutdown flush)."""
    import threading

    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.stages.serve import server

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the serve process inherits it
    served = Runner(registry).run("serve", {"model": str(tiny_model), "auth": False, "detach": True,
                                            "max_tokens": 8})
    dep = served.run_id
    try:
        nb = notebook(tmp_path / "toy.ipynb", "rank = 1", TOY)
        sweeps = [llmops(registry.home, "sweep", str(nb), "--grid", f"rank={a},{b}", "--parallel", "1",
                         "--no-cache") for a, b in ((1, 2), (3, 4))]
        ids: list[str] = []
        errors: list[BaseException] = []
        sender = threading.Thread(target=_send_requests, args=(served.outputs["deployment"].info["url"], N_REQUESTS,
                                                               ids, errors))
        sender.start()
        ft = Runner(registry).run("finetune", {"model": str(tiny_model), "data": tiny_dataset.hash, "max_steps": 12,
                                               "batch_size": 4, "log_every": 1, "checkpoint_every": 3,
                                               "detach": True})
        assert ft.outputs["run"].wait(timeout=600)["status"] == "finished"
        for proc in sweeps:
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, out[-3000:]
        sender.join(600)
        assert not sender.is_alive() and not errors, errors
        assert len(ids) == N_REQUESTS
        wait_until(lambda: len(registry.requests(dep)) >= N_REQUESTS, 120, what="every request in the request log")
        logged = registry.requests(dep)
        assert sorted(r["request_id"] for r in logged) == sorted(ids)  # each once: none lost, none doubled
        assert {r["status"] for r in logged} == {200}
        assert sorted(m for r in logged for m in [json.loads(r["messages"])[0]["content"]]) == sorted(
            f"request {i}" for i in range(N_REQUESTS))
    finally:
        server.stop(registry, dep, timeout=60)
    runs = registry.list_runs(limit=None)
    assert {r["status"] for r in runs if r["id"] != dep} == {"finished"}, [(r["id"], r["status"], r["error"])
                                                                           for r in runs]
    toys = [r for r in runs if r["stage"] == "toy-train"]
    assert sorted(r["params"]["rank"] for r in toys) == [1, 2, 3, 4]
    assert all(len(registry.metric_history(r["id"], "loss")) == 20 for r in toys)  # no write lost
    assert len(registry.requests(dep)) == N_REQUESTS  # the shutdown flush adds nothing twice
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

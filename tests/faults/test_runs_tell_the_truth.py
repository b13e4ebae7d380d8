"""Runs tell the truth under real signals: SIGTERM records 'interrupted' with the last checkpoint, a SIGKILLed
process is reported 'failed' by the next reader, a detached fine-tune is one run, --resume honours or refuses
changed options. Processes are real (`llmops` CLI subprocesses) and killed with real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llmops_jupyter.core.errors import StageError
from llmops_jupyter.testing import wait_until

pytestmark = pytest.mark.slow  # real kernels, servers or killed processes: over ~20 s on 2 cores

ROOT = Path(__file__).resolve().parents[2]
FAST = {"batch_size": 4, "lr": 1e-2, "log_every": 1, "seq_len": 64}


def cli(home: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "LLMOPS_HOME": str(home), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "llmops_jupyter.frontends.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 180.0):
    """``cond`` becomes true while ``proc`` (the CLI doing the work) still runs."""
    return wait_until(cond, timeout, what=what, abort=lambda: proc.poll() is not None and (
        f"the process ended early ({proc.returncode}): {proc.stdout.read()[-3000:]}"))


def start_long_finetune(registry, tiny_model, tiny_dataset, every: int = 2) -> tuple[subprocess.Popen, str]:
    proc = cli(registry.home, "finetune", "--model", str(tiny_model), "--data", tiny_dataset.hash,
               "--max-steps", "100000", "--checkpoint-every", str(every), "--batch-size", "4", "--seq-len", "64",
               "--log-every", "1", "--lr", "1e-2")
    run_id = wait_for(lambda: next((r["id"] for r in registry.list_runs(stage="finetune")), None), proc,
                      "the finetune run to be recorded")
    return proc, run_id


def test_sigterm_records_interrupted_with_checkpoint_then_resume_honours_max_steps(registry, tiny_model,
                                                                                  tiny_dataset):
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.stages.finetune.train import last_checkpoint

    proc, run_id = start_long_finetune(registry, tiny_model, tiny_dataset)
    wait_for(lambda: last_checkpoint(registry, run_id), proc, "the first checkpoint")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    run = registry.get_run(run_id)
    assert run["status"] == "interrupted", run
    step, _ = last_checkpoint(registry, run_id)
    assert "SIGTERM" in run["error"] and f"step {step}" in run["error"] and f"--resume {run_id}" in run["error"]

    target = step + 3
    resumed = Runner(registry).run("finetune", {"model": str(tiny_model), "data": tiny_dataset.hash, **FAST,
                                                "resume": run_id, "max_steps": target})
    assert resumed.status == "finished"
    assert resumed.summary["steps"] == target  # not the original 100000
    assert resumed.summary["resume_changes"] == {"max_steps": [100000, target]}
    assert resumed.params["max_steps"] == target


def test_resume_refuses_a_changed_training_option_in_one_line(registry, tiny_model, tiny_dataset):
    from llmops_jupyter.core.runner import EventType, RunInterrupted, Runner

    def stop_at_3(event):
        if event.type is EventType.PROGRESS and event.data.get("done") == 3:
            raise KeyboardInterrupt

    base = {"model": str(tiny_model), "data": tiny_dataset.hash, **FAST, "max_steps": 6, "checkpoint_every": 2}
    with pytest.raises(RunInterrupted) as info:
        Runner(registry, listeners=[stop_at_3]).run("finetune", base)
    with pytest.raises(StageError) as err:
        Runner(registry).run("finetune", {**base, "resume": info.value.run_id, "lr": 5e-3})
    assert "--lr 0.005 differs from run" in str(err.value) and "\n" not in str(err.value)


def test_sigkill_is_reported_failed_by_the_next_reader(registry, tiny_model, tiny_dataset):
    proc, run_id = start_long_finetune(registry, tiny_model, tiny_dataset, every=0)
    wait_for(lambda: "loss" in registry.metrics(run_id), proc, "the first logged loss")
    assert registry.get_run(run_id)["status"] == "running"
    proc.kill()
    proc.wait(timeout=60)
    (run,) = [r for r in registry.list_runs(stage="finetune") if r["id"] == run_id]  # any reader: the runs view
    assert run["status"] == "failed" and "process gone" in run["error"] and str(proc.pid) in run["error"]
    assert registry.get_run(run_id)["status"] == "failed"


def test_a_recycled_pid_is_not_the_run_process():
    from llmops_jupyter.core.env import process_gone, process_start

    me, host = os.getpid(), os.uname().nodename
    assert not process_gone(me, host, process_start(me))
    assert process_gone(me, host, process_start(me) - 1)  # same pid, another process start: not ours
    assert not process_gone(me, "another-host", None)  # never judged from another host
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_gone(child.pid, host, None)


def test_detach_records_one_training_run(registry, tiny_model, tiny_dataset, monkeypatch):
    from llmops_jupyter.core.runner import Runner

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = Runner(registry).run("finetune", {"model": str(tiny_model), "data": tiny_dataset.hash, **FAST,
                                            "max_steps": 3, "checkpoint_every": 0, "detach": True})
    handle = res.outputs["run"]
    assert handle.run_id == res.run_id and res.status == "running"
    run = handle.wait(timeout=300)
    assert run["status"] == "finished", handle.log.read_text()[-2000:]
    runs = registry.list_runs(stage="finetune", limit=None)
    assert [r["id"] for r in runs] == [res.run_id]  # one training, one run
    assert run["pid"] == handle.pid and run["duration_s"] > 0.5
    assert [a.kind for a in registry.run_artifacts(res.run_id, "output")] == ["adapter"]

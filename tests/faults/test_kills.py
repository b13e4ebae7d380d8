"""kill -9 at the worst moments, then check the registry says what happened, resume works, nothing half-written
is picked up or left behind, every stored artifact still hashes to its id and the database passes SQLite's check."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from llmops_jupyter.core.errors import StageError
from llmops_jupyter.testing import wait_until

pytestmark = pytest.mark.slow  # real kernels, servers or killed processes: over ~20 s on 2 cores

ROOT = Path(__file__).resolve().parents[2]
FAST = {"batch_size": 4, "lr": 1e-2, "log_every": 1, "seq_len": 64}

# Runs in the worker before its main(): the checkpoint save of step 4 writes a partial weights file and the process
# SIGKILLs itself in the middle of it, as an OOM kill or a power cut would.
DIE_IN_SAVE = """
import os, signal, sys
import transformers.trainer as tr
_orig = tr.Trainer._save_checkpoint
def _save(self, model, trial, *a, **k):
    if self.state.global_step == 4:
        out = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "adapter_model.safetensors"), "wb") as fh:
            fh.write(b"half a tensor")
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return _orig(self, model, trial, *a, **k)
tr.Trainer._save_checkpoint = _save
from llmops_jupyter.stages.finetune.launch import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture()
def worker_env(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def detached(registry, tiny_model, tiny_dataset, **kw):
    from llmops_jupyter.core.runner import Runner

    res = Runner(registry).run("finetune", {"model": str(tiny_model), "data": tiny_dataset.hash, **FAST,
                                            "max_steps": 100000, "detach": True, **kw})
    return res.outputs["run"]


def sound(registry) -> None:
    assert registry.integrity_check() == []
    assert registry.verify_artifacts() == []
    assert not list(registry.tmp_dir.iterdir()), list(registry.tmp_dir.iterdir())  # no staging left behind


def resume_and_check(registry, tiny_model, tiny_dataset, run_id: str, from_step: int):
    from llmops_jupyter.core.runner import Runner

    resumed = Runner(registry).run("finetune", {"model": str(tiny_model), "data": tiny_dataset.hash, **FAST,
                                                "resume": run_id, "max_steps": from_step + 2})
    assert resumed.status == "finished" and resumed.summary["resumed_at_step"] == from_step
    assert resumed.summary["steps"] == from_step + 2
    sound(registry)
    return resumed


def test_kill9_during_training_then_resume(registry, tiny_model, tiny_dataset, worker_env):
    from llmops_jupyter.stages.finetune.train import last_checkpoint

    handle = detached(registry, tiny_model, tiny_dataset, checkpoint_every=2)
    wait_until(lambda: last_checkpoint(registry, handle.run_id), 240, what="the worker's first checkpoint",
               details=lambda: handle.log.read_text()[-2000:])
    os.kill(handle.pid, signal.SIGKILL)
    with pytest.raises(StageError, match="SIGKILL"):
        handle.wait(timeout=60)
    assert registry.get_run(handle.run_id)["status"] == "failed"
    step, _ = last_checkpoint(registry, handle.run_id)
    resume_and_check(registry, tiny_model, tiny_dataset, handle.run_id, step)


def test_kill9_in_the_middle_of_a_checkpoint_write(registry, tiny_model, tiny_dataset, worker_env, monkeypatch):
    from llmops_jupyter.stages.finetune import launch
    from llmops_jupyter.stages.finetune.train import checkpoints, last_checkpoint, run_dir

    real = launch.worker_command
    monkeypatch.setattr(launch, "worker_command",
                        lambda *a, **k: [sys.executable, "-c", DIE_IN_SAVE, *real(*a, **k)[3:]])
    handle = detached(registry, tiny_model, tiny_dataset, checkpoint_every=2)
    with pytest.raises(StageError, match="SIGKILL"):
        handle.wait(timeout=300)
    folder = run_dir(registry, handle.run_id) / "checkpoints"
    assert (folder / "checkpoint-4" / "adapter_model.safetensors").read_bytes() == b"half a tensor"
    assert [s for s, _ in checkpoints(folder)] == [2]  # the half-written checkpoint is never picked
    assert last_checkpoint(registry, handle.run_id)[0] == 2
    resume_and_check(registry, tiny_model, tiny_dataset, handle.run_id, 2)
    assert not (folder / "checkpoint-4").exists()  # resuming cleared the dead run's half-written checkpoint

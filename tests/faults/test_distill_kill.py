"""kill -9 a distillation in the middle of training (a CLI process, as a pipeline runs it), then ``--resume``: the
registry says the killed run failed and stored nothing, the resumed run continues from the last complete checkpoint
to the end and stores the student, and the registry passes its checks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a killed training process: ~1 min on 2 cores

ROOT = Path(__file__).resolve().parents[2]


def test_kill9_during_distill_then_resume(registry, tiny_model, tiny_dataset, tmp_path):
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.models.tiny import build_tiny_model
    from llmops_jupyter.stages.finetune.train import last_checkpoint
    from llmops_jupyter.testing import wait_until

    student = build_tiny_model(tmp_path / "student", seed=1)  # same tokenizer, other weights
    env = {**os.environ, "LLMOPS_HOME": str(registry.home), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "llmops_jupyter.frontends.cli", "distill", "--teacher", str(tiny_model),
           "--student", str(student), "--data", tiny_dataset.hash, "--max-steps", "100000", "--batch-size", "4",
           "--seq-len", "64", "--log-every", "1", "--checkpoint-every", "2", "--generate-tokens", "0"]
    log = tmp_path / "cli.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    def checkpointed() -> str | None:
        runs = registry.list_runs(stage="distill")
        return runs[0]["id"] if runs and last_checkpoint(registry, runs[0]["id"]) else None

    run_id = wait_until(checkpointed, 240, what="the distill run's first checkpoint",
                        abort=lambda: proc.poll() is not None and f"the CLI exited ({proc.returncode})",
                        details=lambda: log.read_text()[-2000:])
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    run = registry.get_run(run_id)
    assert run["status"] == "failed" and "process gone" in run["error"]
    assert registry.list_artifacts("distilled") == []
    step, _ = last_checkpoint(registry, run_id)

    resumed = Runner(registry).run("distill", resume=run_id, max_steps=step + 2, generate_tokens=0)
    assert resumed.status == "finished" and resumed.summary["resumed_at_step"] == step
    assert resumed.summary["steps"] == step + 2
    (art,) = registry.list_artifacts("distilled")
    assert art.run_id == resumed.run_id
    assert registry.get_run(run_id)["status"] == "failed"  # the killed run stays what it was
    assert registry.integrity_check() == [] and registry.verify_artifacts() == []
    assert not list(registry.tmp_dir.iterdir())

"""`llmops run`: every pipeline failure is one stderr line (cell, its first line, the error, the fix) and the same
error on the recorded run; while the kernel works, the notebook's stages report progress lines on stdout.

Real notebooks on a real kernel through the real command line (a subprocess: its stderr is exactly what a user sees).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from llmops_jupyter.registry import Registry

pytestmark = pytest.mark.slow  # real kernels, servers or killed processes: over ~20 s on 2 cores

pytest.importorskip("papermill")


def make_notebook(path: Path, body: list[str]) -> Path:
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell("n = 1")
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, *(nbformat.v4.new_code_cell(s) for s in body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def llmops(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmops_jupyter.frontends.cli", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})}, cwd=cwd)


@pytest.mark.parametrize("cell, expect", [
    ("import time\ntime.sleep(120)", r"timed out in cell 2 \(`import time`\): it ran longer than --timeout 3s\."),
    ("x = 1\nraise ValueError('boom\\nsecond line of the message')", r"failed in cell 2 \(`x = 1`\): ValueError: boom"),
    ("import os\nos._exit(1)", r"died while running cell 2 \(`import os`\)"),
], ids=["timeout", "raises", "kernel-dies"])
def test_each_failure_is_one_line_and_the_run_says_the_same(home, tmp_path, cell, expect):
    nb = make_notebook(tmp_path / "fails.ipynb", ["print('hello')", cell])
    proc = llmops("run", str(nb), "--timeout", "3", "--no-cache", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("llmops: StageError: Notebook fails.ipynb ") or \
        line.startswith("llmops: StageError: The kernel of fails.ipynb "), line
    assert re.search(expect, line), line
    assert " Fix: " in line
    run = Registry(home).get_run("pipeline@latest")
    assert run["status"] == "failed"
    assert line == f"llmops: StageError: {run['error']}"
    assert run["summary"].get("output_notebook")  # the detail is in the executed notebook


STEPS_STAGE = '''
import dataclasses, time
from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.runner import Runner
from llmops_jupyter.core.stage import Stage

@dataclasses.dataclass
class StepsConfig(StageConfig):
    steps: int = option(8, "steps", min=1)

class Steps(Stage):
    name = "steps"
    config_cls = StepsConfig

    def run(self, ctx):
        for i in range(ctx.config.steps):
            time.sleep(0.5)
            ctx.log_metrics({"loss": 2.0 / (i + 1)}, step=i + 1)
            ctx.progress(i + 1, ctx.config.steps, "steps")
        return {}

Runner().run(Steps(), steps=8)
'''


def test_run_prints_progress_lines_while_the_notebook_runs(home, tmp_path):
    nb = make_notebook(tmp_path / "train.ipynb", [STEPS_STAGE])
    proc = llmops("run", str(nb), "--no-cache", env={"LLMOPS_PROGRESS_EVERY": "1"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    started = [ln for ln in lines if re.search(r"\] steps\s+steps-\w+\s+started$", ln)]
    steps = [ln for ln in lines if re.search(r"\] steps\s+steps-\w+\s+step \d+/8\s+\d+% loss [\d.]+", ln)]
    ended = [ln for ln in lines if re.search(r"\] steps\s+steps-\w+\s+finished in \d\d:\d\d$", ln)]  # not timed
    assert started and ended, proc.stdout
    assert len(steps) >= 2, proc.stdout  # while it ran, not only at the end
    assert any("ETA" in ln for ln in steps), proc.stdout
    assert len(steps) <= 8, proc.stdout  # at most one a second (8 steps in 4 s), never one per event
    assert lines.index(started[0]) < lines.index(steps[0]) < lines.index(ended[0])
    assert proc.stderr == ""

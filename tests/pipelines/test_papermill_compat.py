"""`llmops run` runs what papermill runs: a parameters cell holding IPython syntax (a magic, a shell command) that
Python's parser cannot read still runs, with the parameters that can be read typed and injected, and one line saying
which lines gave no parameter. A badly typed value is still refused in one line, before any kernel starts.

Real notebooks through the real command line (stderr is what a user sees) on a real kernel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from llmops_jupyter.core.errors import ConfigError
from llmops_jupyter.pipelines.params import parameters_cell
from llmops_jupyter.registry import Registry

papermill = pytest.importorskip("papermill")

PARAMS = "%config Completer.use_jedi = False\na = 1.0  # learning rate\n!echo shell-ran\nname = 'demo'"


def make_notebook(path: Path, params: str = PARAMS) -> Path:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell("print(f'a={a!r} {type(a).__name__} name={name}')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def llmops(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmops_jupyter.frontends.cli", *args], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ), cwd=cwd)


def test_reads_what_papermill_reads(tmp_path):
    nb = make_notebook(tmp_path / "magic.ipynb")
    declared, skipped = parameters_cell(nbformat.read(nb, as_version=4), "magic.ipynb")
    assert set(declared) == set(papermill.inspect_notebook(str(nb))) == {"a", "name"}
    assert (declared["a"].type, declared["a"].default, declared["a"].line) == (float, 1.0, 2)
    assert [(s.line, s.text) for s in skipped] == [(1, "%config Completer.use_jedi = False"), (3, "!echo shell-ran")]


def test_a_cell_ipython_cannot_run_either_is_refused_in_one_line(tmp_path):
    nb = make_notebook(tmp_path / "broken.ipynb", "a = 1.0\nb = (2,")
    with pytest.raises(ConfigError) as info:
        parameters_cell(nbformat.read(nb, as_version=4), "broken.ipynb")
    message = str(info.value)
    assert "\n" not in message
    assert "broken.ipynb: the parameters cell (cell 0) is not valid Python (line 2 `b = (2,`" in message


@pytest.mark.slow  # a real kernel
def test_run_injects_the_value_and_says_which_line_was_skipped(home, tmp_path):
    nb = make_notebook(tmp_path / "magic.ipynb")
    out = tmp_path / "out.ipynb"
    proc = llmops("run", str(nb), "-p", "a", "3.5", "--no-cache", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "llmops: note: magic.ipynb: parameters cell (cell 0) lines 1 `%config Completer.use_jedi = False`, "
        "3 `!echo shell-ran` skipped: IPython syntax, not Python; the kernel runs it, but no parameter is read "
        "from it (as papermill does)."], proc.stderr
    executed = nbformat.read(out, as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert "shell-ran" in printed  # the shell line ran in the kernel, as under papermill
    assert "a=3.5 float name=demo" in printed  # the injected value won over the default
    (run,) = Registry(home).list_runs(stage="pipeline")
    assert run["status"] == "finished" and run["params"]["parameters"] == {"a": 3.5}


def test_a_badly_typed_value_is_still_refused_in_one_line(home, tmp_path):
    nb = make_notebook(tmp_path / "magic.ipynb")
    proc = llmops("run", str(nb), "-p", "a", "notanumber", cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.splitlines() == [
        "llmops: ConfigError: Parameter 'a' must be a number (float) (got 'notanumber'). "
        "Fix: pass -p a <value of the right type>"], proc.stderr
    assert not Registry(home).list_runs(stage="pipeline")  # refused before any kernel started

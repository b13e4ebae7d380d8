"""One SQLite registry written from two hosts warns in one line with the fix (LLMOPS_REGISTRY=postgresql://...).

"Another host" is a real process in its own UTS namespace (``unshare -u``) whose hostname differs: a real stage run
there records its host through the product's own path (the run row), as a process on another machine would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llmops_jupyter.registry import Registry
from llmops_jupyter.testing import wait_until

ROOT = Path(__file__).resolve().parents[2]
OTHER = "llmops-other-host"

WAITING_STAGE = '''
import dataclasses, sys, threading
from pathlib import Path
from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.runner import Runner
from llmops_jupyter.core.stage import Stage, register_stage

@dataclasses.dataclass
class WaitConfig(StageConfig):
    flag: str = option("flag", "file written once the run is recorded")

@register_stage
class Wait(Stage):
    name = "wait-elsewhere"
    config_cls = WaitConfig

    def run(self, ctx):
        Path(ctx.config.flag).write_text(ctx.run_id)
        threading.Event().wait()  # runs until the test kills it

Runner().run("wait-elsewhere", {"flag": sys.argv[1]})
'''


def _unshare() -> list[str]:
    for cmd in (["unshare", "-u"], ["unshare", "-r", "-u"]):
        try:
            if subprocess.run([*cmd, "true"], capture_output=True, timeout=30).returncode == 0:
                return cmd
        except (OSError, subprocess.TimeoutExpired):
            continue
    pytest.skip("no UTS namespace here (unshare -u refused): cannot run a process with another hostname")


@pytest.fixture()
def run_elsewhere(home, tmp_path, backend):
    """A stage run recorded from host ``OTHER``, still running; killed at teardown."""
    cmd = _unshare()
    script, flag = tmp_path / "wait.py", tmp_path / "running.flag"
    script.write_text(WAITING_STAGE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([*cmd, "sh", "-c", f'hostname {OTHER} && exec "$0" "$@"', sys.executable, str(script),
                             str(flag)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_until(flag.exists, 120, what="the run on the other host", abort=lambda: proc.poll() is not None and
                   f"it exited: {proc.stdout.read()[-2000:]}")
        yield flag.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_sqlite_registry_written_from_another_host_warns_once_with_the_fix(run_elsewhere, home, backend, capsys):
    reg = Registry(home)
    run = reg.get_run(run_elsewhere)
    assert run["host"] == OTHER and run["host"] != os.uname().nodename
    assert run["status"] == "running", "a run on another host must not be judged dead from here"
    err = capsys.readouterr().err
    if backend == "postgresql":
        assert OTHER not in err and reg.other_host_writer() is None
        return
    lines = [line for line in err.splitlines() if OTHER in line]
    assert len(lines) == 1, err
    assert run_elsewhere in lines[0] and "LLMOPS_REGISTRY=postgresql://" in lines[0] and str(reg.db_path) in lines[0]
    # once per process: opening it again, or starting a run here, does not repeat it
    Registry(home)
    reg.create_run("data")
    assert OTHER not in capsys.readouterr().err


def test_a_sqlite_registry_used_on_one_host_does_not_warn(home, capsys, monkeypatch):
    monkeypatch.delenv("LLMOPS_REGISTRY", raising=False)
    reg = Registry(home)
    reg.create_run("data")
    Registry(home)
    assert reg.other_host_writer() is None and "also being written from host" not in capsys.readouterr().err

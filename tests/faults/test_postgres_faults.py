"""Faults on the PostgreSQL registry: a writer SIGKILLed inside its transaction leaves no partial rows and holds no
lock; the server restarted under a running fine-tune: the run reconnects and finishes with every step recorded;
the server gone for longer than the retry window: the run ends ``failed`` with the reason, never ``running``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmops_jupyter.registry import Registry, RunStatus
from llmops_jupyter.testing import wait_until

ROOT = Path(__file__).resolve().parents[2]


def test_sigkill_inside_a_transaction_leaves_no_partial_rows(pg_url, home, tmp_path):
    reg = Registry(home)
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import sys, pathlib
        from llmops_jupyter.registry import Registry
        reg = Registry({str(home)!r})
        with reg._transaction() as con:  # one write: a run and its metrics, killed before COMMIT
            con.execute("INSERT INTO runs (id, stage, status, created_at) VALUES ('half-1', 'data', 'running', 0)")
            con.executemany("INSERT INTO metrics (run_id, key, value, ts) VALUES ('half-1', ?, 1.0, 0)",
                            [(f"m{{i}}",) for i in range(50)])
            pathlib.Path({str(ready)!r}).write_text("in transaction")
            sys.stdin.read()  # hold the transaction open until killed
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                                          "")])})
    try:
        wait_until(ready.exists, 60, what="the writer to be inside its transaction", abort=proc.poll)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # the server rolls the dead client's transaction back and frees the write lock: the next write goes through
    run = reg.create_run("data")
    assert [r["id"] for r in reg.list_runs(limit=None)] == [run]
    assert reg._query("SELECT COUNT(*) FROM metrics")[0][0] == 0


def test_server_restarted_during_a_finetune_reconnects_and_records_every_step(pg_server, pg_url, registry,
                                                                               tiny_model, tiny_dataset):
    from llmops_jupyter.core.runner import EventType, Runner

    restarted = []

    def restart_once(event):
        if event.type == EventType.METRIC and not restarted:
            pg_server.restart()  # an immediate stop: every connection is cut, as a crash or a failover would
            restarted.append(event.run_id)

    res = Runner(registry, listeners=[restart_once]).run(
        "finetune", {"model": str(tiny_model), "data": tiny_dataset.hash, "max_steps": 6, "batch_size": 4,
                     "log_every": 1, "checkpoint_every": 0, "seq_len": 64})
    assert restarted == [res.run_id]
    run = registry.get_run(res.run_id)
    assert run["status"] == RunStatus.FINISHED.value, run["error"]
    assert [r["step"] for r in registry.metric_history(res.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    assert registry.verify_artifacts() == []


@pytest.mark.slow
def test_server_gone_longer_than_the_retry_window_ends_the_run_failed(pg_server, pg_url, registry, tiny_model,
                                                                      tiny_dataset, tmp_path):
    """A fine-tune in its own process; the server stops mid-run and stays down past LLMOPS_REGISTRY_RETRY_S: the
    process fails; once the server is back the next reader records the run ``failed`` with why."""
    stopped = tmp_path / "stopped"
    script = textwrap.dedent(f"""
        import pathlib
        from llmops_jupyter.core.runner import EventType, Runner
        from llmops_jupyter.registry import Registry

        def on(event):
            if event.type == EventType.METRIC and event.data.get("step") == 2:
                pathlib.Path({str(stopped)!r}).write_text("go")
                import sys
                sys.stdin.readline()  # blocks until the test has stopped the server

        Runner(Registry({str(registry.home)!r}), listeners=[on]).run(
            "finetune", {{"model": {str(tiny_model)!r}, "data": {tiny_dataset.hash!r}, "max_steps": 40,
                         "batch_size": 4, "log_every": 1, "checkpoint_every": 0, "seq_len": 64}})
    """)
    env = {**os.environ, "LLMOPS_REGISTRY_RETRY_S": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(stopped.exists, 300, what="the fine-tune to reach step 2", abort=proc.poll)
        pg_server.stop("immediate")
        out, _ = proc.communicate("down\n", timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        pg_server.start()
    assert proc.returncode != 0, out[-2000:]
    assert "Cannot reach the registry database" in out
    run = registry.list_runs(stage="finetune")[0]
    assert run["status"] == RunStatus.FAILED.value and "process gone" in run["error"]

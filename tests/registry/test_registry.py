import multiprocessing as mp
import os
import sqlite3
import stat

import pytest

from llmops_jupyter.core.errors import NotFoundError, RegistryError
from llmops_jupyter.registry import Registry, RunStatus

pytestmark = pytest.mark.usefixtures("backend")  # every test on SQLite and on PostgreSQL (conftest.py)


def _writer(home, worker, n):
    reg = Registry(home)
    for i in range(n):
        run = reg.create_run("data", {"worker": worker, "i": i})
        reg.log_metrics(run, {"loss": float(i), "acc": 0.5}, step=i)
        folder = reg.staging_dir()
        (folder / "payload.txt").write_text(f"{worker}-{i}")
        reg.add_artifact(folder, "dataset", run_id=run, move=True)
        reg.finish_run(run, RunStatus.FINISHED)


def test_concurrent_writer_processes_lose_nothing(tmp_path, backend):
    home = tmp_path / ".llmops"
    Registry(home)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(home), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    reg = Registry(home)
    assert len(reg.list_runs(limit=None)) == 100
    assert sum(len(reg.metric_history(r["id"])) for r in reg.list_runs(limit=None)) == 200
    assert len(reg.list_artifacts(limit=1000)) == 100
    assert all(r["status"] == "finished" for r in reg.list_runs(limit=None))
    assert list((home / "tmp").iterdir()) == []
    assert reg.backend.name == backend
    if backend == "sqlite":
        con = sqlite3.connect(home / "registry.db")
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    else:
        assert not (home / "registry.db").exists()


def test_artifacts_are_content_addressed_and_lineage_is_queryable(registry, tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("hello")
    run1 = registry.create_run("data")
    a = registry.add_artifact(src, "dataset", run_id=run1)
    again = registry.add_artifact(src, "dataset", run_id=run1)
    assert a.hash == again.hash and (a.path / "a.txt").read_text() == "hello"
    run2 = registry.create_run("finetune")
    registry.link_input(run2, a.hash)
    b_src = tmp_path / "adapter"
    b_src.mkdir()
    (b_src / "w.bin").write_bytes(b"\x00\x01")
    b = registry.add_artifact(b_src, "adapter", run_id=run2, inputs=[a.hash], relation="finetune")
    run3 = registry.create_run("merge")
    m_src = tmp_path / "merged"
    m_src.mkdir()
    (m_src / "w.bin").write_bytes(b"\x02")
    m = registry.add_artifact(m_src, "merged", run_id=run3, inputs=[b.hash])
    chain = registry.lineage_chain(m)
    assert [x.kind for x in chain] == ["dataset", "adapter", "merged"]
    down = registry.lineage(a, "down")
    assert {n["kind"] for n in down["nodes"]} == {"dataset", "adapter", "merged"}
    assert registry.get_artifact(run2).hash == b.hash
    assert registry.get_artifact(f"{run3}:merged").hash == m.hash
    assert registry.get_artifact(m.hash[:8]).hash == m.hash


def test_run_references_resolve(registry):
    first = registry.create_run("data")
    second = registry.create_run("data")
    ft = registry.create_run("finetune")
    assert registry.resolve_run("data@latest") == second
    assert registry.resolve_run("latest") == ft
    assert registry.resolve_run(first) == first
    with pytest.raises(NotFoundError, match="No run 'nope'"):
        registry.resolve_run("nope")
    with pytest.raises(NotFoundError, match="No eval runs"):
        registry.resolve_run("eval@latest")


def test_failed_ingest_leaves_nothing_behind(registry, tmp_path, monkeypatch):
    src = tmp_path / "d"
    src.mkdir()
    (src / "x").write_text("x")
    import llmops_jupyter.registry.core as core

    def boom(path):
        raise OSError("disk full")

    monkeypatch.setattr(core, "hash_tree", boom)
    with pytest.raises(OSError):
        registry.add_artifact(src, "dataset")
    assert list(registry.tmp_dir.iterdir()) == []
    assert not any(registry.artifacts_dir.iterdir())
    assert registry.list_artifacts() == []


def test_unwritable_registry_folder_is_a_clear_error(tmp_path):
    """A folder the process may not write. Root writes anywhere (CI runs as root): there the folder is made
    immutable (`chattr +i`), which binds root too."""
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    else:
        made = subprocess.run(["chattr", "+i", str(ro)], capture_output=True, text=True)
        assert made.returncode == 0, f"cannot make a folder read-only for root here: {made.stderr}"
    try:
        with pytest.raises(RegistryError, match="not writable.*Fix: set LLMOPS_HOME"):
            Registry(ro / ".llmops")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(ro)], check=True)


def test_registry_home_that_is_a_file_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RegistryError, match="not writable.*Fix: set LLMOPS_HOME"):
        Registry(blocker / ".llmops")


def test_typed_queries_for_children_derived_artifacts_and_inputs(registry, tmp_path):
    parent = registry.create_run("sweep")
    a = registry.create_run("pipeline", parent_id=parent)
    b = registry.create_run("report", parent_id=parent)
    c = registry.create_run("pipeline", parent_id=parent)
    assert [r["id"] for r in registry.child_runs(parent)] == [a, b, c]
    assert [r["id"] for r in registry.child_runs(parent, "pipeline", newest_first=True)] == [c, a]
    assert registry.child_runs(a) == []

    src = tmp_path / "model.txt"
    src.write_text("weights")
    model = registry.add_artifact(src, "merged", run_id=a)
    card_src = tmp_path / "card.md"
    card_src.write_text("card")
    card = registry.add_artifact(card_src, "model-card", inputs=[model.hash])
    assert [x.hash for x in registry.derived_artifacts(model.hash)] == [card.hash]
    assert registry.derived_artifacts(model.hash, "model-card", limit=1)[0].path == card.path
    assert registry.derived_artifacts(model.hash, "dataset") == []

    registry.link_input(c, model.hash)
    assert registry.input_links([model.hash, card.hash]) == [(c, model.hash)]
    assert registry.input_links([]) == []


def test_audit_rows_are_append_only(registry):
    run = registry.create_run("data")
    registry.add_audit("started", user="ada", run_id=run, stage="data", detail={"b": 1, "a": [2]})
    registry.add_audit("card", user="bob", artifact="abc", kind="model-card")
    rows = registry.audit_rows()
    assert [r["event"] for r in rows] == ["started", "card"] and rows[0]["detail"] == {"a": [2], "b": 1}
    assert [r["event"] for r in registry.audit_rows(run_id=run)] == ["started"]
    assert [r["user"] for r in registry.audit_rows(user="bob", event="card")] == ["bob"]
    assert [r["event"] for r in registry.audit_rows(limit=1)] == ["card"]
    assert registry.audit_rows(since=rows[-1]["ts"] + 1) == []
    with pytest.raises(registry.backend.IntegrityError, match="append-only"):
        with registry._transaction() as con:
            con.execute("DELETE FROM audit_log")
    with pytest.raises(registry.backend.IntegrityError, match="append-only"):
        with registry._transaction() as con:
            con.execute("UPDATE audit_log SET event='edited'")
    assert [r["event"] for r in registry.audit_rows()] == ["started", "card"]


class _InterruptAfter:
    """A registry connection on which a signal handler raises KeyboardInterrupt just after ``statement`` returned,
    as SIGINT (or the runner's SIGTERM handler) does when the signal lands during that call."""

    def __init__(self, con, statement):
        self._con, self._statement = con, statement

    def __getattr__(self, name):
        return getattr(self._con, name)

    def execute(self, sql, *args):
        cursor = self._con.execute(sql, *args)
        if sql == self._statement:
            raise KeyboardInterrupt
        return cursor


def test_an_interrupt_just_after_commit_or_begin_is_what_the_caller_sees_and_leaves_no_open_write(
        registry, monkeypatch):
    """CI once saw SIGTERM land right after COMMIT returned: the ROLLBACK that followed failed ('no transaction is
    active') and that error replaced the interrupt, so the fine-tune exited 1 instead of 130."""
    run = registry.create_run("data", {})
    real = registry._connect()

    registry._local.con = _InterruptAfter(real, "COMMIT")
    with pytest.raises(KeyboardInterrupt):
        registry.log_metrics(run, {"loss": 1.0}, step=1)
    registry._local.con = real
    assert [m["value"] for m in registry.metric_history(run)] == [1.0]  # COMMIT had returned: the row is kept

    begin = registry.backend.begin

    def begin_then_interrupt(con):
        begin(con)
        raise KeyboardInterrupt

    monkeypatch.setattr(registry.backend, "begin", begin_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        registry.log_metrics(run, {"loss": 2.0}, step=2)
    monkeypatch.setattr(registry.backend, "begin", begin)
    assert not real.in_transaction  # not left open, so the runner can still record the interrupt
    registry.finish_run(run, RunStatus.INTERRUPTED, error="interrupted (SIGTERM)")
    assert registry.get_run(run)["status"] == "interrupted"
    assert [m["value"] for m in registry.metric_history(run)] == [1.0]

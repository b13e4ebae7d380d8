"""``llmops registry copy --to postgresql://...``: a SQLite registry made by real stages, moved and verified; the
views answer the same on both; the CLI's ``--registry`` and ``runs --user``."""

from __future__ import annotations

import json

import pytest

from llmops_jupyter.frontends.cli import main as cli
from llmops_jupyter.registry import Registry
from llmops_jupyter.registry.transfer import row_counts
from llmops_jupyter.testing import tiny_records


@pytest.fixture()
def sqlite_registry(home, tmp_path, monkeypatch):
    """Two data runs (the real stage, through the CLI) in a SQLite registry, one of them by another user."""
    monkeypatch.delenv("LLMOPS_REGISTRY", raising=False)
    src = tmp_path / "records.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in tiny_records(24)))
    assert cli(["--home", str(home), "data", str(src), "--name", "a", "--no-dedup"]) == 0
    monkeypatch.setenv("JUPYTERHUB_USER", "grace")
    assert cli(["--home", str(home), "data", str(src), "--name", "b", "--seed", "1",
                "--no-dedup"]) == 0
    monkeypatch.delenv("JUPYTERHUB_USER")
    return Registry(home, database="")


def test_registry_copy_to_postgresql_is_verified_and_answers_the_same(sqlite_registry, pg_url, monkeypatch, capsys):
    sq = sqlite_registry
    monkeypatch.delenv("LLMOPS_REGISTRY")  # the source is the SQLite registry in LLMOPS_HOME
    capsys.readouterr()
    assert cli(["registry", "copy", "--to", pg_url]) == 0
    out = capsys.readouterr().out
    assert "row counts equal" in out and "artifacts all re-hash" in out
    pg = Registry(sq.home, database=pg_url)
    assert pg.backend.name == "postgresql"
    counts = row_counts(sq)
    assert row_counts(pg) == counts and counts["runs"] == 2 and counts["audit_log"] > 0 and counts["artifacts"] >= 2
    assert pg.verify_artifacts() == []

    assert pg.list_runs(limit=None) == sq.list_runs(limit=None)
    a, b = [r["id"] for r in sq.list_runs(limit=None)][::-1]
    art = sq.get_artifact(a)
    assert pg.lineage(art.hash) == sq.lineage(art.hash) and pg.get_artifact(a) == art
    assert pg.audit_rows() == sq.audit_rows()
    from llmops_jupyter.views.diff import diff_runs

    assert diff_runs(pg, a, b).table.rows == diff_runs(sq, a, b).table.rows
    # the same answers through the CLI, by --registry
    assert cli(["show", b]) == 0
    on_sqlite = capsys.readouterr().out
    assert cli(["--registry", pg_url, "show", b]) == 0
    assert capsys.readouterr().out == on_sqlite
    # who did it: runs --user on the copy
    assert cli(["runs", "--user", "grace"]) == 0
    text = capsys.readouterr().out
    assert b in text and a not in text and "grace" in text
    assert [r["id"] for r in pg.list_runs(user="grace")] == [b]
    # an audit row added on PostgreSQL after the copy gets the next id, not a copied one
    pg.add_audit("note", user="grace")
    ids = [r["id"] for r in pg.audit_rows(limit=None)]
    assert ids == sorted(set(ids)) and len(ids) == counts["audit_log"] + 1


def test_registry_copy_refuses_a_destination_that_is_not_empty(sqlite_registry, pg_url, monkeypatch, capsys):
    monkeypatch.delenv("LLMOPS_REGISTRY")
    assert cli(["registry", "copy", "--to", pg_url]) == 0
    capsys.readouterr()
    assert cli(["registry", "copy", "--to", pg_url]) == 1
    err = capsys.readouterr().err
    assert "is not empty" in err and len(err.strip().splitlines()) == 1

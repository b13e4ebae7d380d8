"""Schema versions: a registry made by the release before versions were recorded is upgraded in place, with a
backup; a newer one is refused; a shared PostgreSQL registry is only migrated on request."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from llmops_jupyter.core.errors import RegistryError
from llmops_jupyter.registry import Registry, schema

V1 = Path(__file__).parent / "data" / "v1-registry.db"  # made by data/make_v1_registry.py at commit a00449d


def _counts(db: Path) -> dict[str, int]:
    con = sqlite3.connect(db)
    try:
        names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'"
                                           " AND name NOT LIKE 'sqlite_%'")]
        return {n: con.execute(f"SELECT COUNT(*) FROM {n}").fetchone()[0] for n in names}
    finally:
        con.close()


def test_version_1_registry_of_the_previous_release_is_upgraded_with_its_data_and_a_backup(tmp_path, monkeypatch,
                                                                                            capsys):
    monkeypatch.delenv("LLMOPS_REGISTRY", raising=False)
    home = tmp_path / ".llmops"
    home.mkdir()
    shutil.copy(V1, home / "registry.db")
    before = _counts(home / "registry.db")
    assert "registry_meta" not in before and before["runs"] == 2 and before["metrics"] > 0

    reg = Registry(home)
    err = capsys.readouterr().err
    assert "upgraded the registry" in err and "from schema version 1 to 2" in err and len(err.splitlines()) == 1
    backup = home / "registry.db.v1.bak"
    assert backup.exists() and _counts(backup) == before  # the backup is the untouched version 1
    con = reg._connect()
    assert schema.read_version(reg.backend, con) == schema.VERSION == 2
    assert "user" in reg.backend.columns(con, "deployments") and "user" in reg.backend.columns(con, "prompts")
    after = _counts(home / "registry.db")
    assert {k: after[k] for k in before} == before  # every row kept

    runs = {r["stage"]: r for r in reg.list_runs(limit=None)}
    assert set(runs) == {"data", "finetune"} and all(r["status"] == "finished" for r in runs.values())
    ft = runs["finetune"]
    assert ft["user"] and reg.metric_history(ft["id"], "loss")
    adapter = reg.get_artifact(ft["id"])
    assert {a.kind for a in reg.lineage_chain(adapter)} == {"dataset", "base-model", "adapter"}
    assert reg.audit_rows(run_id=ft["id"])
    assert reg.integrity_check() == []

    # the upgraded registry takes the new columns, and opens again without another upgrade or backup
    reg.record_deployment("dep-1", status="stopped")
    assert reg.deployment("dep-1")["user"]
    Registry(home)
    assert capsys.readouterr().err == "" and not (home / "registry.db.v1-").exists()


def test_a_registry_newer_than_this_code_is_refused_in_one_line(registry):
    with registry._transaction() as con:
        con.execute("UPDATE registry_meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(RegistryError, match="schema version 99, newer than .* understands") as info:
        Registry(registry.home)
    assert "\n" not in str(info.value) and "pip install -U llmops-jupyter" in str(info.value)


def test_an_older_postgresql_registry_is_refused_until_migrated(tmp_path, pg_url, capsys):
    reg = Registry(tmp_path / ".llmops")
    assert reg.backend.name == "postgresql"
    with reg._transaction() as con:  # as a registry of schema version 1 would be
        con.execute("UPDATE registry_meta SET value='1' WHERE key='schema_version'")
        con.execute('ALTER TABLE prompts DROP COLUMN "user"')
    with pytest.raises(RegistryError, match="schema version 1; this llmops-jupyter needs version 2") as info:
        Registry(tmp_path / ".llmops")
    assert "llmops registry migrate" in str(info.value) and "\n" not in str(info.value)
    note = reg.migrate()
    assert note and "from schema version 1 to 2" in note
    assert "user" in reg.backend.columns(reg._connect(), "prompts")
    Registry(tmp_path / ".llmops")  # opens now

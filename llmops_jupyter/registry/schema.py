"""The registry's schema, its version and its migrations: one definition for both backends.

Each table group's DDL lives beside its typed methods (``evals.SCHEMA``, ``traffic.SCHEMA``, ...; ``CORE`` here, for
``core``'s runs, metrics, artifacts and lineage), written once in the
SQL both databases accept; :meth:`Backend.ddl` adapts the few type names that differ. The version is stored in
``registry_meta`` (key ``schema_version``). Version 1 is the schema of the releases before it was recorded (no
``registry_meta`` table): a registry with a ``runs`` table and no version is version 1.

Opening an older registry upgrades it in place: SQLite first writes a backup beside the database
(``registry.db.v1.bak``), then migrates in one transaction; a shared PostgreSQL registry is not migrated by whichever
kernel happens to open it first: it is refused in one line naming ``llmops registry migrate``. A registry newer
than this code is refused in one line.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from llmops_jupyter.core.errors import RegistryError

#: the schema version this code writes and reads
VERSION = 2

#: runs, metrics, artifacts, lineage (typed methods: ``registry.core``)
CORE = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    stage TEXT NOT NULL,
    name TEXT,
    status TEXT NOT NULL,
    params TEXT NOT NULL DEFAULT '{}',
    summary TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    duration_s REAL,
    notebook TEXT,
    git_commit TEXT,
    env TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    parent_id TEXT,
    "user" TEXT,
    host TEXT,
    pid INTEGER,
    tags TEXT NOT NULL DEFAULT '[]',
    cache_key TEXT,
    proc_start REAL
);
CREATE INDEX IF NOT EXISTS runs_cache ON runs(cache_key);
CREATE INDEX IF NOT EXISTS runs_stage ON runs(stage, created_at);
CREATE INDEX IF NOT EXISTS runs_user ON runs("user", created_at);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs(id),
    key TEXT NOT NULL,
    value REAL,
    step INTEGER,
    ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_run ON metrics(run_id, key);
CREATE TABLE IF NOT EXISTS artifacts (
    hash TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    run_id TEXT,
    meta TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS artifacts_kind ON artifacts(kind, created_at);
CREATE TABLE IF NOT EXISTS run_artifacts (
    run_id TEXT NOT NULL,
    artifact TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('input', 'output')),
    PRIMARY KEY (run_id, artifact, role)
);
CREATE TABLE IF NOT EXISTS path_hashes (
    path TEXT PRIMARY KEY,
    sig TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS edges (
    src TEXT NOT NULL,
    dst TEXT NOT NULL,
    relation TEXT NOT NULL DEFAULT 'derived',
    run_id TEXT,
    PRIMARY KEY (src, dst, relation)
);
"""

META = """
CREATE TABLE IF NOT EXISTS registry_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

#: version → statements that bring a registry of the version before it up to it (SQLite-flavoured; the backend
#: adapts them). Tables and indexes that are new in a version need no entry: the full schema is applied after.
MIGRATIONS: dict[int, list[str]] = {
    2: [  # who did it: deployments and prompt versions record their user, as runs, audit rows and ratings do
        'ALTER TABLE deployments ADD COLUMN "user" TEXT;',
        'ALTER TABLE prompts ADD COLUMN "user" TEXT;',
    ],
}


def full_schema(backend: Any) -> list[str]:
    """Every table, index and trigger of the current version, in ``backend``'s dialect."""
    from llmops_jupyter.registry.audit import SCHEMA as AUDIT
    from llmops_jupyter.registry.evals import SCHEMA as EVALS
    from llmops_jupyter.registry.prompts import SCHEMA as PROMPTS
    from llmops_jupyter.registry.traffic import SCHEMA as TRAFFIC

    out = []
    for script in (META, CORE, EVALS, TRAFFIC, PROMPTS, AUDIT):
        out += backend.ddl(script)
    return out + backend.append_only("audit_log")


def tables(backend: Any) -> list[str]:
    """Names of the registry's tables (what ``registry copy`` moves), parents first."""
    import re

    return [m.group(1) for s in full_schema(backend) if (m := re.match(r"CREATE TABLE IF NOT EXISTS (\w+)", s))]


def read_version(backend: Any, con: Any) -> int | None:
    """The stored schema version; 1 for a registry made before versions were recorded; None for an empty one."""
    if "registry_meta" in _existing_tables(backend, con):
        row = con.execute("SELECT value FROM registry_meta WHERE key='schema_version'").fetchone()
        if row is not None:
            return int(row[0])
    return 1 if "runs" in _existing_tables(backend, con) else None


def _existing_tables(backend: Any, con: Any) -> set[str]:
    if backend.name == "sqlite":
        rows = con.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    else:
        rows = con.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
                           ).fetchall()
    return {r[0] for r in rows}


def _write_version(con: Any, version: int) -> None:
    con.execute("INSERT INTO registry_meta (key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT (key) DO UPDATE SET value=excluded.value", (str(version),))


def _run(backend: Any, con: Any, statements: list[str]) -> None:
    for stmt in statements:
        con.execute(stmt)


def _legacy_fixups(backend: Any, con: Any) -> list[str]:
    """Columns added to version 1 before versions were recorded (registries of earlier releases lack them)."""
    cols = backend.columns(con, "runs")
    return ["ALTER TABLE runs ADD COLUMN proc_start REAL;"] if cols and "proc_start" not in cols else []


def ensure(registry: Any, *, migrate: bool | None = None) -> str | None:
    """Create, check or upgrade the schema of ``registry`` (in one write transaction: writers queue meanwhile).

    ``migrate``: None = SQLite upgrades (with a backup), PostgreSQL refuses; True = upgrade either (``llmops
    registry migrate``). Returns a one-line note when it upgraded, else None."""
    backend = registry.backend
    where = backend.describe()
    note = backup = None
    if backend.name == "sqlite":  # back up an old registry first (SQLite's backup cannot run under the write lock)
        version = read_version(backend, registry._connect())
        if version is not None and version < VERSION and migrate is not False:
            backup = _backup_path(Path(backend.path), version)
            backend.backup(registry._connect(), backup)
    with registry._transaction() as con:
        version = read_version(backend, con)
        if version == VERSION:
            return None
        if version is None:  # a new registry: the current schema, stamped
            _run(backend, con, full_schema(backend))
            _write_version(con, VERSION)
            return None
        if version > VERSION:
            raise RegistryError(f"The registry {where} has schema version {version}, newer than this llmops-jupyter "
                                f"understands ({VERSION}).",
                                fix="upgrade llmops-jupyter (pip install -U llmops-jupyter) on this machine")
        allowed = migrate if migrate is not None else backend.name == "sqlite"
        if not allowed:
            raise RegistryError(f"The registry {where} has schema version {version}; this llmops-jupyter needs "
                                f"version {VERSION}.", fix="run `llmops registry migrate` once (back the database "
                                                           "up first, e.g. with pg_dump)")
        statements = backend.ddl("\n".join(_legacy_fixups(backend, con)))
        for v in range(version + 1, VERSION + 1):
            statements += backend.ddl("\n".join(MIGRATIONS.get(v, [])))
        _run(backend, con, statements + full_schema(backend))
        _write_version(con, VERSION)
        note = (f"llmops: upgraded the registry {where} from schema version {version} to {VERSION}"
                + (f" (backup: {backup})" if backup else ""))
    print(note, file=sys.stderr)
    return note


def _backup_path(db: Path, version: int) -> Path:
    path = db.with_name(f"{db.name}.v{version}.bak")
    if path.exists():
        path = db.with_name(f"{db.name}.v{version}-{time.strftime('%Y%m%d-%H%M%S')}.bak")
    return path

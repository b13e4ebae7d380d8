"""``llmops registry copy``: move a registry's records to another database (SQLite → PostgreSQL, or back), verified.

Rows are copied table by table in their insertion order (``rowid``), in one write transaction on the destination,
which must be empty. Ids of append-only tables (audit rows, requests, ratings) are kept, and PostgreSQL's identity
sequences are moved past them. Artifact files stay where they are (the destination registry uses the same home)
unless ``to_home`` names another folder, where they are copied. Then it is verified: equal row counts per table,
and every stored artifact re-hashes to its id in the destination.
"""

from __future__ import annotations

import shutil
from typing import Any

from llmops_jupyter.core.errors import RegistryError
from llmops_jupyter.registry import schema

#: tables whose integer ``id`` the database assigns (kept on copy)
_IDENTITY = ("audit_log", "requests", "eval_ratings")


def row_counts(registry: Any) -> dict[str, int]:
    """Rows per registry table (``registry_meta`` excluded)."""
    return {t: registry._query(f"SELECT COUNT(*) FROM {t}")[0][0]
            for t in schema.tables(registry.backend) if t != "registry_meta"}


def copy_registry(src: Any, dest: Any) -> dict[str, Any]:
    """Copy every row of ``src`` into the empty registry ``dest``; returns counts and the verification."""
    if any(row_counts(dest).values()):
        raise RegistryError(f"The destination registry {dest.location} is not empty.",
                            fix="copy into a new, empty database (or schema)")
    if src.home.resolve() != dest.home.resolve():
        for sub in ("artifacts",):
            if (src.home / sub).exists():
                shutil.copytree(src.home / sub, dest.home / sub, dirs_exist_ok=True)
    src_con = src._connect()
    with dest._transaction() as con:
        for table in schema.tables(dest.backend):
            if table == "registry_meta":
                continue
            src_cols = src.backend.columns(src_con, table)
            dest_cols = set(dest.backend.columns(con, table))
            cols = [c for c in src_cols if c != "rowid" and c in dest_cols]
            quoted = ", ".join(f'"{c}"' for c in cols)
            # insertion order: SQLite's rowid, the PostgreSQL schema's rowid column, or (PostgreSQL tables whose
            # own identity id is the key, which get no rowid column) that id
            order = "rowid" if src.backend.name == "sqlite" or "rowid" in src_cols else "id"
            rows = src._query(f"SELECT {quoted} FROM {table} ORDER BY {order}")
            if rows:
                con.executemany(f"INSERT INTO {table} ({quoted}) VALUES ({', '.join('?' for _ in cols)})",
                                [tuple(r) for r in rows])
            if table in _IDENTITY and dest.backend.name == "postgresql" and rows:
                con.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT MAX(id) FROM {table}))")
    src_counts, dest_counts = row_counts(src), row_counts(dest)
    bad = dest.verify_artifacts()
    return {"from": src.location, "to": dest.location, "counts": src_counts, "dest_counts": dest_counts,
            "equal": src_counts == dest_counts, "artifacts_checked": dest_counts.get("artifacts", 0),
            "artifact_problems": bad}

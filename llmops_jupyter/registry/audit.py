"""The append-only audit log.

Table DDL lives here (applied by :class:`~llmops_jupyter.registry.core.Registry` on open); the typed methods below are
the only way the rest of the package reads or writes these tables. Triggers refuse UPDATE and DELETE (and TRUNCATE
on PostgreSQL) with an "append-only" integrity error, so a mistaken (or deliberate) edit fails loudly; they are the
backend's (``Backend.append_only``), added by ``registry.schema``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    "user" TEXT NOT NULL,
    os_user TEXT,
    host TEXT,
    pid INTEGER,
    notebook TEXT,
    cell INTEGER,
    cell_id TEXT,
    front_end TEXT,
    command TEXT,
    source TEXT,
    run_id TEXT,
    stage TEXT,
    event TEXT NOT NULL,
    artifact TEXT,
    kind TEXT,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS audit_run ON audit_log(run_id);
CREATE INDEX IF NOT EXISTS audit_ts ON audit_log(ts);
"""


class AuditTables:
    """Mixin of :class:`~llmops_jupyter.registry.core.Registry`: uses its ``_query``/``_transaction``."""

    if TYPE_CHECKING:  # provided by Registry

        def _query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]: ...

        def _transaction(self) -> AbstractContextManager[sqlite3.Connection]: ...

    def add_audit(
        self,
        event: str,
        *,
        user: str,
        ts: float | None = None,
        os_user: str | None = None,
        host: str | None = None,
        pid: int | None = None,
        notebook: str | None = None,
        cell: int | None = None,
        cell_id: str | None = None,
        front_end: str | None = None,
        command: str | None = None,
        source: str | None = None,
        run_id: str | None = None,
        stage: str | None = None,
        artifact: str | None = None,
        kind: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Append one row to the audit log (``ts`` defaults to now; ``detail`` is stored as sorted JSON)."""
        with self._transaction() as con:
            con.execute(
                "INSERT INTO audit_log (ts, \"user\", os_user, host, pid, notebook, cell, cell_id, front_end, command,"
                " source, run_id, stage, event, artifact, kind, detail) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (time.time() if ts is None else ts, user, os_user, host, pid, notebook, cell, cell_id, front_end,
                 command, source, run_id, stage, event, artifact, kind,
                 json.dumps(detail or {}, sort_keys=True, default=str)),
            )

    def audit_rows(
        self,
        *,
        run_id: str | None = None,
        user: str | None = None,
        since: float = 0.0,
        event: str | None = None,
        limit: int | None = 200,
    ) -> list[dict[str, Any]]:
        """Audit rows matching the filters (exact run id), oldest first within the newest ``limit``; detail decoded."""
        sql = "SELECT * FROM audit_log WHERE ts >= ?"
        args: list[Any] = [since or 0.0]
        if run_id:
            sql += " AND run_id = ?"
            args.append(run_id)
        if user:
            sql += ' AND "user" = ?'
            args.append(user)
        if event:
            sql += " AND event = ?"
            args.append(event)
        sql += " ORDER BY id DESC"
        if limit:
            sql += " LIMIT ?"
            args.append(int(limit))
        rows = [dict(r) for r in self._query(sql, args)]
        for r in rows:
            r["detail"] = json.loads(r.get("detail") or "{}")
        return rows[::-1]

"""Serving tables: deployments, the request log, monitor flags and feedback labels.

Table DDL lives here (applied by :class:`~llmops_jupyter.registry.core.Registry` on open); the typed methods below are
the only way the rest of the package reads or writes these tables.

The request log stores what it is given: callers (``stages.serve.reqlog``) scrub PII *before* calling
:meth:`TrafficTables.log_requests`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from llmops_jupyter.core.env import who

if TYPE_CHECKING:
    import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT,
    ts REAL NOT NULL,
    deployment TEXT,
    model TEXT,
    model_name TEXT,
    endpoint TEXT,
    prompt TEXT,
    messages TEXT,
    response TEXT,
    latency_s REAL,
    tokens_in INTEGER,
    tokens_out INTEGER,
    status INTEGER NOT NULL,
    finish_reason TEXT,
    stream INTEGER NOT NULL DEFAULT 0,
    key_id TEXT,
    error TEXT,
    pii TEXT NOT NULL DEFAULT '{}',
    checks TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS requests_dep_ts ON requests(deployment, ts);
CREATE TABLE IF NOT EXISTS request_labels (
    request INTEGER PRIMARY KEY,
    label TEXT NOT NULL,
    corrected TEXT,
    ts REAL NOT NULL,
    dataset TEXT
);
CREATE TABLE IF NOT EXISTS deployments (
    id TEXT PRIMARY KEY,
    run_id TEXT,
    artifact TEXT,
    model TEXT,
    model_name TEXT,
    url TEXT,
    mode TEXT,
    pid INTEGER,
    host TEXT,
    status TEXT NOT NULL,
    started_at REAL,
    stopped_at REAL,
    key_ids TEXT NOT NULL DEFAULT '[]',
    limits TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    "user" TEXT
);
"""

#: columns of ``requests`` a logged record fills (``id`` is assigned by SQLite)
REQUEST_COLUMNS = ("request_id", "ts", "deployment", "model", "model_name", "endpoint", "prompt", "messages",
                   "response", "latency_s", "tokens_in", "tokens_out", "status", "finish_reason", "stream", "key_id",
                   "error", "pii", "checks")

#: columns of ``deployments`` :meth:`TrafficTables.record_deployment` may set
DEPLOYMENT_COLUMNS = ("run_id", "artifact", "model", "model_name", "url", "mode", "pid", "host", "status",
                      "started_at", "stopped_at", "key_ids", "limits", "error")


def _deployment_dict(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["key_ids"] = json.loads(d["key_ids"] or "[]")
    d["limits"] = json.loads(d["limits"] or "{}")
    return d


def _request_dict(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["checks"] = json.loads(d["checks"] or "{}")
    return d


class TrafficTables:
    """Mixin of :class:`~llmops_jupyter.registry.core.Registry`: uses its ``_query``/``_transaction``."""

    if TYPE_CHECKING:
        def _query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]: ...
        def _transaction(self) -> AbstractContextManager[sqlite3.Connection]: ...

    # -- deployments ----------------------------------------------------------------------------------------------
    def record_deployment(self, dep_id: str, **fields: Any) -> None:
        """Create a deployment row (status ``starting`` unless given) or update the given fields of an existing one."""
        bad = set(fields) - set(DEPLOYMENT_COLUMNS)
        if bad:
            raise ValueError(f"cannot set deployment fields {sorted(bad)}")
        for key in ("key_ids", "limits"):
            if key in fields and not isinstance(fields[key], str):
                fields[key] = json.dumps(fields[key], sort_keys=True)
        with self._transaction() as con:
            exists = con.execute("SELECT 1 FROM deployments WHERE id=?", (dep_id,)).fetchone()
            if exists:
                if fields:
                    con.execute(f"UPDATE deployments SET {', '.join(f'{k}=?' for k in fields)} WHERE id=?",
                                (*fields.values(), dep_id))
            else:
                fields = {"status": "starting", **fields, "id": dep_id, '"user"': who()}
                con.execute(f"INSERT INTO deployments ({', '.join(fields)}) VALUES ({', '.join('?' for _ in fields)})",
                            tuple(fields.values()))

    def deployments(self) -> list[dict[str, Any]]:
        """Every deployment row as recorded (``key_ids``/``limits`` decoded), newest first."""
        return [_deployment_dict(r) for r in self._query("SELECT * FROM deployments ORDER BY started_at DESC")]

    def deployment(self, dep_id: str) -> dict[str, Any] | None:
        """One deployment row by exact id (``key_ids``/``limits`` decoded), or ``None``."""
        rows = self._query("SELECT * FROM deployments WHERE id=?", (dep_id,))
        return _deployment_dict(rows[0]) if rows else None

    # -- request log ----------------------------------------------------------------------------------------------
    def log_requests(self, rows: Iterable[dict[str, Any]]) -> int:
        """Append already-scrubbed request records in one transaction; returns how many were written."""
        values = [tuple(r.get(c) for c in REQUEST_COLUMNS) for r in rows]
        if not values:
            return 0
        sql = f"INSERT INTO requests ({', '.join(REQUEST_COLUMNS)}) VALUES ({', '.join('?' for _ in REQUEST_COLUMNS)})"
        with self._transaction() as con:
            con.executemany(sql, values)
        return len(values)

    def requests(self, deployment: str | None = None, *, since: float | None = None, until: float | None = None,
                 last: int | None = None) -> list[dict[str, Any]]:
        """Logged requests (``checks`` decoded) oldest first; ``last`` keeps the newest N of the window."""
        sql = "SELECT * FROM requests WHERE 1=1"
        args: list[Any] = []
        if deployment:
            sql += " AND deployment=?"
            args.append(deployment)
        if since is not None:
            sql += " AND ts>=?"
            args.append(since)
        if until is not None:
            sql += " AND ts<?"
            args.append(until)
        sql += " ORDER BY ts DESC, id DESC"
        if last:
            sql += " LIMIT ?"
            args.append(int(last))
        return [_request_dict(r) for r in self._query(sql, args)][::-1]

    def request_counts(self) -> dict[str, int]:
        """Number of logged requests per deployment id."""
        return {r["deployment"]: r["n"] for r in self._query(
            "SELECT deployment, COUNT(*) AS n FROM requests GROUP BY deployment")}

    def set_request_checks(self, checks: dict[int, dict[str, Any]]) -> None:
        """Replace the ``checks`` of several requests (request id → full checks dict) in one transaction."""
        if not checks:
            return
        with self._transaction() as con:
            con.executemany("UPDATE requests SET checks=? WHERE id=?",
                            [(json.dumps(c, sort_keys=True), rid) for rid, c in checks.items()])

    # -- feedback labels ------------------------------------------------------------------------------------------
    def label_request(self, request: int, label: str | None, corrected: str | None = None) -> None:
        """Set a request's feedback label (re-opened for the next export); ``label=None`` removes it."""
        with self._transaction() as con:
            if label is None:
                con.execute("DELETE FROM request_labels WHERE request=?", (request,))
            else:
                con.execute("INSERT INTO request_labels (request, label, corrected, ts, dataset) VALUES (?,?,?,?,NULL)"
                            " ON CONFLICT (request) DO UPDATE SET label=excluded.label, corrected=excluded.corrected,"
                            " ts=excluded.ts, dataset=NULL", (request, label, corrected or None, time.time()))

    def request_labels(self, requests: Iterable[int] | None = None, *,
                       dataset: str | None = None) -> dict[int, dict[str, Any]]:
        """Label rows by request id: of the given requests, and/or of those exported to ``dataset``."""
        sql = "SELECT * FROM request_labels WHERE 1=1"
        args: list[Any] = []
        if requests is not None:
            ids = list(requests)
            if not ids:
                return {}
            sql += f" AND request IN ({','.join('?' for _ in ids)})"
            args += ids
        if dataset is not None:
            sql += " AND dataset=?"
            args.append(dataset)
        return {r["request"]: dict(r) for r in self._query(sql + " ORDER BY request", args)}

    def labelled_requests(self, deployment: str, *, unexported: bool = True) -> list[dict[str, Any]]:
        """Requests of a deployment joined with their label/corrected text (default: not yet in a dataset), by id."""
        sql = ("SELECT q.*, l.label, l.corrected FROM request_labels l JOIN requests q ON q.id = l.request "
               "WHERE q.deployment=?")
        if unexported:
            sql += " AND l.dataset IS NULL"
        return [dict(r) for r in self._query(sql + " ORDER BY q.id", (deployment,))]

    def corrected_requests(self, deployment: str) -> list[dict[str, Any]]:
        """Requests labelled 'bad' that have a corrected response (preference pairs), by id; ``ts`` = label time."""
        return [dict(r) for r in self._query(
            "SELECT q.id, q.prompt, q.messages, q.response, q.model, l.corrected, l.ts FROM request_labels l "
            "JOIN requests q ON q.id = l.request WHERE q.deployment=? AND l.label='bad' AND l.corrected IS NOT NULL "
            "ORDER BY q.id", (deployment,))]

    def mark_labels_exported(self, requests: Iterable[int], dataset: str) -> None:
        """Record that these requests' labels went into dataset artifact ``dataset``."""
        with self._transaction() as con:
            con.executemany("UPDATE request_labels SET dataset=? WHERE request=?", [(dataset, r) for r in requests])

"""Adaptation tables: versioned prompt templates and per-example retrieval context.

Table DDL lives here (applied by :class:`~llmops_jupyter.registry.core.Registry` on open); the typed methods below are
the only way the rest of the package reads or writes these tables.
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
CREATE TABLE IF NOT EXISTS prompts (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    run_id TEXT,
    "user" TEXT,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS eval_retrievals (
    run_id TEXT NOT NULL,
    example_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    index_hash TEXT,
    chunk_ids TEXT NOT NULL DEFAULT '[]',
    docs TEXT NOT NULL DEFAULT '[]',
    scores TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (run_id, example_id)
);
"""


class PromptTables:
    """Mixin of :class:`~llmops_jupyter.registry.core.Registry`: uses its ``_query``/``_transaction``."""

    if TYPE_CHECKING:
        def _query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]: ...
        def _transaction(self) -> AbstractContextManager[sqlite3.Connection]: ...

    # -- prompt templates -----------------------------------------------------------------------------------------
    def add_prompt_version(self, name: str, artifact_hash: str, run_id: str | None = None) -> int:
        """Give ``artifact_hash`` the next version of ``name`` unless it is already the latest; returns the version."""
        with self._transaction() as con:
            row = con.execute("SELECT version FROM prompts WHERE name=? AND hash=? ORDER BY version DESC LIMIT 1",
                              (name, artifact_hash)).fetchone()
            latest = con.execute("SELECT version, hash FROM prompts WHERE name=? ORDER BY version DESC LIMIT 1",
                                 (name,)).fetchone()
            if row and latest and latest["hash"] == artifact_hash:
                return row["version"]
            version = (latest["version"] if latest else 0) + 1
            con.execute('INSERT INTO prompts (name, version, hash, created_at, run_id, "user") VALUES (?,?,?,?,?,?)',
                        (name, version, artifact_hash, time.time(), run_id, who()))
            return version

    def prompt_version(self, name: str, version: int | None = None) -> dict[str, Any] | None:
        """One version row of a prompt (``None`` = the latest), or ``None`` when there is none."""
        if version is None:
            rows = self._query("SELECT * FROM prompts WHERE name=? ORDER BY version DESC LIMIT 1", (name,))
        else:
            rows = self._query("SELECT * FROM prompts WHERE name=? AND version=?", (name, version))
        return dict(rows[0]) if rows else None

    def prompt_versions(self, name: str | None = None) -> list[dict[str, Any]]:
        """Version rows of one prompt (or of every prompt, by name), oldest version first."""
        sql = "SELECT * FROM prompts" + (" WHERE name=?" if name is not None else "") + " ORDER BY name, version"
        return [dict(r) for r in self._query(sql, (name,) if name is not None else ())]

    def prompt_names(self) -> list[str]:
        """Names of all stored prompts, sorted."""
        return [r["name"] for r in self._query("SELECT DISTINCT name FROM prompts ORDER BY name")]

    # -- retrieval context of eval runs ---------------------------------------------------------------------------
    def add_eval_retrievals(self, run_id: str, index_hash: str | None, rows: Iterable[dict[str, Any]]) -> None:
        """Store the chunks retrieved per example (``example_id``, ``chunk_ids``, ``docs``, ``scores``) in order."""
        values = [(run_id, r["example_id"], i, index_hash, json.dumps(list(r.get("chunk_ids") or [])),
                   json.dumps(list(r.get("docs") or [])), json.dumps(list(r.get("scores") or [])))
                  for i, r in enumerate(rows)]
        with self._transaction() as con:
            con.executemany("INSERT INTO eval_retrievals "
                            "(run_id, example_id, idx, index_hash, chunk_ids, docs, scores) VALUES (?,?,?,?,?,?,?)"
                            " ON CONFLICT (run_id, example_id) DO UPDATE SET idx=excluded.idx,"
                            " index_hash=excluded.index_hash, chunk_ids=excluded.chunk_ids, docs=excluded.docs,"
                            " scores=excluded.scores", values)

    def eval_retrievals(self, run_id: str) -> list[dict[str, Any]]:
        """The chunks retrieved per example of an eval run (exact id), in eval order, JSON columns decoded."""
        out = []
        for r in self._query("SELECT * FROM eval_retrievals WHERE run_id=? ORDER BY idx", (run_id,)):
            d = dict(r)
            for key in ("chunk_ids", "docs", "scores"):
                d[key] = json.loads(d[key])
            out.append(d)
        return out

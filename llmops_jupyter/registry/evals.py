"""Eval stage tables: per-example results, per-version summaries, human ratings (written by ``stages.eval``, read by rate/report/pairs/dpo).

Table DDL lives here (applied by :class:`~llmops_jupyter.registry.core.Registry` on open); the typed methods below are
the only way the rest of the package reads or writes these tables.

* ``eval_examples``: one row per (eval run, model version, example) with prompt, reference, output, the
  per-example metrics (JSON, NaN stored as null), generation stats and the judge's prompt and raw verdict; so any
  two versions, in one run or across runs, can be diffed example by example.
* ``eval_summary``: one row per (eval run, model version, metric).
* ``eval_ratings``: human ratings from the side-by-side widget: who, when, which runs / versions / example,
  thumbs (+1/-1) or 1-5 stars, the preferred version and a note.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS eval_examples (
    run_id TEXT NOT NULL,
    model_ref TEXT NOT NULL,
    model_hash TEXT,
    example_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    prompt TEXT,
    reference TEXT,
    output TEXT,
    metrics TEXT NOT NULL DEFAULT '{}',
    generation TEXT NOT NULL DEFAULT '{}',
    judge_prompt TEXT,
    judge_raw TEXT,
    PRIMARY KEY (run_id, model_ref, example_id)
);
CREATE TABLE IF NOT EXISTS eval_summary (
    run_id TEXT NOT NULL,
    model_ref TEXT NOT NULL,
    model_hash TEXT,
    position INTEGER NOT NULL DEFAULT 0,
    metric TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (run_id, model_ref, metric)
);
CREATE TABLE IF NOT EXISTS eval_ratings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session TEXT NOT NULL,
    created_at REAL NOT NULL,
    "user" TEXT,
    example_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    model_ref TEXT NOT NULL,
    thumbs INTEGER,
    stars INTEGER,
    preferred_run_id TEXT,
    preferred_model_ref TEXT,
    note TEXT,
    compared TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS eval_ratings_example ON eval_ratings(example_id, run_id);
"""


def _nan_to_null(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()}


def _null_to_nan(values: str | None) -> dict[str, Any]:
    return {k: (math.nan if v is None else v) for k, v in json.loads(values or "{}").items()}


def _example(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["id"] = d["example_id"]
    d["metrics"] = _null_to_nan(d["metrics"])
    d["generation"] = json.loads(d["generation"] or "{}")
    return d


class EvalTables:
    """Mixin of :class:`~llmops_jupyter.registry.core.Registry`: uses its ``_query``/``_transaction``.

    Methods take exact run ids (resolve references with ``resolve_run`` first) and return plain dicts, with NaN
    metrics restored from the nulls SQLite stores.
    """

    if TYPE_CHECKING:
        def _query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]: ...
        def _transaction(self) -> AbstractContextManager[sqlite3.Connection]: ...

    # -- per-example results --------------------------------------------------------------------------------------
    def add_eval_examples(self, run_id: str, model_ref: str, model_hash: str | None,
                          rows: Iterable[Mapping[str, Any]]) -> None:
        """Store one version's per-example results (each needs ``id``) in eval order, atomically; reruns replace."""
        data = [(run_id, model_ref, model_hash, r["id"], i, r.get("prompt"), r.get("reference"), r.get("output"),
                 json.dumps(_nan_to_null(r.get("metrics", {})), sort_keys=True), json.dumps(r.get("generation", {})),
                 r.get("judge_prompt"), r.get("judge_raw")) for i, r in enumerate(rows)]
        with self._transaction() as con:
            con.executemany(
                "INSERT INTO eval_examples (run_id, model_ref, model_hash, example_id, idx, prompt, reference, output,"
                " metrics, generation, judge_prompt, judge_raw) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (run_id, model_ref, example_id) DO UPDATE SET model_hash=excluded.model_hash,"
                " idx=excluded.idx, prompt=excluded.prompt, reference=excluded.reference, output=excluded.output,"
                " metrics=excluded.metrics, generation=excluded.generation, judge_prompt=excluded.judge_prompt,"
                " judge_raw=excluded.judge_raw", data)

    def eval_versions(self, run_id: str) -> list[dict[str, Any]]:
        """Model versions with stored results in an eval run, in the order they were evaluated (empty if none)."""
        rows = self._query("SELECT model_ref, model_hash, MIN(rowid) AS first_row FROM eval_examples WHERE run_id=? "
                           "GROUP BY model_ref, model_hash ORDER BY first_row", (run_id,))
        return [{"run_id": run_id, "model_ref": r["model_ref"], "model_hash": r["model_hash"]} for r in rows]

    def eval_examples(self, run_id: str, model_ref: str | None = None) -> list[dict[str, Any]]:
        """Per-example rows of one version (the run's first if ``model_ref`` is None) in eval order; empty if none."""
        if model_ref is None:
            first = self.eval_versions(run_id)
            if not first:
                return []
            model_ref = first[0]["model_ref"]
        rows = self._query("SELECT * FROM eval_examples WHERE run_id=? AND model_ref=? ORDER BY idx",
                           (run_id, model_ref))
        return [_example(r) for r in rows]

    def eval_example(self, run_id: str, model_ref: str, example_id: str) -> dict[str, Any] | None:
        """One version's result on one example (what a rater saw), or None if that version never ran it."""
        rows = self._query("SELECT * FROM eval_examples WHERE run_id=? AND model_ref=? AND example_id=?",
                           (run_id, model_ref, example_id))
        return _example(rows[0]) if rows else None

    # -- summaries ------------------------------------------------------------------------------------------------
    def add_eval_summary(self, run_id: str, model_ref: str, model_hash: str | None, position: int,
                         summary: Mapping[str, float | None]) -> None:
        """Store one version's summary metrics; ``position`` keeps the versions in the order they were given."""
        with self._transaction() as con:
            con.executemany("INSERT INTO eval_summary (run_id, model_ref, model_hash, position, metric, value)"
                            " VALUES (?,?,?,?,?,?) ON CONFLICT (run_id, model_ref, metric) DO UPDATE SET"
                            " model_hash=excluded.model_hash, position=excluded.position, value=excluded.value",
                            [(run_id, model_ref, model_hash, position, k,
                              None if v is None or math.isnan(v) else v) for k, v in summary.items()])

    def eval_summaries(self, run_id: str) -> dict[str, dict[str, float]]:
        """``{model_ref: {metric: value}}`` of an eval run, versions in order (missing values are NaN)."""
        out: dict[str, dict[str, float]] = {}
        for r in self._query("SELECT * FROM eval_summary WHERE run_id=? ORDER BY position, metric", (run_id,)):
            out.setdefault(r["model_ref"], {})[r["metric"]] = math.nan if r["value"] is None else r["value"]
        return out

    # -- human ratings --------------------------------------------------------------------------------------------
    def add_eval_rating(self, *, session: str, user: str, example_id: str, run_id: str, model_ref: str,
                        thumbs: int | None = None, stars: int | None = None,
                        preferred: tuple[str, str] | None = None, note: str | None = None,
                        compared: Iterable[tuple[str, str]] = ()) -> int:
        """Record one human rating of one version of one example (the DPO pairs' source); returns its id."""
        with self._transaction() as con:
            cur = con.execute(
                "INSERT INTO eval_ratings (session, created_at, \"user\", example_id, run_id, model_ref, thumbs, stars,"
                " preferred_run_id, preferred_model_ref, note, compared) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
                (session, time.time(), user, example_id, run_id, model_ref, thumbs, stars,
                 preferred[0] if preferred else None, preferred[1] if preferred else None, note or None,
                 json.dumps([list(c) for c in compared])))
            return int(cur.fetchone()[0])

    def eval_ratings(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Ratings oldest first (only those rating or preferring a version of ``run_id`` if given)."""
        if run_id is None:
            rows = self._query("SELECT * FROM eval_ratings ORDER BY id")
        else:
            rows = self._query("SELECT * FROM eval_ratings WHERE run_id=? OR preferred_run_id=? ORDER BY id",
                               (run_id, run_id))
        out = []
        for r in rows:
            d = dict(r)
            d["compared"] = [tuple(c) for c in json.loads(d["compared"] or "[]")]
            out.append(d)
        return out


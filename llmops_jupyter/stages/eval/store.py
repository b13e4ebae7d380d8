"""Registry tables of the eval stage: per-example results, per-version summaries, human ratings.

* ``eval_examples``: one row per (eval run, model version, example) with prompt, reference, output, the
  per-example metrics (JSON), generation stats and the judge's prompt and raw verdict; so any two versions,
  in one run or across runs, can be diffed example by example.
* ``eval_summary``: one row per (eval run, model version, metric).
* ``eval_ratings``: human ratings from the side-by-side widget: who, when, which runs / versions / example,
  thumbs (+1/-1) or 1-5 stars, the preferred version and a note. :func:`preference_pairs` turns ratings with a
  preferred version into (prompt, chosen, rejected) pairs for DPO.

Standard library only (imported by the stage module when the magics list commands).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from typing import Any

from llmops_jupyter.core.errors import NotFoundError
from llmops_jupyter.registry import Registry
from llmops_jupyter.registry.core import register_schema

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
    user TEXT,
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

register_schema(SCHEMA)
_READY: set[str] = set()


def ensure(registry: Registry) -> Registry:
    """Create the tables on a registry opened before this module was imported (idempotent, once per db)."""
    key = str(registry.db_path)
    if key not in _READY:
        with registry.transaction() as con:
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    con.execute(stmt)
        _READY.add(key)
    return registry


def _clean(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()}


def _load(values: str | None) -> dict[str, Any]:
    return {k: (math.nan if v is None else v) for k, v in json.loads(values or "{}").items()}


def save_examples(registry: Registry, run_id: str, model_ref: str, model_hash: str | None,
                  rows: Iterable[dict[str, Any]]) -> None:
    """Store one version's per-example results (one transaction)."""
    ensure(registry)
    data = [(run_id, model_ref, model_hash, r["id"], i, r.get("prompt"), r.get("reference"), r.get("output"),
             json.dumps(_clean(r.get("metrics", {})), sort_keys=True), json.dumps(r.get("generation", {})),
             r.get("judge_prompt"), r.get("judge_raw")) for i, r in enumerate(rows)]
    with registry.transaction() as con:
        con.executemany("INSERT OR REPLACE INTO eval_examples VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", data)


def save_summary(registry: Registry, run_id: str, model_ref: str, model_hash: str | None, position: int,
                 summary: dict[str, float]) -> None:
    ensure(registry)
    with registry.transaction() as con:
        con.executemany("INSERT OR REPLACE INTO eval_summary VALUES (?,?,?,?,?,?)",
                        [(run_id, model_ref, model_hash, position, k, None if v is None or math.isnan(v) else v)
                         for k, v in summary.items()])


def versions(registry: Registry, run: str) -> list[dict[str, Any]]:
    """Model versions evaluated in an eval run, in the order given: ``[{run_id, model_ref, model_hash}]``."""
    ensure(registry)
    run_id = registry.resolve_run(run)
    rows = registry.query("SELECT model_ref, model_hash, MIN(rowid) AS first FROM eval_examples WHERE run_id=? "
                          "GROUP BY model_ref, model_hash ORDER BY first", (run_id,))
    if not rows:
        raise NotFoundError(f"Run '{run_id}' has no stored eval results.",
                            fix="pass an eval run (`%llmops runs --stage eval`)")
    return [{"run_id": run_id, "model_ref": r["model_ref"], "model_hash": r["model_hash"]} for r in rows]


def load_examples(registry: Registry, run: str, model_ref: str | None = None) -> list[dict[str, Any]]:
    """Per-example rows of one version (the run's first version if ``model_ref`` is None), in eval order."""
    ensure(registry)
    run_id = registry.resolve_run(run)
    if model_ref is None:
        model_ref = versions(registry, run_id)[0]["model_ref"]
    rows = registry.query("SELECT * FROM eval_examples WHERE run_id=? AND model_ref=? ORDER BY idx",
                          (run_id, model_ref))
    if not rows:
        raise NotFoundError(f"Run '{run_id}' has no eval results for model '{model_ref}'.",
                            fix="list its versions with `%llmops show " + run_id + "`")
    out = []
    for r in rows:
        d = dict(r)
        d["id"] = d["example_id"]
        d["metrics"] = _load(d["metrics"])
        d["generation"] = json.loads(d["generation"] or "{}")
        out.append(d)
    return out


def summaries(registry: Registry, run: str) -> dict[str, dict[str, float]]:
    """``{model_ref: {metric: value}}`` for an eval run, versions in order."""
    ensure(registry)
    run_id = registry.resolve_run(run)
    out: dict[str, dict[str, float]] = {}
    for r in registry.query("SELECT * FROM eval_summary WHERE run_id=? ORDER BY position, metric", (run_id,)):
        out.setdefault(r["model_ref"], {})[r["metric"]] = math.nan if r["value"] is None else r["value"]
    return out


def diff(registry: Registry, a: str, b: str, *, a_model: str | None = None, b_model: str | None = None
         ) -> list[dict[str, Any]]:
    """Per-example comparison of two versions (two eval runs, or two models of one run): outputs and metric
    deltas (b - a) on the examples both have, in a's order."""
    rows_a = load_examples(registry, a, a_model)
    rows_b = {r["id"]: r for r in load_examples(registry, b, b_model)}
    out = []
    for ra in rows_a:
        rb = rows_b.get(ra["id"])
        if rb is None:
            continue
        deltas = {k: rb["metrics"][k] - v for k, v in ra["metrics"].items()
                  if isinstance(v, (int, float)) and isinstance(rb["metrics"].get(k), (int, float))}
        out.append({"id": ra["id"], "prompt": ra["prompt"], "reference": ra["reference"], "output_a": ra["output"],
                    "output_b": rb["output"], "delta": deltas})
    return out


def save_rating(registry: Registry, *, session: str, example_id: str, run_id: str, model_ref: str,
                thumbs: int | None = None, stars: int | None = None, preferred: tuple[str, str] | None = None,
                note: str | None = None, compared: list[tuple[str, str]] | None = None,
                user: str | None = None) -> int:
    """Store one rating row (a version of one example) and return its id."""
    from llmops_jupyter.registry.core import _user

    ensure(registry)
    with registry.transaction() as con:
        cur = con.execute(
            "INSERT INTO eval_ratings (session, created_at, user, example_id, run_id, model_ref, thumbs, stars,"
            " preferred_run_id, preferred_model_ref, note, compared) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (session, time.time(), user or _user(), example_id, run_id, model_ref, thumbs, stars,
             preferred[0] if preferred else None, preferred[1] if preferred else None, note or None,
             json.dumps([list(c) for c in (compared or [])])))
        return int(cur.lastrowid)


def ratings(registry: Registry, run: str | None = None) -> list[dict[str, Any]]:
    """Ratings, oldest first; only those of one eval run if ``run`` is given."""
    ensure(registry)
    if run is None:
        rows = registry.query("SELECT * FROM eval_ratings ORDER BY id")
    else:
        rid = registry.resolve_run(run)
        rows = registry.query("SELECT * FROM eval_ratings WHERE run_id=? OR preferred_run_id=? ORDER BY id",
                              (rid, rid))
    out = []
    for r in rows:
        d = dict(r)
        d["compared"] = [tuple(c) for c in json.loads(d["compared"] or "[]")]
        out.append(d)
    return out


def preference_pairs(registry: Registry, run: str | None = None) -> list[dict[str, Any]]:
    """(prompt, chosen, rejected) pairs from ratings with a preferred version (the latest per example wins).

    Every other version shown next to the preferred one becomes a rejected answer. Outputs and prompts come from
    ``eval_examples``, so the pair is exactly what the rater saw.
    """
    latest: dict[tuple[str, tuple], dict[str, Any]] = {}
    for r in ratings(registry, run):
        if r["preferred_model_ref"]:
            latest[(r["example_id"], tuple(sorted(r["compared"])))] = r
    pairs = []
    for (example_id, compared), r in latest.items():
        chosen_key = (r["preferred_run_id"], r["preferred_model_ref"])
        rows = {}
        for run_id, model_ref in compared:
            found = registry.query("SELECT prompt, output FROM eval_examples WHERE run_id=? AND model_ref=? AND "
                                   "example_id=?", (run_id, model_ref, example_id))
            if found:
                rows[(run_id, model_ref)] = dict(found[0])
        if chosen_key not in rows:
            continue
        for key, row in rows.items():
            if key != chosen_key and row["output"] != rows[chosen_key]["output"]:
                pairs.append({"example_id": example_id, "prompt": rows[chosen_key]["prompt"],
                              "chosen": rows[chosen_key]["output"], "rejected": row["output"],
                              "chosen_version": list(chosen_key), "rejected_version": list(key),
                              "rating_id": r["id"], "user": r["user"], "created_at": r["created_at"]})
    return pairs

"""The eval stage's stored results, by run reference: per-example results, per-version summaries, human ratings.

Thin wrappers over the registry's typed eval methods (:class:`~llmops_jupyter.registry.evals.EvalTables`, which
owns the ``eval_examples`` / ``eval_summary`` / ``eval_ratings`` tables): these resolve run references (``eval@latest``,
prefixes) and turn "nothing stored" into a :class:`NotFoundError` with a fix. :func:`preference_pairs` turns ratings
with a preferred version into (prompt, chosen, rejected) pairs for DPO.

Standard library only (imported by the stage module when the magics list commands).
"""

from __future__ import annotations

from typing import Any

from llmops_jupyter.core.errors import NotFoundError
from llmops_jupyter.registry import Registry


def versions(registry: Registry, run: str) -> list[dict[str, Any]]:
    """Model versions evaluated in an eval run, in the order given: ``[{run_id, model_ref, model_hash}]``."""
    run_id = registry.resolve_run(run)
    found = registry.eval_versions(run_id)
    if not found:
        raise NotFoundError(f"Run '{run_id}' has no stored eval results.",
                            fix="pass an eval run (`%llmops runs --stage eval`)")
    return found


def load_examples(registry: Registry, run: str, model_ref: str | None = None) -> list[dict[str, Any]]:
    """Per-example rows of one version (the run's first version if ``model_ref`` is None), in eval order."""
    run_id = registry.resolve_run(run)
    if model_ref is None:
        model_ref = versions(registry, run_id)[0]["model_ref"]
    rows = registry.eval_examples(run_id, model_ref)
    if not rows:
        raise NotFoundError(f"Run '{run_id}' has no eval results for model '{model_ref}'.",
                            fix="list its versions with `%llmops show " + run_id + "`")
    return rows


def summaries(registry: Registry, run: str) -> dict[str, dict[str, float]]:
    """``{model_ref: {metric: value}}`` for an eval run, versions in order."""
    return registry.eval_summaries(registry.resolve_run(run))


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

    return registry.add_eval_rating(session=session, user=user or _user(), example_id=example_id, run_id=run_id,
                                    model_ref=model_ref, thumbs=thumbs, stars=stars, preferred=preferred,
                                    note=note, compared=compared or ())


def ratings(registry: Registry, run: str | None = None) -> list[dict[str, Any]]:
    """Ratings, oldest first; only those of one eval run if ``run`` is given."""
    return registry.eval_ratings(None if run is None else registry.resolve_run(run))


def preference_pairs(registry: Registry, run: str | None = None) -> list[dict[str, Any]]:
    """(prompt, chosen, rejected) pairs from ratings with a preferred version (the latest per example wins).

    Every other version shown next to the preferred one becomes a rejected answer. Outputs and prompts come from
    the stored eval results, so the pair is exactly what the rater saw.
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
            found = registry.eval_example(run_id, model_ref, example_id)
            if found is not None:
                rows[(run_id, model_ref)] = found
        if chosen_key not in rows:
            continue
        for key, row in rows.items():
            if key != chosen_key and row["output"] != rows[chosen_key]["output"]:
                pairs.append({"example_id": example_id, "prompt": rows[chosen_key]["prompt"],
                              "chosen": rows[chosen_key]["output"], "rejected": row["output"],
                              "chosen_version": list(chosen_key), "rejected_version": list(key),
                              "rating_id": r["id"], "user": r["user"], "created_at": r["created_at"]})
    return pairs

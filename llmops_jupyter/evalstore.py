"""Documented import path (``llmops_jupyter.evalstore.load_examples``); see :mod:`llmops_jupyter.stages.eval.store`."""

from llmops_jupyter.stages.eval.store import (
    diff,
    load_examples,
    preference_pairs,
    ratings,
    save_rating,
    summaries,
    versions,
)

__all__ = ["diff", "load_examples", "preference_pairs", "ratings", "save_rating", "summaries", "versions"]

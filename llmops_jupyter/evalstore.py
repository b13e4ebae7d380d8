"""Documented import path (``llmops_jupyter.evalstore.load_examples``); see :mod:`llmops_jupyter.stages.eval.store`."""

from llmops_jupyter.stages.eval.store import load_examples, summaries, versions

__all__ = ["load_examples", "summaries", "versions"]

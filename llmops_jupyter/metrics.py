"""Documented import path (``from llmops_jupyter.metrics import register_metric``); see :mod:`llmops_jupyter.stages.eval.metrics`."""

from llmops_jupyter.stages.eval.metrics import register_metric

__all__ = ["register_metric"]

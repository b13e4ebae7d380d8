"""Documented import path (``from llmops_jupyter.dataformat import load_dataset``); see :mod:`llmops_jupyter.stages.data.format`."""

from llmops_jupyter.stages.data.format import Dataset, load_dataset

__all__ = ["Dataset", "load_dataset"]

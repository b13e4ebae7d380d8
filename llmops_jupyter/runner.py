"""Documented import path (``from llmops_jupyter.runner import Runner``); the Runner lives in :mod:`llmops_jupyter.core.runner`."""

from llmops_jupyter.core.runner import Event, EventType, RunContext, Runner, RunResult

__all__ = ["Event", "EventType", "RunContext", "RunResult", "Runner"]

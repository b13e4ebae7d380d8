"""Imported by the front door: registers the governance Runner global listeners (audit log, resource sampling,
automatic model cards for merged/quantized/deployment artifacts)."""

from __future__ import annotations

from llmops_jupyter.governance import audit, cards, gpu

audit.install()
gpu.install()
cards.install()

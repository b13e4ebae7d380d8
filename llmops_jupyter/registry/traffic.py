"""Serving tables: deployments, the request log, monitor flags and feedback labels.

Table DDL lives here (applied by :class:`~llmops_jupyter.registry.core.Registry` on open); the typed methods below are
the only way the rest of the package reads or writes these tables.
"""

from __future__ import annotations

SCHEMA = ""


class TrafficTables:
    """Mixin of :class:`~llmops_jupyter.registry.core.Registry`: uses its ``query``/``transaction``."""

"""Governance and ecosystem: model cards, the audit log, ``doctor``, MLflow/bundle export and resource sampling.

Everything here reads the registry generically (runs, params, metrics, artifacts, edges), because the stages that
write those records are developed independently: a missing record makes a card say "not recorded", never crash.

Importing :mod:`.hooks` (the front door does) registers the audit, resource-sampling and automatic-card
:class:`~llmops_jupyter.core.runner.Runner` global listeners, so every run started through a front end is audited,
resource-sampled and carded without any change to the stages. This package and the modules ``hooks`` imports use
only the standard library and light ``llmops_jupyter`` modules at top level.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmops_jupyter.registry import Registry

_RUN_HOMES: dict[str, Registry] = {}


def registry_for_run(run_id: str) -> Registry | None:
    """Find the open registry that holds ``run_id``.

    Runner events carry the run id but not the registry, so listeners look it up among the registries this process
    has opened, then the default home (``$LLMOPS_HOME``). Never creates a registry folder as a side effect.
    """
    from llmops_jupyter.registry import Registry, default_home

    cached = _RUN_HOMES.get(run_id)
    if cached is not None:
        return cached
    candidates: list[Registry] = list(Registry._instances.values())
    home = default_home()
    if (home / "registry.db").exists() and home.resolve() not in Registry._instances:
        candidates.append(Registry.open(home))
    for reg in candidates:
        try:
            if reg.db_path.exists() and reg.query("SELECT 1 FROM runs WHERE id=?", (run_id,)):
                if len(_RUN_HOMES) > 1000:
                    _RUN_HOMES.clear()
                _RUN_HOMES[run_id] = reg
                return reg
        except sqlite3.Error:
            continue
    return None


__all__ = ["registry_for_run"]

"""The run/lineage registry: embedded SQLite (WAL) plus a content-addressed artifact store.

Layout under the registry home (``$LLMOPS_HOME`` or ``./.llmops``)::

    registry.db            runs, metrics, artifacts, run_artifacts, edges (core.py); eval, traffic, prompt and
                           audit tables (evals.py, traffic.py, prompts.py, audit.py). No SQL outside this package.
    artifacts/ab/abcd…/    one directory per artifact, named by the content hash of its files
    tmp/                   staging area; a crashed write leaves nothing in artifacts/
    cache/artifacts/       verified local copies of artifacts kept in a shared store ($LLMOPS_ARTIFACTS, store.py)

Every write is one ``BEGIN IMMEDIATE`` transaction with a generous busy timeout, so several processes (a kernel,
a detached trainer, the server, a sweep's workers) can write at once without losing anything.
"""

from __future__ import annotations

from llmops_jupyter.registry.core import Artifact, Registry, RunStatus, default_home

__all__ = ["Artifact", "Registry", "RunStatus", "default_home"]

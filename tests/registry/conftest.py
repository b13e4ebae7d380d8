"""The registry suite runs on both backends: every test here gets ``backend`` (sqlite, then postgresql)."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, monkeypatch) -> str:
    """The database behind the registries this test opens: SQLite in the home, or a fresh PostgreSQL schema
    (``LLMOPS_REGISTRY``, which subprocesses inherit)."""
    if request.param == "postgresql":
        request.getfixturevalue("pg_url")
    else:
        monkeypatch.delenv("LLMOPS_REGISTRY", raising=False)
    return request.param


@pytest.fixture()
def registry(home, backend):
    from llmops_jupyter.registry import Registry

    return Registry(home)

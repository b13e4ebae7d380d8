"""The registry suite runs on both backends: ``registry`` here follows ``backend`` (tests/conftest.py: sqlite, then
postgresql)."""

from __future__ import annotations

import pytest


@pytest.fixture()
def registry(home, backend):
    from llmops_jupyter.registry import Registry

    return Registry(home)

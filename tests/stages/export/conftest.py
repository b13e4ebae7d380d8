"""Fixtures of the GGUF export tests, and the ``gguf`` marker's selection rule.

Tests marked ``gguf`` need ``llama_cpp`` (the ``[gguf]`` extra builds llama.cpp, ~7 min on 2 cores). They are
*deselected* — not skipped: under CI=true an import skip is a failure — unless the ``-m`` expression names the
marker (``make test-gguf`` runs ``-m gguf``). The converter and Modelfile tests run in every suite.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_ignore_collect(collection_path, config):
    """The llama.cpp runtime module imports ``llama_cpp`` at collection: not collected at all unless ``-m`` names
    ``gguf`` (an import skip would be a failure under CI=true, and these tests are not part of ``make test``)."""
    if collection_path.name == "test_gguf_runtime.py" and "gguf" not in (config.getoption("markexpr") or ""):
        return True
    return None


def pytest_collection_modifyitems(config, items):
    if "gguf" in (config.getoption("markexpr") or ""):
        return
    here = Path(__file__).parent
    keep, dropped = [], []
    for item in items:
        (dropped if "gguf" in item.keywords and here in Path(str(item.fspath)).parents else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(scope="session")
def smollm_tok_model() -> Path:
    """Random tiny Llama with SmolLM2's tokenizer: for converter tests (nothing generates from it)."""
    pytest.importorskip("transformers")
    from tinygguf import build_tiny_gguf_model

    return build_tiny_gguf_model(steps=0)


@pytest.fixture(scope="session")
def trained_model() -> Path:
    """The same, trained ~1 min (once per machine) so its greedy answers have clear margins."""
    pytest.importorskip("transformers")
    from tinygguf import build_tiny_gguf_model

    return build_tiny_gguf_model()

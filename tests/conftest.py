"""Shared fixtures: an isolated registry per test and the tiny offline model, built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _import_skip(report) -> str | None:
    """The reason when ``report`` is a skip caused by a failed import (``pytest.importorskip``), else None."""
    if not report.skipped:
        return None
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr or "")
    return reason if "could not import" in reason else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a test skipped because an import failed is a failure (GPU tests excepted): a broken
    transformers or Playwright install must not turn most of the suite into skips."""
    outcome = yield
    report = outcome.get_result()
    reason = _import_skip(report)
    if CI and reason and "gpu" not in item.keywords:
        report.outcome = "failed"
        report.longrepr = f"CI=true: skipped because an import failed, which CI counts as a failure: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped at import (``importorskip`` at module level)."""
    outcome = yield
    report = outcome.get_result()
    reason = _import_skip(report)
    if CI and reason and "/gpu/" not in str(getattr(collector, "path", "")):
        report.outcome = "failed"
        report.longrepr = f"CI=true: module skipped because an import failed: {reason}"


def pytest_collection_modifyitems(config, items):
    cuda = False
    if any("gpu" in item.keywords for item in items):
        try:
            import torch

            cuda = torch.cuda.is_available()
        except ImportError:
            cuda = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model-cache")
    os.environ["LLMOPS_MODEL_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(model_cache) -> Path:
    """Path to a tiny Llama checkpoint + tokenizer (built offline once per session)."""
    pytest.importorskip("transformers")
    from llmops_jupyter.testing import build_tiny_model

    return build_tiny_model(model_cache / "tiny-llama")


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    """An empty registry home for this test (LLMOPS_HOME)."""
    path = tmp_path / ".llmops"
    monkeypatch.setenv("LLMOPS_HOME", str(path))
    monkeypatch.chdir(tmp_path)
    return path


@pytest.fixture()
def registry(home):
    from llmops_jupyter.registry import Registry

    return Registry(home)


@pytest.fixture()
def shell(home):
    """A real IPython InteractiveShell with the extension loaded."""
    import plotly.io as pio
    from IPython.testing.globalipapp import get_ipython

    pio.renderers.default = "plotly_mimetype"  # a terminal shell would otherwise try to open a browser
    ip = get_ipython()
    ip.run_line_magic("load_ext", "llmops_jupyter")
    yield ip


PY = sys.executable


@pytest.fixture()
def tiny_dataset(registry, tiny_model):
    """A dataset artifact (standard format, see llmops_jupyter.stages.data.format) built for the tiny model."""
    from llmops_jupyter.testing import write_tiny_dataset

    return write_tiny_dataset(registry, tiny_model)


# -- PostgreSQL (the team registry backend) -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL server for this session (tests/pgserver.py). Missing PostgreSQL skips, or fails under CI."""
    pytest.importorskip("psycopg")
    from pgserver import start_server

    try:
        server = start_server()
    except (FileNotFoundError, RuntimeError) as exc:
        if CI:
            pytest.fail(f"CI=true: PostgreSQL is required for the registry tests: {exc}")
        pytest.skip(f"no PostgreSQL server: {exc}")
    yield server
    server.remove()


@pytest.fixture()
def pg_url(pg_server, monkeypatch) -> str:
    """A fresh, empty PostgreSQL registry for this test (its own schema), set as LLMOPS_REGISTRY."""
    import secrets

    import psycopg

    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(pg_server.url, autocommit=True) as con:
        con.execute(f"CREATE SCHEMA {name}")
    url = f"{pg_server.url}&options=-csearch_path%3D{name}"
    monkeypatch.setenv("LLMOPS_REGISTRY", url)
    yield url
    from llmops_jupyter.registry import Registry

    for key, inst in list(Registry._instances.items()):
        if key[1] == url:
            inst.close()
            Registry._instances.pop(key, None)
    with psycopg.connect(pg_server.url, autocommit=True) as con:
        con.execute(f"DROP SCHEMA {name} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, monkeypatch) -> str:
    """The database behind the registries a test opens: SQLite in the home, or a fresh PostgreSQL schema
    (``LLMOPS_REGISTRY``, which subprocesses inherit). Request it before ``registry`` to parametrise a test."""
    if request.param == "postgresql":
        request.getfixturevalue("pg_url")
    else:
        monkeypatch.delenv("LLMOPS_REGISTRY", raising=False)
    return request.param

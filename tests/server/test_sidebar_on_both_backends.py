"""The Lab sidebar's REST answers on a SQLite registry and on its ``registry copy`` in PostgreSQL are the same JSON,
and its user filter (``GET /llmops/runs?user=``) lists only that user's runs on both.

Two real Jupyter servers with the llmops server extension: one on the SQLite registry of real stage runs (data by
two users, a fine-tune of the tiny model), one with ``LLMOPS_REGISTRY`` naming the PostgreSQL copy.
"""

from __future__ import annotations

import json

import httpx
import pytest

from llmops_jupyter.frontends.cli import main as cli
from llmops_jupyter.testing import tiny_records

pytestmark = pytest.mark.slow  # two Jupyter servers and a fine-tune: ~30 s on 2 cores

#: keys of a reply that say when it was made, not what the registry holds
CLOCK = ("now", "time")


def _answers(server, ids: list[str], hashes: list[str]) -> dict[str, object]:
    """Every JSON the sidebar fetches for these runs and artifacts, by route."""
    def get(path: str, **params) -> object:
        r = httpx.get(f"{server.url}/llmops/{path}", params=params, headers=server.headers(), timeout=60)
        assert r.status_code == 200, (path, r.text)
        body = r.json()
        return {k: v for k, v in body.items() if k not in CLOCK} if isinstance(body, dict) else body

    out = {"runs": get("runs"), "runs?user=grace": get("runs", user="grace"), "runs?stage=data": get("runs", stage="data"),
           "selection": get("selection")}
    out |= {f"runs/{i}": get(f"runs/{i}") for i in ids}
    out |= {f"lineage/{h}": get(f"lineage/{h}") for h in hashes}
    return out


def test_sidebar_answers_the_same_on_sqlite_and_its_postgresql_copy(tmp_path, tiny_model, pg_url, monkeypatch,
                                                                    start_lab):
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.registry import Registry

    root = tmp_path / "root"
    root.mkdir()
    home = root / ".llmops"
    monkeypatch.setenv("LLMOPS_HOME", str(home))
    monkeypatch.delenv("LLMOPS_REGISTRY")  # the source: SQLite in the home
    src = tmp_path / "records.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in tiny_records(24)))
    assert cli(["data", str(src), "--tokenizer", str(tiny_model), "--name", "a", "--no-dedup"]) == 0
    monkeypatch.setenv("JUPYTERHUB_USER", "grace")
    assert cli(["data", str(src), "--tokenizer", str(tiny_model), "--name", "b", "--seed", "1", "--no-dedup"]) == 0
    sq = Registry(home, database="")
    ft = Runner(sq, defaults=False).run("finetune", {"model": str(tiny_model), "data": sq.get_artifact("data@latest", kind="dataset").hash, "max_steps": 3,
                                                     "batch_size": 4, "checkpoint_every": 0, "log_every": 1})
    monkeypatch.delenv("JUPYTERHUB_USER")
    assert cli(["registry", "copy", "--to", pg_url]) == 0

    runs = sq.list_runs(limit=None)
    ids = [r["id"] for r in runs]
    hashes = [a.hash for r in ids for a in sq.run_artifacts(r, "output")]
    assert len(ids) == 3 and hashes
    grace = [r["id"] for r in runs if r["user"] == "grace"]
    assert len(grace) == 2 and ft.run_id in grace

    answers = {name: _answers(start_lab(root, home, name, LLMOPS_REGISTRY=url), ids, hashes)
               for name, url in (("sqlite", None), ("postgresql", pg_url))}
    on_sqlite, on_pg = answers["sqlite"], answers["postgresql"]
    assert [r["id"] for r in on_sqlite["runs"]["runs"]] == ids
    for route in on_sqlite:
        assert on_pg[route] == on_sqlite[route], route
    # the user filter: only grace's runs, each row naming its user; every user offered to the control
    filtered = on_pg["runs?user=grace"]["runs"]
    assert [r["id"] for r in filtered] == grace and {r["user"] for r in filtered} == {"grace"}
    assert "grace" in on_pg["runs"]["users"] and len(on_pg["runs"]["users"]) == 2
    assert on_pg[f"runs/{ft.run_id}"]["metrics"] and on_pg[f"runs/{ft.run_id}"]["lineage"]["edges"]

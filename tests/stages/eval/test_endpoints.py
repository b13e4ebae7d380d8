"""Hosted APIs and your own versions in one evaluation: a local model, this project's own server (a real uvicorn
deployment of the tiny model) and a second OpenAI-compatible server on 127.0.0.1 (FakeOpenAI: reports usage, can
answer 429 or hang), compared in one eval with tokens, latency, cost, retries, timeouts, cache and budget."""

from __future__ import annotations

import json
import math

import pytest

from llmops_jupyter.core.runner import Runner
from llmops_jupyter.stages.eval import store as evalstore
from llmops_jupyter.testing import FakeOpenAI

pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("httpx")

KEY = "sk-test-endpoints-0123456789"
IN, OUT = 0.2, 20.0  # USD per million tokens of the fake endpoint (the price file below)


def _prices(tmp_path, url: str):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"source": "test price sheet", "date": "2026-12-01",
                                "prices": [{"model": "fake-mini", "endpoint": url, "input_per_mtok": IN,
                                            "output_per_mtok": OUT}]}))
    return path


@pytest.fixture()
def deployment(registry, tiny_model, monkeypatch):
    from llmops_jupyter.stages.serve import server

    monkeypatch.setenv("SERVE_TEST_KEY", KEY)
    res = Runner(registry).run("serve", model=str(tiny_model), api_key_env="SERVE_TEST_KEY", max_concurrency=2,
                               max_tokens=64, default_max_tokens=16, foreground=False)
    yield res.run_id
    if res.run_id in server.LOCAL:
        server.stop(registry, res.run_id, timeout=30)


def test_local_deployment_and_hosted_style_endpoint_in_one_eval(registry, tiny_dataset, tiny_model, deployment,
                                                                tmp_path):
    from llmops_jupyter.stages.data.format import load_dataset
    from llmops_jupyter.stages.eval.generate import eval_items
    from llmops_jupyter.stages.eval.rate import CompareView

    items = eval_items(load_dataset(tiny_dataset.hash, registry), "eval", 4)
    with FakeOpenAI() as fake:
        fake.throttle = 1  # the first request gets a 429 (Retry-After: 0): retried
        fake.hang_on = items[-1]["user"]  # the last example hangs: timed out, recorded as failed
        ep = f"openai:{fake.url}#fake-mini"
        params = dict(model=[str(tiny_model), f"deployment:{deployment}", ep], data=tiny_dataset.hash, limit=4,
                      max_new_tokens=6, metrics=["f1", "rougeL", "latency"], api_key_env=["SERVE_TEST_KEY"],
                      prices=str(_prices(tmp_path, fake.url)), request_timeout=2.0, retries=2, concurrency=2,
                      stream=True, usd_per_hour=3.0, gate="f1>=-1")
        res = Runner(registry).run("eval", params)
        assert res.status == "finished"
        labels = res.summary["labels"]
        local, ours, theirs = (evalstore.summaries(registry, res.run_id)[r] for r in res.summary["models"])

        # tokens as the APIs report them, latency percentiles, ttft when streaming, errors
        rows = evalstore.load_examples(registry, res.run_id, ep)
        ok = [r for r in rows if not r["generation"]["error"]]
        assert theirs["prompt_tokens"] == sum(u["prompt_tokens"] for u in fake.usage)
        assert theirs["completion_tokens"] == sum(u["completion_tokens"] for u in fake.usage)
        assert [r["output"] for r in ok] == [FakeOpenAI.reply_for([{"content": it["user"]}]) for it in items[:3]]
        assert theirs["errors"] == 1 and ours["errors"] == 0
        assert 0 < theirs["latency_p50_s"] <= theirs["latency_p95_s"] and 0 < ours["ttft_p50_s"] <= ours["latency_p95_s"]
        assert ours["prompt_tokens"] > 0 and local["completion_tokens"] > 0 and local["latency_p50_s"] > 0
        assert fake.max_in_flight <= 2  # bounded concurrency

        # cost = usage x price (to 1e-9); our own deployment has no list price: unknown, never $0
        expected = sum(u["prompt_tokens"] * IN + u["completion_tokens"] * OUT for u in fake.usage) / 1e6
        assert theirs["cost_usd"] == pytest.approx(expected, abs=1e-9)
        assert math.isnan(ours["cost_usd"]) and local["cost_usd"] > 0  # local: generation time x --usd-per-hour
        cells = {row[0]: row[1:] for row in res.outputs["summary"].rows}
        assert cells["cost_usd"][1] == "unknown" and cells["spent_usd"][1] == "unknown"
        assert cells["cost_usd"][2] == f"${expected:.6f}" and cells["cost_usd"][0].startswith("$")
        assert any("unknown" in w and "tiny-llama" in w for w in res.summary["warnings"])

        # a 429 retried, a hung request timed out and recorded, the run not failed
        assert fake.statuses.count(429) == 1 and theirs["retries"] == 1
        hung = rows[-1]
        assert hung["output"] == "" and "timed out" in hung["generation"]["error"] and hung["metrics"]["f1"] == 0

        # the price snapshot is in the results' lineage
        up = registry.lineage(res.artifact, "up")["nodes"]
        assert {"price-table", "endpoint", "base-model", "dataset"} <= {n["kind"] for n in up}
        price_art = next(registry.get_artifact(n["hash"]) for n in up if n["kind"] == "price-table")
        snap = json.loads((price_art.path / "prices.json").read_text())
        entry = next(p for p in snap["prices"] if p["model"] == "fake-mini")
        assert entry["date"] == "2026-12-01" and "test price sheet" in entry["source"] and entry["output_per_mtok"] == OUT

        # the same table, per-example store, rating widget and paired-bootstrap gate as local versions
        assert [g["candidate"] for g in res.summary["gate"]] == labels[1:]
        view = CompareView(registry, [res.run_id], user="rater")
        assert len(view.versions) == 3 and len(view.ids) == 4

        # rerun: served from the cache, no request reaches either server (the hung example left out)
        served_before = len(registry.requests(deployment))
        seen = fake.requests
        again = Runner(registry).run("eval", params | {"limit": 3, "gate": None})
        assert fake.requests == seen and len(registry.requests(deployment)) == served_before
        cached = evalstore.summaries(registry, again.run_id)[ep]
        assert cached["cache_hits"] == 3 and cached["requests"] == 0 and cached["spent_usd"] == 0
        assert cached["cost_usd"] == pytest.approx(expected, abs=1e-9)  # what the answers cost, though paid once

        # --budget-usd: stops before it would spend more, within one request's cost of the limit
        per_request = expected / 3
        budget = 2.5 * per_request
        fake.hang_on = None
        seen = fake.requests
        capped = Runner(registry).run("eval", params | {"model": [ep], "cache": False, "gate": None, "concurrency": 1,
                                                        "budget_usd": budget})
        b = capped.summary["prices"]["budget"]
        assert b["stopped"] and b["refused"] >= 1 and 0 < b["spent_usd"] <= budget
        assert budget - b["spent_usd"] < b["max_request_estimate_usd"]
        sent = fake.requests - seen
        refused = [r for r in evalstore.load_examples(registry, capped.run_id) if "budget" in
                   (r["generation"]["error"] or "")]
        assert sent == 4 - len(refused) and len(refused) == b["refused"]


def test_endpoint_reference_and_key_errors_are_one_line(registry, monkeypatch):
    from llmops_jupyter.core.errors import ConfigError
    from llmops_jupyter.stages.eval.stage import EvalConfig

    with pytest.raises(ConfigError, match=r"openai:BASE_URL#MODEL"):
        EvalConfig(model=["openai:http://127.0.0.1:1/v1"])
    with pytest.raises(ConfigError, match="endpoint model cannot give"):
        EvalConfig(model=["tiny-llama", "openai:http://127.0.0.1:1/v1#m"], metrics=["ppl"], gate="ppl<=+5%")
    with pytest.raises(ConfigError, match="--api-key-env names 2 variables for 1 endpoint"):
        EvalConfig(model=["openai:http://127.0.0.1:1/v1#m"], api_key_env=["A", "B"])
    from llmops_jupyter.models.endpoints import Endpoint, api_key

    monkeypatch.delenv("NOT_SET_KEY", raising=False)
    with pytest.raises(ConfigError, match="NOT_SET_KEY: that environment variable is not set"):
        api_key("NOT_SET_KEY", Endpoint("x", "http://h/v1", "m"))

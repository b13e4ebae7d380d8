"""The endpoint client on its own: retries and their limit, the cache key, the budget's refusals."""

from __future__ import annotations

import pytest

from llmops_jupyter.models.cost import Price
from llmops_jupyter.models.endpoints import Budget, Endpoint, EndpointClient, ResponseCache, parse_endpoint, percentile
from llmops_jupyter.testing import FakeOpenAI

pytest.importorskip("httpx")
MSG = [{"role": "user", "content": "what is two plus two"}]


def test_retries_until_the_limit_then_a_recorded_error(tmp_path):
    with FakeOpenAI() as fake:
        ep = parse_endpoint(f"openai:{fake.url}/#fake-mini")
        assert ep.base_url == fake.url and ep.model == "fake-mini" and ep.name.startswith("fake-mini@127.0.0.1:")
        fake.throttle = 2
        client = EndpointClient(ep, retries=2, backoff=0.001)
        ok = client.chat(MSG, {"max_tokens": 8})
        assert ok.ok and ok.attempts == 3 and ok.text == "the answer is what is" and ok.completion_tokens == 5
        fake.throttle = 5
        bad = client.chat(MSG, {"max_tokens": 8})
        assert not bad.ok and bad.status == 429 and bad.attempts == 3 and "rate limited" in bad.error
        assert client.stats.requests == 6 and client.stats.retries == 4 and client.stats.errors == 1
        client.close()


def test_cache_key_covers_endpoint_model_messages_and_parameters(tmp_path):
    k = ResponseCache.key
    base = k("http://h/v1", "m", MSG, {"max_tokens": 8, "temperature": 0.0})
    assert base == k("http://h/v1/", "m", MSG, {"temperature": 0.0, "max_tokens": 8})
    assert len({base, k("http://g/v1", "m", MSG, {"max_tokens": 8, "temperature": 0.0}),
                k("http://h/v1", "n", MSG, {"max_tokens": 8, "temperature": 0.0}),
                k("http://h/v1", "m", [{"role": "user", "content": "x"}], {"max_tokens": 8, "temperature": 0.0}),
                k("http://h/v1", "m", MSG, {"max_tokens": 8, "temperature": 0.7})}) == 5
    with FakeOpenAI() as fake:
        cache = ResponseCache(tmp_path)
        client = EndpointClient(Endpoint("x", fake.url, "fake-mini"), cache=cache,
                                price=Price("fake-mini", None, 1.0, 2.0, "t", "d"))
        first = client.chat(MSG, {"max_tokens": 8})
        second = client.chat(MSG, {"max_tokens": 8})
        assert fake.requests == 1 and second.cached and second.text == first.text
        assert second.cost_usd == first.cost_usd and second.spent_usd == 0 and first.spent_usd == first.cost_usd
        client.close()


def test_budget_refuses_what_would_pass_the_limit():
    b = Budget(1.0)
    assert b.reserve(0.6) and not b.reserve(0.5) and b.exhausted
    b.settle(0.6, 0.3)
    assert not b.reserve(0.1)  # once stopped, the run spends nothing more
    assert b.to_dict()["spent_usd"] == 0.3 and b.refused == 2
    assert percentile([3, 1, 2, 4], 50) == 2.5 and percentile([1.0, 2.0], 95) == pytest.approx(1.95)

"""Prices: a user file, genai-prices' bundled snapshot for a provider's own URL, unknown otherwise (never $0), and
no network access at import or lookup time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmops_jupyter.core.errors import DataError
from llmops_jupyter.models.cost import Price, PriceTable, fmt_usd


def test_cost_is_usage_times_price_and_unknown_is_never_zero(tmp_path):
    p = Price("m", None, 0.15, 0.6, "test", "2026-12-01")
    assert p.cost(1234, 567) == pytest.approx((1234 * 0.15 + 567 * 0.6) / 1e6, abs=1e-12)
    assert Price("m", None, None, 0.6, "unknown", None).cost(1, 1) is None and p.cost(None, 3) is None
    assert fmt_usd(None) == "unknown" and fmt_usd(float("nan")) == "unknown" and fmt_usd(0.0) == "$0.000000"

    f = tmp_path / "prices.json"
    f.write_text(json.dumps({"source": "sheet", "date": "2026-12-01", "prices": [
        {"model": "served", "input_per_mtok": 1, "output_per_mtok": 2},
        {"model": "served", "endpoint": "http://10.0.0.5:8000/v1", "input_per_mtok": 3, "output_per_mtok": 4}]}))
    table = PriceTable(f)
    assert table.lookup("served", "http://10.0.0.5:8000/v1/").input_per_mtok == 3  # the most specific entry
    assert table.lookup("served", "http://127.0.0.1:1/v1").input_per_mtok == 1
    assert table.lookup("served").date == "2026-12-01" and "sheet" in table.lookup("served").source
    # a self-hosted server calling its model gpt-4o-mini is not priced as OpenAI
    fake = table.lookup("gpt-4o-mini", "http://127.0.0.1:9/v1")
    assert not fake.known and fake.cost(10, 10) is None
    assert any("gpt-4o-mini" in w and "unknown" in w for w in table.warnings())
    assert {p["model"] for p in table.snapshot()["prices"]} == {"served", "gpt-4o-mini"}


def test_hosted_prices_come_from_the_bundled_genai_prices_snapshot():
    genai_prices = pytest.importorskip("genai_prices")
    table = PriceTable()
    price = table.lookup("gpt-4o-mini", "https://api.openai.com/v1")
    assert price.known and price.source.startswith(f"genai-prices {genai_prices.__version__}") and price.date
    ours = price.cost(1000, 100)
    theirs = genai_prices.calc_price(genai_prices.Usage(input_tokens=1000, output_tokens=100), "gpt-4o-mini",
                                     provider_api_url="https://api.openai.com/v1").total_price
    assert ours == pytest.approx(float(theirs), abs=1e-9)
    made_up = table.lookup("no-such-model-xyz", "https://api.openai.com/v1")
    assert not made_up.known and "not in genai-prices" in made_up.note


@pytest.mark.parametrize("doc, match", [({"prices": []}, "'source' is missing"),
                                        ({"source": "s", "prices": []}, "'date' is missing"),
                                        ({"source": "s", "date": "d", "prices": [{"model": "m", "input_per_mtok": -1,
                                                                                   "output_per_mtok": 1}]},
                                         r"prices\[0\].input_per_mtok must be a number >= 0")])
def test_a_bad_price_file_is_one_line_naming_the_entry(tmp_path, doc, match):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=match):
        PriceTable(f)


def test_no_network_at_import_or_lookup_beyond_the_named_endpoint():
    """Every socket connect outside 127.0.0.1 fails in this process: importing, pricing a hosted model and calling
    a local endpoint still work (prices are bundled; nothing is fetched)."""
    code = """
import socket
real = socket.socket.connect
def guard(self, addr):
    if addr[0] not in ('127.0.0.1', '::1'):
        raise AssertionError(f'network access to {addr}')
    return real(self, addr)
socket.socket.connect = guard
socket.getaddrinfo = lambda host, *a, **k: (_ for _ in ()).throw(AssertionError(f'DNS lookup of {host}')) \\
    if host not in ('127.0.0.1', 'localhost') else real_gai(host, *a, **k)
import llmops_jupyter.models.cost as cost, llmops_jupyter.models.endpoints as endpoints
from llmops_jupyter.testing import FakeOpenAI
print(cost.PriceTable().lookup('gpt-4o-mini', 'https://api.openai.com/v1').known)
with FakeOpenAI() as fake:
    c = endpoints.EndpointClient(endpoints.Endpoint('x', fake.url, 'fake-mini'))
    print(c.chat([{'role': 'user', 'content': 'hi there'}], {'max_tokens': 4}).ok)
"""
    code = "import socket\nreal_gai = socket.getaddrinfo\n" + code
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True"]

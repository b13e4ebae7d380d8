"""Prices and cost formulas, in one place: what a call to a hosted model costs, and what your own models cost.

Read by ``eval`` (cost per candidate and of the judge, ``--budget-usd``), by ``plan --cost`` (fine-tuning GPU-hours,
a deployment's $ per 1M tokens and the break-even volume against a hosted price) and by the selection view.

Prices come from, in order:

1. a **user price file** (``--prices FILE``, JSON): ``{"source": "...", "date": "YYYY-MM-DD", "prices": [{"model":
   "...", "endpoint": "optional URL prefix", "input_per_mtok": 0.15, "output_per_mtok": 0.6}]}``;
2. the **genai-prices** snapshot bundled in that package (offline: this module never asks it to update), used only
   for an endpoint whose base URL is that provider's own API (``api.openai.com``...). A self-hosted server that
   happens to serve a model called ``gpt-4o-mini`` is *not* priced as OpenAI;
3. otherwise the price is **unknown**: shown as "unknown" with a warning, never as 0 or a guess.

Every price used in a run is written to the run's lineage as a ``price-table`` artifact (source, date, per model).
Standard library only at import.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from llmops_jupyter.core.errors import DataError

MTOK = 1_000_000

#: genai-prices carries no date of its own: the month each known version was published on the package index
#: (other versions show their version number and "date not recorded").
GENAI_PRICES_RELEASED = {"0.2.3": "2026-11"}


@dataclasses.dataclass(frozen=True)
class Price:
    """USD per million input / output tokens of one model at one endpoint, and where that number came from."""

    model: str
    endpoint: str | None
    input_per_mtok: float | None
    output_per_mtok: float | None
    source: str
    date: str | None
    note: str = ""

    @property
    def known(self) -> bool:
        return self.input_per_mtok is not None and self.output_per_mtok is not None

    def cost(self, prompt_tokens: int | float | None, completion_tokens: int | float | None) -> float | None:
        """``prompt × input + completion × output`` (per token); ``None`` when the price or the usage is unknown."""
        if not self.known or prompt_tokens is None or completion_tokens is None:
            return None
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / MTOK

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def unknown(model: str, endpoint: str | None, why: str) -> Price:
    return Price(model, endpoint, None, None, "unknown", None, why)


def fmt_usd(value: float | None) -> str:
    """``$0.000123`` for a known cost, ``unknown`` otherwise (never ``$0`` for a missing price)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "unknown"
    return f"${value:.6f}" if value < 0.01 else f"${value:,.4f}"


def _num(value: Any, where: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or math.isnan(value):
        raise DataError(f"{path}: {where} must be a number >= 0 (USD per million tokens), got {value!r}.",
                        path=str(path), fix="write prices as numbers, e.g. \"input_per_mtok\": 0.15")
    return float(value)


def load_price_file(path: str | Path) -> list[Price]:
    """Prices from a user file (format in the module docstring); a bad file is one line naming the entry."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"Price file '{p}' does not exist.", path=str(p),
                        fix="pass --prices with a JSON file of {source, date, prices: [...]}")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{p}: not valid JSON ({exc}).", path=str(p), fix="fix the JSON syntax") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("prices"), list):
        raise DataError(f"{p}: expected an object with a 'prices' list.", path=str(p),
                        fix='write {"source": "...", "date": "YYYY-MM-DD", "prices": [{"model": ...}]}')
    for key in ("source", "date"):
        if not str(doc.get(key) or "").strip():
            raise DataError(f"{p}: '{key}' is missing: a price needs to say where and when it was taken.",
                            path=str(p), fix=f'add "{key}": "..." at the top level')
    out = []
    for i, e in enumerate(doc["prices"]):
        if not isinstance(e, dict) or not str(e.get("model") or "").strip():
            raise DataError(f"{p}: prices[{i}] has no 'model'.", path=str(p), fix="give every entry a model name")
        out.append(Price(str(e["model"]), (str(e["endpoint"]).rstrip("/") if e.get("endpoint") else None),
                         _num(e.get("input_per_mtok"), f"prices[{i}].input_per_mtok", p),
                         _num(e.get("output_per_mtok"), f"prices[{i}].output_per_mtok", p),
                         f"user file {p.name}: {doc['source']}", str(doc["date"]), str(e.get("note") or "")))
    return out


def genai_prices_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("genai-prices")
    except importlib.metadata.PackageNotFoundError:
        return None


def _genai_lookup(base_url: str, model: str) -> Price | None:
    """The bundled genai-prices snapshot for a provider's own API URL; ``None`` when it has no such entry."""
    version = genai_prices_version()
    if version is None:
        return None
    from datetime import datetime, timezone

    from genai_prices import data_snapshot  # bundled data only; update_prices (the fetcher) is never started

    try:
        provider, info = data_snapshot.get_snapshot().find_provider_model(model, None, None, base_url)
    except LookupError:
        return None
    prices = info.get_prices(datetime.now(timezone.utc))
    note = []

    def per_mtok(value: Any) -> float | None:
        if value is None:
            return None
        if hasattr(value, "base"):  # TieredPrices: the price below the first threshold
            note.append("tiered price: base tier used")
            value = value.base
        return float(value)

    inp, out = per_mtok(getattr(prices, "input_mtok", None)), per_mtok(getattr(prices, "output_mtok", None))
    if inp is None or out is None:
        return None
    return Price(model, base_url.rstrip("/"), inp, out, f"genai-prices {version} ({provider.id}/{info.id})",
                 GENAI_PRICES_RELEASED.get(version, f"date not recorded (genai-prices {version})"), "; ".join(note))


def is_hosted(base_url: str) -> bool:
    """A URL on the public internet (not loopback or a private address): the only kind a provider table prices."""
    import ipaddress

    host = (urlsplit(base_url).hostname or "").lower()
    if host in ("localhost", "") or host.endswith((".local", ".internal", ".lan")):
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "." in host
    return not (ip.is_loopback or ip.is_private or ip.is_link_local)


class PriceTable:
    """Looks prices up (user file first, then genai-prices for hosted provider URLs) and remembers every one used,
    so the run can record exactly the prices its costs were computed with."""

    def __init__(self, user_file: str | Path | None = None):
        self.user_file = str(user_file) if user_file else None
        self.user = load_price_file(user_file) if user_file else []
        self.used: dict[tuple[str | None, str], Price] = {}

    def lookup(self, model: str, endpoint: str | None = None) -> Price:
        key = (endpoint.rstrip("/") if endpoint else None, model)
        if key in self.used:
            return self.used[key]
        price = self._find(model, key[0])
        self.used[key] = price
        return price

    def _find(self, model: str, endpoint: str | None) -> Price:
        matches = [p for p in self.user if p.model == model and (p.endpoint is None or (endpoint or "").startswith(
            p.endpoint))]
        if matches:  # the most specific endpoint prefix wins
            return max(matches, key=lambda p: len(p.endpoint or ""))
        if endpoint and is_hosted(endpoint):
            found = _genai_lookup(endpoint, model)
            if found is not None:
                return found
            if genai_prices_version() is None:
                return unknown(model, endpoint, "genai-prices is not installed (pip install "
                                                "'llmops-jupyter[eval]') and no --prices file entry")
            return unknown(model, endpoint, f"not in genai-prices {genai_prices_version()} for this URL, and no "
                                            "--prices file entry")
        where = "a self-hosted endpoint" if endpoint else "a local model"
        return unknown(model, endpoint, f"{where} has no list price: add it to a --prices file")

    def snapshot(self) -> dict[str, Any]:
        """What the run records in lineage: every price used, with its source and date."""
        return {"user_file": self.user_file, "genai_prices": genai_prices_version(),
                "prices": [p.to_dict() for p in self.used.values()]}

    def warnings(self) -> list[str]:
        return [f"price of {p.model}" + (f" at {p.endpoint}" if p.endpoint else "") + f" is unknown ({p.note}); "
                "its cost shows as 'unknown', not $0" for p in self.used.values() if not p.known]

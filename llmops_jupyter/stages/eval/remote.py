"""What the eval stage adds for endpoint candidates and for cost: one :class:`Costs` per run.

It owns the run's price table (user file + genai-prices, see :mod:`llmops_jupyter.models.cost`), the budget shared
by every endpoint and the judge, the response cache, one :class:`~llmops_jupyter.models.endpoints.EndpointClient`
per endpoint, and the per-version usage summary (tokens, p50/p95 latency and time to first token, errors, cost) that
local and remote versions both get, so they sit in one table. At the end it records the prices used as a
``price-table`` artifact, an input of the eval results (lineage).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from llmops_jupyter.models.cost import Price, PriceTable
from llmops_jupyter.models.endpoints import Budget, Endpoint, EndpointClient, ResponseCache, api_key, percentile

#: summary keys of the usage block, in display order
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "latency_p50_s", "latency_p95_s", "ttft_p50_s", "ttft_p95_s",
              "errors", "requests", "retries", "cache_hits", "cost_usd", "spent_usd", "judge_cost_usd")


class Costs:
    def __init__(self, ctx: Any, cfg: Any, endpoints: Sequence[Endpoint]):
        self.ctx = ctx
        self.cfg = cfg
        self.prices = PriceTable(cfg.prices)
        self.budget = Budget(cfg.budget_usd)
        self.cache = ResponseCache(ctx.registry.home / "cache" / "endpoints") if cfg.cache else None
        self.clients: dict[str, EndpointClient] = {}
        names = list(cfg.api_key_env)
        for i, ep in enumerate(endpoints):
            env = names[i] if len(names) > 1 else (names[0] if names else None)
            price = self.prices.lookup(ep.model, ep.base_url)
            if cfg.budget_usd is not None and not price.known:
                from llmops_jupyter.core.errors import ConfigError

                raise ConfigError(f"eval: --budget-usd cannot be kept for {ep.name}: its price is unknown "
                                  f"({price.note}).", field="budget_usd",
                                  fix="add the model to a --prices file, or drop --budget-usd")
            self.clients[ep.ref] = EndpointClient(
                ep, key=api_key(env, ep), concurrency=cfg.concurrency, timeout=cfg.request_timeout,
                retries=cfg.retries, stream=cfg.stream, cache=self.cache, price=price, budget=self.budget)

    def client(self, ep: Endpoint) -> EndpointClient:
        return self.clients[ep.ref]

    def close(self) -> None:
        for c in self.clients.values():
            c.close()

    # -- per version ------------------------------------------------------------------------------------------
    def local_price(self, label: str) -> Price:
        if self.cfg.usd_per_hour is not None:
            return Price(label, None, None, None, f"--usd-per-hour {self.cfg.usd_per_hour:g} x generation time",
                         None, "hourly")
        return self.prices.lookup(label)

    def usage_summary(self, version: Any, client: EndpointClient | None = None) -> dict[str, float]:
        """Tokens as reported (the API's usage, or the local tokenizer's counts), p50/p95 latency (and ttft when
        streamed), errors and cost; NaN where a value is unknown (the table shows 'unknown' for cost)."""
        gens = [r.get("generation") or {} for r in version.rows]
        ok = [g for g in gens if not g.get("error")]

        def total(key: str, alt: str | None = None) -> float:
            vals = [g.get(key, g.get(alt) if alt else None) for g in ok]
            if not vals or any(v is None for v in vals):
                return math.nan
            return float(sum(vals))

        out = {"prompt_tokens": total("prompt_tokens"), "completion_tokens": total("completion_tokens", "new_tokens"),
               "latency_p50_s": percentile([g.get("latency_s") for g in ok], 50),
               "latency_p95_s": percentile([g.get("latency_s") for g in ok], 95),
               "errors": float(sum(1 for g in gens if g.get("error")))}
        ttft = [g.get("ttft_s") for g in ok if g.get("ttft_s") is not None]
        if ttft:
            out["ttft_p50_s"], out["ttft_p95_s"] = percentile(ttft, 50), percentile(ttft, 95)
        if client is not None:
            costs = [g.get("cost_usd") for g in ok]
            out["cost_usd"] = math.nan if (not ok or any(c is None for c in costs)) else float(sum(costs))
            priced = client.price is not None and client.price.known
            out["spent_usd"] = float(sum(g.get("spent_usd") or 0.0 for g in gens)) if priced else math.nan
            out["requests"] = float(sum(g.get("attempts") or 0 for g in gens))
            out["retries"] = float(sum(max((g.get("attempts") or 0) - 1, 0) for g in gens))
            out["cache_hits"] = float(sum(1 for g in gens if g.get("cached")))
        elif self.cfg.usd_per_hour is not None and version.gen_seconds > 0:
            out["cost_usd"] = version.gen_seconds * self.cfg.usd_per_hour / 3600
            self.prices.used[(None, version.label)] = self.local_price(version.label)
        else:
            out["cost_usd"] = math.nan
            self.local_price(version.label)  # recorded as unknown (with its warning)
        return out

    def judge_cost(self, calls: Sequence[Any]) -> float:
        costs = [c.cost_usd for c in calls if c.ok]
        return math.nan if any(c is None for c in costs) else float(sum(costs))

    # -- end of run -------------------------------------------------------------------------------------------
    def warnings(self) -> list[str]:
        return self.prices.warnings()

    def record(self) -> Any:
        """The prices used (and the budget outcome) as a ``price-table`` artifact, declared as a run input."""
        snap = self.prices.snapshot() | {"budget": self.budget.to_dict()}
        if not self.clients and not any(p.known for p in self.prices.used.values()):  # local only, nothing priced
            return snap
        folder = self.ctx.staging_dir("prices")
        (folder / "prices.json").write_text(json.dumps(snap, indent=1, sort_keys=True, default=str))
        sources = sorted({p["source"] for p in snap["prices"]})
        art = self.ctx.registry.add_artifact(folder / "prices.json", "price-table", name="prices used by eval",
                                             meta={"sources": sources,
                                                   "dates": sorted({p["date"] for p in snap["prices"] if p["date"]})})
        self.ctx.use(art)
        return snap

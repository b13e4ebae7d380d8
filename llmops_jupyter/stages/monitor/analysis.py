"""Batched analysis of logged records: expensive checks, aggregate metrics and alert rules.

Expensive checks run here rather than at log time so serving latency never pays for them:

* **unsupported** (RAG-style prompts with a ``Context:`` / ``<context>`` section): the share of the response's
  content words found in the context, and the best embedding similarity of each response sentence to a context
  sentence; a response with little lexical *and* semantic support is flagged.
* **inconsistent** (other prompts): self-consistency — N extra samples from the same model version (batched
  through :func:`llmops_jupyter.models.inference.generate`), mean pairwise word-set agreement with the logged response.
* **toxic**: Detoxify when installed (optional); otherwise reported as skipped, never an error.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Callable
from typing import Any

from llmops_jupyter.core.errors import ConfigError, GateError
from llmops_jupyter.registry import Registry
from llmops_jupyter.stages.monitor.checks import flagged

_CONTEXT = [
    re.compile(r"<context>(?P<ctx>.*?)</context>", re.S | re.I),
    re.compile(r"(?:^|\n)\s*(?:context|documents?|sources?|passages?)\s*:\s*(?P<ctx>.*?)"
               r"(?:\n\s*(?:question|query|q)\s*:|\Z)", re.S | re.I),
]
_WORD = re.compile(r"[^\W_]+", re.U)
STOP = set("the a an and or of to in on for is are was were be been it this that with as by at from not no yes "
           "what which who how why when where do does did can could should would will you your i we they he she "
           "there their them its into than then so if but about".split())


def split_context(prompt: str) -> tuple[str, str] | None:
    """(context, question) for RAG-style prompts, else ``None``."""
    for pat in _CONTEXT:
        m = pat.search(prompt or "")
        if m and m.group("ctx").strip():
            rest = (prompt[: m.start()] + " " + prompt[m.end():]).strip()
            return m.group("ctx").strip(), rest
    return None


def content_words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text or "") if len(w) > 2 and w.lower() not in STOP}


def _sentences(text: str) -> list[str]:
    parts = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text or "") if s.strip()]
    return parts or ([text] if text else [])


def context_support(context: str, question: str, response: str, embed_fn: Callable | None = None,
                    *, min_lexical: float = 0.5, min_semantic: float = 0.5) -> dict[str, Any]:
    words = content_words(response)
    if not words:
        return {"support_lexical": 1.0, "unsupported": False}
    known = content_words(context) | content_words(question)
    lexical = len(words & known) / len(words)
    out: dict[str, Any] = {"support_lexical": round(lexical, 4)}
    semantic = None
    if embed_fn is not None:
        resp_s, ctx_s = _sentences(response), _sentences(context)
        vecs = embed_fn(resp_s + ctx_s)
        sims = vecs[: len(resp_s)] @ vecs[len(resp_s):].T
        semantic = float(sims.max(axis=1).min())
        out["support_semantic"] = round(semantic, 4)
    out["unsupported"] = lexical < min_lexical and (semantic is None or semantic < min_semantic)
    return out


def agreement(texts: list[str]) -> float:
    """Mean pairwise Jaccard similarity of content-word sets (1 = all samples say the same)."""
    sets = [content_words(t) or {t.strip().lower()} for t in texts]
    pairs = [(i, j) for i in range(len(sets)) for j in range(i + 1, len(sets))]
    if not pairs:
        return 1.0
    return sum(len(sets[i] & sets[j]) / max(1, len(sets[i] | sets[j])) for i, j in pairs) / len(pairs)


def self_consistency(model_ref: str, records: list[dict[str, Any]], n: int, *, registry: Registry,
                     max_new_tokens: int = 32, threshold: float = 0.3) -> dict[int, dict[str, Any]]:
    """N sampled answers per record from the logged model version, batched; {record id: check results}."""
    from llmops_jupyter.models.inference import apply_chat, generate, load_model

    model, tok = load_model(model_ref, registry=registry)
    prompts, owners = [], []
    for r in records:
        msgs = json.loads(r["messages"]) if r.get("messages") else [{"role": "user", "content": r["prompt"] or ""}]
        p = apply_chat(tok, msgs) if r.get("messages") else (r["prompt"] or "")
        for _ in range(n):
            prompts.append(p)
            owners.append(r["id"])
    gens = generate(model, tok, prompts, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8,
                    top_p=0.95, batch_size=16)
    samples: dict[int, list[str]] = {}
    for rid, g in zip(owners, gens, strict=True):
        samples.setdefault(rid, []).append(g.text)
    out = {}
    for r in records:
        score = agreement([r.get("response") or "", *samples.get(r["id"], [])])
        out[r["id"]] = {"consistency": round(score, 4), "inconsistent": score < threshold}
    return out


def toxicity(texts: list[str], threshold: float = 0.5) -> list[dict[str, Any]] | None:
    """Detoxify scores, or ``None`` when the optional package is missing (the check is then skipped)."""
    try:
        from detoxify import Detoxify  # type: ignore[import-not-found]
    except ImportError:
        return None
    scores = Detoxify("original").predict(texts)["toxicity"]
    return [{"toxicity": round(float(s), 4), "toxic": float(s) >= threshold} for s in scores]


# -- records & metrics ------------------------------------------------------------------------------------------
def load_records(registry: Registry, deployment: str | None = None, *, since: float | None = None,
                 until: float | None = None, last: int | None = None) -> list[dict[str, Any]]:
    """Logged requests of a window, oldest first (``checks`` decoded); ``last`` keeps the newest N."""
    return registry.requests(deployment, since=since, until=until, last=last)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _rate(rows: list[dict[str, Any]], pred: Callable[[dict[str, Any]], bool]) -> float:
    return sum(1 for r in rows if pred(r)) / len(rows) if rows else float("nan")


def compute_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Aggregate metrics of a window of records (the names alert rules use)."""
    ok = [r for r in rows if r["status"] == 200]
    lat = [r["latency_s"] for r in ok if r["latency_s"] is not None]
    ts = [r["ts"] for r in rows]
    span = (max(ts) - min(ts)) if len(ts) > 1 else 0.0
    m: dict[str, float] = {
        "request_count": float(len(rows)),
        "error_rate": _rate(rows, lambda r: r["status"] != 200),
        "server_error_rate": _rate(rows, lambda r: r["status"] >= 500),
        "rejected_rate": _rate(rows, lambda r: r["status"] == 429),
        "p50_latency_s": _pct(lat, 0.5), "p95_latency_s": _pct(lat, 0.95), "p99_latency_s": _pct(lat, 0.99),
        "throughput_rps": len(ok) / span if span > 0 else float("nan"),
        "tokens_in_mean": _mean([r["tokens_in"] for r in ok]),
        "tokens_out_mean": _mean([r["tokens_out"] for r in ok]),
        "injection_rate": _rate([r for r in rows if r["prompt"] is not None], lambda r: r["checks"].get("injection")),
        "pii_prompt_rate": _rate([r for r in rows if r["prompt"] is not None], lambda r: r["checks"].get("pii_prompt")),
        "pii_response_rate": _rate(ok, lambda r: r["checks"].get("pii_response")),
        "refusal_rate": _rate(ok, lambda r: r["checks"].get("refusal")),
        "empty_rate": _rate(ok, lambda r: r["checks"].get("empty")),
        "truncated_rate": _rate(ok, lambda r: r["checks"].get("truncated")),
        "flagged_rate": _rate(rows, lambda r: bool(flagged(r["checks"]))),
    }
    tooled = [r for r in ok if r["checks"].get("tools")]
    if tooled:  # requests that offered tools: how often a call came back, how often the model's text did not parse
        m["tool_call_rate"] = _rate(tooled, lambda r: r["checks"]["tools"].get("called"))
        m["tool_parse_failure_rate"] = _rate(tooled, lambda r: r["checks"]["tools"].get("problems"))
    structured = [r for r in ok if (r["checks"].get("structured") or {}).get("checked")]
    if structured:  # response_format json_object/json_schema answers that did not parse or validate
        m["schema_violation_rate"] = _rate(structured, lambda r: not r["checks"]["structured"].get("valid"))
    for key, name in (("toxic", "toxicity_rate"), ("unsupported", "unsupported_rate"),
                      ("inconsistent", "inconsistency_rate")):
        judged = [r for r in ok if key in r["checks"]]
        if judged:
            m[name] = _rate(judged, lambda r, k=key: r["checks"].get(k))
    return m


def _mean(values: list[Any]) -> float:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else float("nan")


# -- alert rules --------------------------------------------------------------------------------------------------
OPS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge, "<": operator.lt,
                                                  ">": operator.gt, "==": operator.eq, "!=": operator.ne}
_RULE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|==|!=|<|>)\s*([-+0-9.eE]+)\s*$")
DEFAULT_ALERTS = "error_rate<=0.1,injection_rate<=0.05,pii_response_rate<=0,drift<=0.3"


def parse_rules(text: str) -> list[tuple[str, str, float]]:
    rules = []
    for part in [p for p in re.split(r"[,;]", text or "") if p.strip()]:
        m = _RULE.match(part)
        if not m:
            raise ConfigError(f"monitor: --alert rule '{part.strip()}' is not '<metric><op><number>'.",
                              field="alert", value=text, fix="write e.g. \"injection_rate<=0.05,p95_latency_s<=2\"")
        rules.append((m.group(1), m.group(2), float(m.group(3))))
    return rules


def evaluate_rules(rules: list[tuple[str, str, float]], metrics: dict[str, float], *,
                   strict: bool = True) -> list[dict[str, Any]]:
    """One result per rule: ``ok`` True/False, or ``None`` when the metric is not available (non-strict)."""
    results = []
    for name, op, limit in rules:
        value = metrics.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            if strict:
                known = ", ".join(sorted(k for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))))
                raise ConfigError(f"monitor: alert metric '{name}' is not available for this window.",
                                  field="alert", value=name,
                                  fix=f"use one of: {known} (drift needs --reference; toxicity needs detoxify)")
            results.append({"rule": f"{name}{op}{limit:g}", "metric": name, "value": None, "ok": None})
            continue
        results.append({"rule": f"{name}{op}{limit:g}", "metric": name, "value": value, "ok": OPS[op](value, limit)})
    return results


def raise_on_breach(results: list[dict[str, Any]], deployment: str | None) -> None:
    failed = [r for r in results if r["ok"] is False]
    if failed:
        what = "; ".join(f"{r['metric']}={r['value']:.4g} breaks {r['rule']}" for r in failed)
        raise GateError(f"Monitoring alert for {deployment or 'traffic'}: {what}.", failures=failed,
                        fix="inspect the flagged records (`%llmops monitor`) before promoting this model")

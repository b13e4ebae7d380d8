"""Regression gates: paired deltas between two model versions on the same examples, with bootstrap CIs.

Syntax (comma-separated rules)::

    rougeL>=-0.01      the candidate's rougeL may drop by at most 0.01 (absolute delta = candidate - baseline)
    ppl<=+5%           the candidate's perplexity may rise by at most 5 % (relative delta)
    exact_match>=0     no drop at all

A rule is violated when the point estimate of the delta breaks it; the 95 % paired bootstrap confidence interval
(resampling examples with a fixed seed, both versions on the same resample) is reported next to it so a reader can
tell noise from a real regression. The examples that got worse are named, worst first.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

from llmops_jupyter.core.errors import ConfigError, GateError
from llmops_jupyter.stages.eval.metrics import canonical

_RULE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*(>=|<=)\s*([+-]?\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|[+-]?\.\d+)\s*(%?)\s*$")


@dataclasses.dataclass(frozen=True)
class GateRule:
    metric: str
    op: str  # ">=" | "<="
    threshold: float  # absolute delta, or a fraction when relative (5% → 0.05)
    relative: bool
    text: str

    def ok(self, delta: float) -> bool:
        if math.isnan(delta):
            return False
        return delta >= self.threshold if self.op == ">=" else delta <= self.threshold


@dataclasses.dataclass
class GateResult:
    rule: GateRule
    baseline: float
    candidate: float
    delta: float
    ci_low: float
    ci_high: float
    passed: bool
    worse: list[tuple[str, float]]  # (example id, per-example delta), worst first
    n: int

    def describe(self) -> str:
        unit = "%" if self.rule.relative else ""
        scale = 100.0 if self.rule.relative else 1.0
        worse = ", ".join(ex for ex, _ in self.worse[:10]) or "none"
        more = f" (+{len(self.worse) - 10} more)" if len(self.worse) > 10 else ""
        return (f"{self.rule.metric}: delta {self.delta * scale:+.4g}{unit} "
                f"[95% CI {self.ci_low * scale:+.4g}{unit}, {self.ci_high * scale:+.4g}{unit}] "
                f"({self.baseline:.4g} → {self.candidate:.4g}) violates '{self.rule.text}'; "
                f"{len(self.worse)}/{self.n} examples worse: {worse}{more}")

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule.text, "metric": self.rule.metric, "baseline": self.baseline,
                "candidate": self.candidate, "delta": self.delta, "ci": [self.ci_low, self.ci_high],
                "relative": self.rule.relative, "passed": self.passed, "n": self.n,
                "worse": [{"id": i, "delta": d} for i, d in self.worse]}


def parse_gate(spec: str | Sequence[str] | None) -> list[GateRule]:
    """Parse ``"rougeL>=-0.01,ppl<=+5%"``; a bad rule is a ConfigError naming it and showing the syntax. Metric
    aliases (``em``, ``rouge``) become the metric's one name here, so a gate compares the values eval stored."""
    if spec is None:
        return []
    parts = [spec] if isinstance(spec, str) else list(spec)
    rules = []
    for part in parts:
        for text in str(part).split(","):
            if not text.strip():
                continue
            m = _RULE.match(text)
            if not m:
                raise ConfigError(
                    f"eval: --gate rule '{text.strip()}' is not understood.", field="gate", value=spec,
                    fix="write METRIC>=DELTA or METRIC<=DELTA, absolute (rougeL>=-0.01) or relative (ppl<=+5%), "
                        "comma-separated")
            metric, op, num, pct = m.groups()
            value = float(num) / (100.0 if pct else 1.0)
            rules.append(GateRule(canonical(metric), op, value, bool(pct), text.strip()))
    return rules


def _stat(key: str, cols: dict[str, Any], idx: Any) -> Any:
    """Summary statistic over resampled rows ``idx`` (shape [B, n] or [n]); token-weighted for ppl/loss."""
    np = __import__("numpy")
    if key in ("ppl", "loss"):
        loss = cols["nll"][idx].sum(-1) / np.maximum(cols["n_tokens"][idx].sum(-1), 1)
        return np.exp(loss) if key == "ppl" else loss
    return np.nanmean(cols[key][idx], axis=-1)


def _columns(rows: Sequence[dict[str, float]], key: str) -> dict[str, Any]:
    np = __import__("numpy")
    names = ("nll", "n_tokens") if key in ("ppl", "loss") else (key,)
    return {k: np.array([float(r.get(k, math.nan)) for r in rows], dtype=float) for k in names}


def compare(key: str, base_rows: Sequence[dict[str, float]], cand_rows: Sequence[dict[str, float]], *,
            relative: bool = False, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
            ) -> tuple[float, float, float, float, float, list[float]]:
    """(baseline, candidate, delta, ci_low, ci_high, per-example deltas) with a paired bootstrap.

    Both versions are resampled with the same example indices, so the CI reflects the per-example differences,
    not the (much larger) spread of scores across examples.
    """
    import numpy as np

    n = len(base_rows)
    bcols, ccols = _columns(base_rows, key), _columns(cand_rows, key)
    full = np.arange(n)
    b, c = float(_stat(key, bcols, full)), float(_stat(key, ccols, full))

    def delta(bv: Any, cv: Any) -> Any:
        if not relative:
            return cv - bv
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(bv == cv, 0.0, (cv - bv) / np.abs(bv))

    d = float(delta(np.float64(b), np.float64(c)))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n)) if n else np.zeros((n_boot, 0), dtype=int)
    with np.errstate(invalid="ignore", divide="ignore"), _quiet():
        boots = delta(_stat(key, bcols, idx), _stat(key, ccols, idx))
    boots = boots[~np.isnan(boots)]
    lo, hi = (float(np.quantile(boots, alpha / 2)), float(np.quantile(boots, 1 - alpha / 2))) if boots.size \
        else (math.nan, math.nan)
    per_key = "ppl_example" if key == "ppl" else key
    if key in ("ppl", "loss"):
        bl = bcols["nll"] / np.maximum(bcols["n_tokens"], 1)
        cl = ccols["nll"] / np.maximum(ccols["n_tokens"], 1)
        per = (np.exp(cl) - np.exp(bl)) if per_key == "ppl_example" else cl - bl
    else:
        per = ccols[key] - bcols[key]
    return b, c, d, lo, hi, [float(x) for x in per]


class _quiet:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def check(rules: Sequence[GateRule], ids: Sequence[str], base_rows: Sequence[dict[str, float]],
          cand_rows: Sequence[dict[str, float]], *, n_boot: int = 1000, seed: int = 0) -> list[GateResult]:
    """Evaluate every rule on paired rows (same order as ``ids``). Does not raise; see :func:`enforce`."""
    results = []
    for rule in rules:
        b, c, d, lo, hi, per = compare(rule.metric, base_rows, cand_rows, relative=rule.relative, n_boot=n_boot,
                                       seed=seed)
        sign = -1.0 if rule.op == ">=" else 1.0  # ">=": higher is better, so worse means a negative delta
        worse = sorted(((i, x) for i, x in zip(ids, per) if not math.isnan(x) and sign * x > 0),
                       key=lambda t: -sign * t[1])
        results.append(GateResult(rule, b, c, d, lo, hi, rule.ok(d), worse, len(ids)))
    return results


def enforce(results: Sequence[GateResult], *, candidate: str, baseline: str) -> None:
    """Raise GateError naming each violated metric, its delta + CI and the examples that got worse."""
    failed = [r for r in results if not r.passed]
    if not failed:
        return
    lines = "; ".join(r.describe() for r in failed)
    raise GateError(f"Regression gate failed for {candidate} vs baseline {baseline}: {lines}.",
                    failures=[r.to_dict() for r in failed],
                    fix="inspect the worse examples with `%llmops rate <eval run>`, or relax --gate")

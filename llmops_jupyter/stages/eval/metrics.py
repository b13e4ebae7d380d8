"""Evaluation metrics: text metrics per example, a name → metric table, and ``@register_metric`` for your own.

Every metric scores one model output against one reference and returns a float per example, so any two model
versions evaluated on the same examples can be compared example by example (paired deltas, bootstrap CIs, the
side-by-side widget). Corpus-level BLEU/chrF are reported in addition to the per-example means because that is
what papers quote.

Metrics that need the model itself (``ppl``/``loss`` from log-likelihoods, ``judge`` from a second model,
``latency`` from generation) are declared here too (``kind``) but computed by the eval stage.

Custom metrics are plain Python callables::

    from llmops_jupyter.stages.eval.metrics import register_metric

    @register_metric("mentions_paris")
    def mentions_paris(output: str, reference: str) -> float:
        return float("paris" in output.lower())

    %llmops eval --model tiny-llama --metrics rougeL,mentions_paris

A callable may take ``(output, reference)`` or ``(output, reference, example)``; ``batch=True`` metrics take
lists and return a list (used for the embedding similarity, which encodes all texts at once).

This module imports only the standard library at top level (the stage modules import it for config validation);
sacrebleu, rouge-score and sentence-transformers are imported when a metric is computed.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from llmops_jupyter.core.errors import ConfigError


@dataclasses.dataclass
class Metric:
    """A registered metric. ``keys``: the per-example values it produces (``ppl`` also yields ``loss``...)."""

    name: str
    fn: Callable[..., Any] | None
    kind: str = "text"  # text (output vs reference) | model (log-likelihood) | judge | generation
    higher_is_better: bool | None = True  # None: descriptive only (length)
    batch: bool = False
    keys: tuple[str, ...] = ()
    help: str = ""

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = (self.name,)

    def compute(self, outputs: Sequence[str], references: Sequence[str],
                examples: Sequence[dict[str, Any]] | None = None) -> list[float]:
        """Per-example scores for a text metric."""
        if self.fn is None:
            raise ConfigError(f"Metric '{self.name}' is computed by the eval stage, not from text alone.")
        examples = list(examples) if examples is not None else [{} for _ in outputs]
        if self.batch:
            values = list(self._call(self.fn, list(outputs), list(references), examples))
            if len(values) != len(outputs):
                raise ConfigError(f"Metric '{self.name}' returned {len(values)} values for {len(outputs)} outputs.",
                                  fix="a batch metric must return one float per output")
            return [_float(v) for v in values]
        return [_float(self._call(self.fn, o, r, e)) for o, r, e in zip(outputs, references, examples)]

    @staticmethod
    def _call(fn: Callable[..., Any], output: Any, reference: Any, example: Any) -> Any:
        try:
            n = len([p for p in inspect.signature(fn).parameters.values()
                     if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
        except (TypeError, ValueError):
            n = 2
        return fn(output, reference, example) if n >= 3 else fn(output, reference)


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


METRICS: dict[str, Metric] = {}
ALIASES = {"em": "exact_match", "rouge": "rougeL", "rouge_l": "rougeL", "rougel": "rougeL", "perplexity": "ppl",
           "token_f1": "f1", "chrF": "chrf", "embedding": "embed_sim", "similarity": "embed_sim",
           "tokens_per_s": "latency"}


def register_metric(name: str, *, higher_is_better: bool | None = True, batch: bool = False, kind: str = "text",
                    keys: Sequence[str] = (), help: str = ""):
    """Decorator: make ``fn`` available as ``--metrics name`` (re-registering a name replaces it)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"Metric name '{name}' must be an identifier (letters, digits, _ . -).")

    def deco(fn: Callable[..., Any] | None):
        METRICS[name] = Metric(name, fn, kind=kind, higher_is_better=higher_is_better, batch=batch,
                               keys=tuple(keys), help=help or (fn.__doc__ or "").strip().split("\n")[0] if fn else help)
        return fn

    return deco


def canonical(name: str) -> str:
    """The one name of a metric or per-example value (``em`` → ``exact_match``): every place that accepts a metric
    name — ``--metrics``, ``--gate``, reports, cards — resolves aliases through here."""
    return ALIASES.get(name, name)


def get_metric(name: str) -> Metric:
    """Look a metric up by name or alias; an unknown name is a ConfigError naming close matches."""
    name = canonical(name)
    if name in METRICS:
        return METRICS[name]
    close = difflib.get_close_matches(name, list(METRICS) + list(ALIASES), n=2)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise ConfigError(f"Unknown metric '{name}'.", field="metrics", value=name,
                      fix=f"{hint}known metrics: {', '.join(sorted(METRICS))}; or register your own with "
                          "@register_metric('name')")


def metric_for_key(key: str) -> Metric | None:
    """The metric that produces per-example value ``key`` (``loss`` → ppl), or None."""
    key = canonical(key)
    for m in METRICS.values():
        if key in m.keys:
            return m
    return None


def higher_is_better(key: str) -> bool | None:
    m = metric_for_key(key)
    if m is None:
        return True
    if key in ("latency_s",):
        return False
    return m.higher_is_better


# -- normalisation (SQuAD v1.1 evaluation script) ------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and English articles, collapse whitespace (as the SQuAD script does)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(output: str, reference: str) -> float:
    """1.0 when the normalised output equals the normalised reference."""
    return float(normalize_answer(output) == normalize_answer(reference))


def token_f1(output: str, reference: str) -> float:
    """SQuAD token F1 on normalised, whitespace-split tokens (bag-of-tokens overlap)."""
    pred = normalize_answer(output).split()
    gold = normalize_answer(reference).split()
    if not pred or not gold:
        return float(pred == gold)
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


_ROUGE: dict[str, Any] = {}


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence) from Google's rouge-score, no stemming."""
    from llmops_jupyter.core.errors import require

    if "scorer" not in _ROUGE:
        rouge_scorer = require("rouge_score.rouge_scorer", "eval", package="rouge-score")
        _ROUGE["scorer"] = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_ROUGE["scorer"].score(reference, output)["rougeL"].fmeasure)


def bleu(output: str, reference: str) -> float:
    """Sentence BLEU (sacrebleu, 0-100, exponential smoothing as sacrebleu's sentence_bleu default)."""
    from llmops_jupyter.core.errors import require

    sacrebleu = require("sacrebleu", "eval")
    return float(sacrebleu.sentence_bleu(output, [reference]).score)


def chrf(output: str, reference: str) -> float:
    """Sentence chrF (sacrebleu, 0-100): character n-gram F-score, robust for short and morphologically rich text."""
    from llmops_jupyter.core.errors import require

    sacrebleu = require("sacrebleu", "eval")
    return float(sacrebleu.sentence_chrf(output, [reference]).score)


def corpus_scores(outputs: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus-level BLEU and chrF (the numbers papers quote; not the mean of sentence scores)."""
    from llmops_jupyter.core.errors import require

    sacrebleu = require("sacrebleu", "eval")
    refs = [list(references)]
    return {"bleu_corpus": float(sacrebleu.corpus_bleu(list(outputs), refs).score),
            "chrf_corpus": float(sacrebleu.corpus_chrf(list(outputs), refs).score)}


def embed_sim(outputs: list[str], references: list[str]) -> list[float]:
    """Cosine similarity of MiniLM sentence embeddings of output and reference (meaning, not wording)."""
    from llmops_jupyter.models.embeddings import cosine_pairs

    return cosine_pairs(outputs, references)


REFUSAL_PATTERNS = re.compile(
    r"\b(i\s*(?:'m|am)\s+(?:sorry|unable|not able)|i\s+(?:can(?:'|no)t|cannot|won't|will not)\s+"
    r"(?:help|assist|provide|do|answer|comply)|as an ai\b|i must decline|i'm afraid i can't)",
    re.IGNORECASE,
)


def is_refusal(output: str, reference: str = "") -> float:
    """1.0 when the output reads as a refusal ("I'm sorry, I can't help with that")."""
    return float(bool(REFUSAL_PATTERNS.search(output)))


def length_words(output: str, reference: str = "") -> float:
    """Output length in whitespace-separated words (descriptive; compare with the reference length)."""
    return float(len(output.split()))


def _support(texts: list[str], examples: list[dict[str, Any]]) -> list[float]:
    """Support of each text by what its prompt gave the model: the retrieved context (RAG), else the question.

    Reuses monitoring's check (:func:`llmops_jupyter.stages.monitor.analysis.context_support`): the share of the
    text's content words found in context + question, and the best MiniLM similarity of each text sentence to a
    context sentence. The score is the larger of the two — monitoring calls a response *unsupported* only when
    both are low, so eval and monitoring agree on what "grounded" means.
    """
    from llmops_jupyter.models.embeddings import embed
    from llmops_jupyter.stages.monitor.analysis import context_support

    out = []
    for text, ex in zip(texts, examples):
        context = (ex or {}).get("context") or ""
        question = (ex or {}).get("user") or ""
        res = context_support(context, question, text or "", embed if context.strip() and (text or "").strip()
                              else None)
        out.append(max(res.get("support_lexical", 0.0), res.get("support_semantic", 0.0)) if (text or "").strip()
                   else 0.0)
    return out


def groundedness(outputs: list[str], references: list[str], examples: list[dict[str, Any]]) -> list[float]:
    """Support of the model's answer by the context in its prompt (0-1; monitoring's context-support check)."""
    return _support(outputs, examples)


def groundedness_ref(outputs: list[str], references: list[str], examples: list[dict[str, Any]]) -> list[float]:
    """Support of the *reference* answer by the prompt's context: could a faithful model answer from it?"""
    return _support(references, examples)


def context_relevance(output: str, reference: str, example: dict[str, Any]) -> float:
    """Mean cosine similarity of the question and its retrieved chunks (MiniLM; NaN without --rag)."""
    hits = (example or {}).get("hits")
    if not hits:
        return math.nan
    return sum(h["score"] for h in hits) / len(hits)


def retrieval_hit(output: str, reference: str, example: dict[str, Any]) -> float:
    """1.0 when the example's expected document is among the retrieved chunks (recall@k; NaN if unknown)."""
    ex = example or {}
    doc = (ex.get("fields") or {}).get("doc")
    if not ex.get("hits") or not doc:
        return math.nan
    return float(any(h["doc"] == doc for h in ex["hits"]))


register_metric("exact_match", help="normalised exact match (SQuAD)")(exact_match)
register_metric("f1", help="token F1 (SQuAD)")(token_f1)
register_metric("rougeL", help="ROUGE-L F-measure (rouge-score)")(rouge_l)
register_metric("bleu", help="sentence BLEU, 0-100 (sacrebleu); bleu_corpus in the summary")(bleu)
register_metric("chrf", help="sentence chrF, 0-100 (sacrebleu); chrf_corpus in the summary")(chrf)
register_metric("embed_sim", batch=True, help="cosine similarity of MiniLM embeddings")(embed_sim)
register_metric("length", higher_is_better=None, help="output length in words")(length_words)
register_metric("refusal", higher_is_better=False, help="share of outputs that refuse")(is_refusal)
register_metric("groundedness", batch=True, help="answer supported by the prompt's context (RAG)")(groundedness)
register_metric("groundedness_ref", batch=True,
                help="reference answer supported by the prompt's context (model-independent)")(groundedness_ref)
register_metric("context_relevance", help="question ↔ retrieved chunks similarity (needs --rag)")(context_relevance)
register_metric("retrieval_hit", help="expected document retrieved, i.e. recall@k (needs --rag and a doc field)"
                )(retrieval_hit)
register_metric("ppl", kind="model", higher_is_better=False, keys=("ppl", "loss"),
                help="perplexity/loss of the reference completion (token-weighted)")(None)
register_metric("loss", kind="model", higher_is_better=False, keys=("loss", "ppl"),
                help="mean token negative log-likelihood of the reference (with ppl)")(None)
register_metric("latency", kind="generation", higher_is_better=False, keys=("latency_s", "tokens_per_s"),
                help="generation latency per batch and tokens/s")(None)
register_metric("judge", kind="judge", help="LLM-as-judge score 1-5 (needs --judge)")(None)

BUILTIN = tuple(METRICS)
DEFAULT_METRICS = ("ppl", "exact_match", "f1", "rougeL", "bleu", "chrf", "length", "refusal", "latency")


def aggregate(key: str, rows: Sequence[dict[str, float]]) -> float:
    """Summary value of ``key`` over per-example rows: token-weighted for ppl/loss, else the mean (NaN skipped)."""
    if key in ("ppl", "loss"):
        nll = sum(r.get("nll", 0.0) for r in rows)
        n = sum(r.get("n_tokens", 0.0) for r in rows)
        loss = nll / n if n else math.nan
        return math.exp(loss) if key == "ppl" else loss
    vals = [r[key] for r in rows if key in r and r[key] is not None and not math.isnan(r[key])]
    return sum(vals) / len(vals) if vals else math.nan

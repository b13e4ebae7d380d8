"""Evaluate model versions on eval items: the pieces the ``eval`` stage is built from, usable on their own.

The steps are separate functions so other features can swap one of them: prompt A/B testing passes its own
``prompt_builder`` (a versioned template instead of the model's chat template), RAG passes a builder that adds
retrieved context, and the gate / widget code only reads the per-example rows.

* :func:`eval_items` — dataset split → items ``{id, messages, reference, user}`` (the last assistant turn is the
  reference; the context is every earlier message).
* :func:`chat_prompt` — the default prompt builder: the model's own chat template with the generation prompt,
  applied the same way for every version.
* :func:`evaluate_model` — load one version, batched generation + batched log-likelihood, per-example metrics.
* :func:`judge_versions` — LLM-as-judge scores for every version's outputs (prompts and raw verdicts kept).
* :func:`summarize` — per-version summary metrics.

Top level is standard library only; torch / transformers are imported by the inference helpers when called.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from llmops_jupyter.stages.eval.metrics import aggregate, corpus_scores, get_metric

PromptBuilder = Callable[[Any, dict[str, Any]], str]


def eval_items(dataset: Any, split: str = "eval", limit: int | None = None) -> list[dict[str, Any]]:
    """Items of a loaded dataset split (first ``limit`` of them, order kept so runs are comparable)."""
    from llmops_jupyter.core.errors import DataError

    rows = dataset.split(split)
    if limit:
        rows = rows[:limit]
    if not rows:
        raise DataError(f"The '{split}' split of dataset {dataset.version} is empty.",
                        fix="rebuild the dataset with an eval fraction > 0, or use --split train")
    items = []
    for r in rows:
        if r.get("messages") is None and r.get("text") is not None:  # a text dataset: the chunk is the reference
            items.append({"id": r["id"], "messages": None, "reference": r["text"], "user": "", "text": r["text"]})
            continue
        msgs = r["messages"]
        users = [m["content"] for m in msgs[:-1] if m["role"] == "user"]
        items.append({"id": r["id"], "messages": msgs, "reference": msgs[-1]["content"],
                      "user": users[-1] if users else ""})
    return items


def chat_prompt(tokenizer: Any, item: dict[str, Any]) -> str:
    """Default prompt builder: the version's chat template over the context messages + generation prompt."""
    from llmops_jupyter.models.inference import apply_chat

    if item.get("messages") is None:  # a text chunk: no prompt, the whole text is scored
        return ""
    return apply_chat(tokenizer, item["messages"][:-1])


def reference_completion(tokenizer: Any, item: dict[str, Any], prompt: str) -> str:
    """The reference as the model would have to produce it after ``prompt`` (incl. end-of-turn text)."""
    from llmops_jupyter.stages.data.format import render

    if item.get("messages") is None:
        return item["text"]
    rendered = render(item["messages"], tokenizer)
    if prompt == rendered["prompt"]:
        return rendered["completion"]
    eos = getattr(tokenizer, "eos_token", None) or ""
    return item["reference"] + eos


@dataclasses.dataclass
class VersionResult:
    """One model version's results on the eval items."""

    ref: str  # the reference as given (unique within a run)
    label: str
    model_hash: str | None
    kind: str
    rows: list[dict[str, Any]]  # per example: id, prompt, reference, output, metrics, generation
    summary: dict[str, float] = dataclasses.field(default_factory=dict)
    gen_seconds: float = 0.0

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.rows]


def needs_generation(metrics: Sequence[str]) -> bool:
    return any(get_metric(m).kind in ("text", "generation", "judge") for m in metrics)


def evaluate_model(model: Any, items: list[dict[str, Any]], metrics: Sequence[str], *, ref: str | None = None,
                   label: str | None = None, max_new_tokens: int = 64, batch_size: int = 8, do_sample: bool = False,
                   temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                   prompt_builder: PromptBuilder = chat_prompt, device: str | None = None,
                   progress: Callable[[str], None] | None = None, registry: Any = None) -> VersionResult:
    """Generate and score one version. ``model`` is a ModelRef, a reference string, or a loaded ``(net, tok)``."""
    from llmops_jupyter.models.inference import generate, load_model, loglikelihood

    say = progress or (lambda _msg: None)
    if isinstance(model, tuple):
        net, tok = model
        model_hash, kind = None, "loaded"
    else:
        say("loading model")
        net, tok = load_model(model, device=device, registry=registry)
        art = getattr(model, "artifact", None)
        model_hash, kind = (art.hash if art else None), getattr(model, "kind", "base-model")
    ref = ref or str(getattr(model, "ref", "model"))
    prompts = [prompt_builder(tok, it) for it in items]
    rows: list[dict[str, Any]] = [{"id": it["id"], "prompt": p, "reference": it["reference"], "output": "",
                                   "metrics": {}, "generation": {}} for it, p in zip(items, prompts)]
    gen_seconds = 0.0
    if needs_generation(metrics):
        say("generating")
        t0 = time.perf_counter()
        gens = generate(net, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed)
        gen_seconds = time.perf_counter() - t0
        for row, g in zip(rows, gens):
            row["output"] = g.text.strip()
            row["generation"] = {"prompt_tokens": g.prompt_tokens, "new_tokens": g.new_tokens,
                                 "latency_s": g.latency_s, "finish_reason": g.finish_reason}
            if "latency" in metrics:
                row["metrics"]["latency_s"] = g.latency_s
                row["metrics"]["tokens_per_s"] = g.new_tokens / g.latency_s if g.latency_s > 0 else math.nan
    if any(get_metric(m).kind == "model" for m in metrics):
        say("scoring log-likelihood")
        completions = [reference_completion(tok, it, p) for it, p in zip(items, prompts)]
        for row, (logp, n) in zip(rows, loglikelihood(net, tok, prompts, completions, batch_size=batch_size)):
            row["metrics"].update(nll=-logp, n_tokens=float(n), loss=-logp / max(n, 1),
                                  ppl=math.exp(-logp / max(n, 1)))
    if not isinstance(model, tuple):
        del net
        gc.collect()
    score_text(rows, metrics, items)
    result = VersionResult(ref=ref, label=label or ref, model_hash=model_hash, kind=kind, rows=rows,
                           gen_seconds=gen_seconds)
    result.summary = summarize(result, metrics)
    return result


def score_text(rows: list[dict[str, Any]], metrics: Sequence[str], items: Sequence[dict[str, Any]]) -> None:
    """Add every text metric (built-in or registered) to the rows' ``metrics``."""
    outputs = [r["output"] for r in rows]
    refs = [r["reference"] for r in rows]
    for name in metrics:
        m = get_metric(name)
        if m.kind != "text":
            continue
        for row, v in zip(rows, m.compute(outputs, refs, items)):
            row["metrics"][m.name] = v


def summarize(result: VersionResult, metrics: Sequence[str]) -> dict[str, float]:
    """Summary per metric key; adds corpus BLEU/chrF and generation throughput (tokens/s of the whole run)."""
    keys: list[str] = []
    for name in metrics:
        for k in get_metric(name).keys:
            if k not in keys:
                keys.append(k)
    out = {k: aggregate(k, [r["metrics"] for r in result.rows]) for k in keys}
    names = {get_metric(n).name for n in metrics}
    if names & {"bleu", "chrf"}:
        corpus = corpus_scores([r["output"] for r in result.rows], [r["reference"] for r in result.rows])
        out.update({k: v for k, v in corpus.items() if k.split("_")[0] in names})
    if "latency" in names and result.gen_seconds > 0:
        out["tokens_per_s"] = sum(r["generation"].get("new_tokens") or 0 for r in result.rows) / result.gen_seconds
    out["n_examples"] = float(len(result.rows))
    return out


def judge_versions(judge: Any, versions: Sequence[VersionResult], items: Sequence[dict[str, Any]],
                   rubric: str | None = None) -> None:
    """Grade every version's outputs; the score goes to ``metrics['judge']``, prompt and verdict to the row."""
    by_id = {it["id"]: it for it in items}
    for v in versions:
        triples = [(by_id[r["id"]]["user"] or r["prompt"], r["reference"], r["output"]) for r in v.rows]
        verdicts = judge.grade(triples, rubric)
        calls = getattr(judge, "calls", None) or [None] * len(verdicts)  # an endpoint judge's usage and cost
        for row, verdict, call in zip(v.rows, verdicts, calls):
            row["metrics"]["judge"] = verdict.score
            row["judge_prompt"] = verdict.prompt
            row["judge_raw"] = verdict.raw
            if call is not None:
                row.setdefault("generation", {})["judge_call"] = call.to_dict()
        v.summary["judge"] = aggregate("judge", [r["metrics"] for r in v.rows])


def transcript(messages: Sequence[dict[str, Any]]) -> str:
    """How an endpoint's prompt is stored and shown (it has no local chat template): one ``role: text`` per turn."""
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in messages)


def evaluate_endpoint(client: Any, items: list[dict[str, Any]], metrics: Sequence[str], *, ref: str, label: str,
                      messages_builder: Callable[[dict[str, Any]], list[dict[str, Any]]], max_new_tokens: int = 64,
                      do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                      progress: Callable[[str], None] | None = None) -> VersionResult:
    """Ask an OpenAI-compatible endpoint (:class:`~llmops_jupyter.models.endpoints.EndpointClient`) and score its
    answers like a local version's. A failed request (error, timeout, budget) is a failed example: empty output,
    the error in ``generation``, scored as such; log-likelihood metrics (ppl, loss) are not available remotely."""
    say = progress or (lambda _msg: None)
    convs = [messages_builder(it) for it in items]
    params: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": temperature if do_sample else 0.0,
                              "seed": seed}
    if do_sample:
        params["top_p"] = top_p
    t0 = time.perf_counter()
    calls = client.chat_many(convs, params, progress=lambda d, n: say(f"{d}/{n} requests"))
    wall = time.perf_counter() - t0
    rows: list[dict[str, Any]] = []
    for it, msgs, call in zip(items, convs, calls):
        row = {"id": it["id"], "prompt": transcript(msgs), "reference": it["reference"], "output": call.text.strip(),
               "metrics": {}, "generation": call.to_dict()}
        if "latency" in metrics and call.ok and call.latency_s:
            row["metrics"]["latency_s"] = call.latency_s
            if call.completion_tokens is not None:
                row["metrics"]["tokens_per_s"] = call.completion_tokens / call.latency_s
        rows.append(row)
    score_text(rows, metrics, items)
    art = getattr(client.endpoint, "artifact", None)
    result = VersionResult(ref=ref, label=label, model_hash=art.hash if art is not None else None, kind="endpoint",
                           rows=rows, gen_seconds=wall)
    result.summary = summarize(result, [m for m in metrics if get_metric(m).kind != "model"])
    if "latency" in {get_metric(m).name for m in metrics}:
        done = [r["generation"].get("completion_tokens") or 0 for r in rows if not r["generation"].get("cached")]
        result.summary["tokens_per_s"] = sum(done) / wall if wall > 0 and any(done) else math.nan
    return result

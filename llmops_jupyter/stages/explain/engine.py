"""The measurements behind ``%llmops explain``: token scores, contrast, logit lens, input attribution.

Everything works on one token sequence ``prompt ids + answer ids`` (the answer is ``--target`` encoded without
special tokens, or the model's own greedy answer), in float32, with no sampling, so the numbers are exact functions of
the weights:

* :func:`score` — per answer token: log-probability, entropy of the next-token distribution, the top-k alternatives.
  Their sum is the answer's log-likelihood (= −loss × answer tokens of the same forward pass).
* contrast — :func:`score` of a second model on the same ids, token by token (same tokenizer required).
* :func:`logit_lens` — the model's own final norm and ``lm_head`` applied to the residual stream after every decoder
  layer (nostalgebraist's logit lens; no library needed). After the last layer it *is* the model's logits.
* :func:`attribute` — captum's ``LLMGradientAttribution`` over ``LayerIntegratedGradients`` on the input embeddings:
  how much each prompt token moved each answer token's log-probability, from a baseline where the prompt tokens are
  replaced by one neutral token. Integrated gradients are complete (attributions sum to f(x) − f(baseline)); the
  measured gap is the convergence delta shown next to the picture. :func:`deletion_check` removes the top-k
  attributed prompt tokens and k random ones and compares the drop in the answer's log-probability.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

from llmops_jupyter.core.errors import ConfigError, require


@dataclasses.dataclass
class Sequence:
    """The ids explained: ``prompt`` then ``answer`` (answer positions are ``len(prompt) ... len(ids) - 1``)."""

    prompt: list[int]
    answer: list[int]

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.answer


def encode(tokenizer: Any, prompt_text: str, answer: str) -> Sequence:
    """Token ids of the (already templated) prompt and of the answer; the same split captum uses."""
    return Sequence(list(tokenizer.encode(prompt_text)), list(tokenizer.encode(answer, add_special_tokens=False)))


def context_length(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        n = getattr(cfg, key, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def check_length(seq: Sequence, limit: int | None, ref: str) -> None:
    if limit is not None and len(seq.ids) > limit:
        raise ConfigError(f"explain: prompt + answer are {len(seq.ids)} tokens ({len(seq.prompt)} + "
                          f"{len(seq.answer)}), longer than the context of '{ref}' ({limit} tokens).",
                          field="prompt", value=len(seq.ids),
                          fix="shorten --prompt or --target (or --max-new-tokens)")
    if not seq.prompt or not seq.answer:
        what = "prompt" if not seq.prompt else "target"
        raise ConfigError(f"explain: the {what} encodes to no tokens.", field=what,
                          fix=f"pass a non-empty --{what}")


def _logits(model: Any, ids: list[int]) -> Any:
    torch = require("torch", "finetune")
    with torch.no_grad():
        x = torch.tensor([ids], device=model.device)
        return model(input_ids=x, use_cache=False).logits[0].float()


def score(model: Any, tokenizer: Any, seq: Sequence, top_k: int = 5) -> dict[str, Any]:
    """Per answer token: ``token``, ``logprob``, ``entropy`` (nats), ``top`` = [(token, logprob)] of the k likeliest."""
    torch = require("torch", "finetune")
    logits = _logits(model, seq.ids)
    p0 = len(seq.prompt)
    steps = logits[p0 - 1: len(seq.ids) - 1]  # logits at position t predict token t + 1
    logp = torch.log_softmax(steps, dim=-1)
    target = torch.tensor(seq.answer, device=logp.device)
    token_lp = logp.gather(1, target[:, None])[:, 0]
    entropy = -(logp.exp() * logp).sum(-1)
    k = min(top_k, logp.shape[-1])
    top_lp, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    tokens = [tokenizer.decode([t]) for t in seq.answer]
    rows = []
    for i, t in enumerate(seq.answer):
        rank = int((logp[i] > token_lp[i]).sum()) + 1
        rows.append({"token": tokens[i], "id": int(t), "logprob": float(token_lp[i]), "entropy": float(entropy[i]),
                     "rank": rank,
                     "top": [(tokenizer.decode([int(j)]), float(v)) for j, v in zip(top_ids[i], top_lp[i])]})
    return {"tokens": rows, "logprob_sum": float(token_lp.sum()), "n_tokens": len(seq.answer)}


def same_tokenizer(tok_a: Any, tok_b: Any, seq: Sequence, prompt_text: str, answer: str) -> bool:
    """Contrast compares token by token, so both models must split the text into the same ids."""
    other = encode(tok_b, prompt_text, answer)
    return other.prompt == seq.prompt and other.answer == seq.answer and len(tok_a) == len(tok_b)


def contrast(a: dict[str, Any], b: dict[str, Any]) -> list[float]:
    """Per-token logprob difference B − A (positive: B finds the token likelier)."""
    return [tb["logprob"] - ta["logprob"] for ta, tb in zip(a["tokens"], b["tokens"], strict=True)]


# -- logit lens --------------------------------------------------------------------------------------------------------
def lens_parts(model: Any) -> tuple[Any, Any, Any]:
    """(decoder layers, final norm, lm_head) of a llama-style causal LM (Llama, Mistral, Qwen2/3, SmolLM, Gemma...),
    found by structure rather than by class name; anything else is refused in one line."""
    if callable(getattr(model, "get_base_model", None)):  # a peft model: the lens reads the causal LM under it
        model = model.get_base_model()
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    norm = getattr(inner, "norm", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if layers is None or norm is None or head is None or not len(layers):
        arch = type(model).__name__
        raise ConfigError(f"explain: the logit lens needs a llama-style decoder (model.layers, model.norm, lm_head); "
                          f"{arch} has no such parts.", field="lens", value=arch, fix="pass --no-lens")
    return layers, norm, head


def logit_lens(model: Any, tokenizer: Any, seq: Sequence) -> dict[str, Any]:
    """Per layer (embeddings = layer 0, then after each decoder layer) and answer position: the logprob of the
    answer token and the lens's top-1 token. ``logits`` holds the last layer's lens logits (the tests compare them
    with the model's own)."""
    torch = require("torch", "finetune")
    layers, norm, head = lens_parts(model)
    captured: list[Any] = []

    def keep(_module: Any, _args: Any, output: Any) -> None:
        captured.append((output[0] if isinstance(output, tuple) else output).detach())

    embed = model.get_input_embeddings()
    hooks = [embed.register_forward_hook(keep)] + [layer.register_forward_hook(keep) for layer in layers]
    try:
        final = _logits(model, seq.ids)
    finally:
        for h in hooks:
            h.remove()
    p0, n = len(seq.prompt), len(seq.ids)
    target = torch.tensor(seq.answer, device=final.device)
    lp_rows, top_rows, last = [], [], None
    with torch.no_grad():
        for h in captured:
            lens_logits = head(norm(h[0])).float()
            last = lens_logits
            lp = torch.log_softmax(lens_logits[p0 - 1: n - 1], dim=-1)
            lp_rows.append([float(x) for x in lp.gather(1, target[:, None])[:, 0]])
            top_rows.append([tokenizer.decode([int(j)]) for j in lp.argmax(-1)])
    return {"layers": ["emb" if i == 0 else f"L{i}" for i in range(len(captured))], "logprob": lp_rows,
            "top": top_rows, "logits": last, "model_logits": final}


# -- attribution -------------------------------------------------------------------------------------------------------
def baseline_token(tokenizer: Any) -> int:
    """The neutral token IG integrates from: pad, else unk, else eos."""
    for name in ("pad_token_id", "unk_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            return v
    return 0


def answer_logprob(model: Any, prompt: list[int], answer: list[int]) -> float:
    torch = require("torch", "finetune")
    logits = _logits(model, prompt + answer)
    lp = torch.log_softmax(logits[len(prompt) - 1: len(prompt) + len(answer) - 1], dim=-1)
    return float(lp.gather(1, torch.tensor(answer, device=lp.device)[:, None]).sum())


def attribute(model: Any, tokenizer: Any, prompt_text: str, seq: Sequence, *, steps: int = 32) -> dict[str, Any]:
    """Integrated gradients of every answer token's logprob w.r.t. the prompt's input embeddings (captum).

    Special tokens (chat-template markers) stay as they are and get no attribution. The convergence delta is
    Σ attributions − (f(x) − f(baseline)) with f the answer's log-probability; IG's completeness says it is 0.
    """
    torch = require("torch", "finetune")
    require("captum", "explain", feature="explain --attribute")
    from captum.attr import LayerIntegratedGradients, LLMGradientAttribution, TextTokenInput

    base_id = baseline_token(tokenizer)
    special = sorted(set(getattr(tokenizer, "all_special_ids", []) or []))
    inp = TextTokenInput(prompt_text, tokenizer, baselines=base_id, skip_tokens=special or None)
    if inp.inp_tensor[0].tolist() != seq.prompt:
        raise ConfigError("explain: captum tokenizes the prompt differently from the model's tokenizer.",
                          field="prompt", fix="report this with the tokenizer's name")
    ig = LayerIntegratedGradients(model, model.get_input_embeddings())
    llm_attr = LLMGradientAttribution(ig, tokenizer)
    with torch.enable_grad():
        res = llm_attr.attribute(inp, target=torch.tensor(seq.answer), n_steps=steps)
    mask = [t not in set(special) for t in seq.prompt]
    positions = [i for i, m in enumerate(mask) if m]
    baseline_prompt = [base_id if m else t for t, m in zip(seq.prompt, mask)]
    f_x = answer_logprob(model, seq.prompt, seq.answer)
    f_b = answer_logprob(model, baseline_prompt, seq.answer)
    total = float(res.seq_attr.sum())
    delta = total - (f_x - f_b)
    token_attr = res.token_attr.detach().float().cpu().tolist() if res.token_attr is not None else []
    return {"input_tokens": [tokenizer.decode([seq.prompt[i]]) for i in positions], "positions": positions,
            "output_tokens": [tokenizer.decode([t]) for t in seq.answer],
            "seq_attr": [float(x) for x in res.seq_attr.detach().float().cpu()], "token_attr": token_attr,
            "f_x": f_x, "f_baseline": f_b, "sum_attr": total, "delta": delta,
            "relative_delta": abs(delta) / max(abs(f_x - f_b), 1e-12), "steps": steps, "baseline_token": base_id}


def deletion_check(model: Any, seq: Sequence, attr: dict[str, Any], *, k: int = 3, draws: int = 20,
                   seed: int = 0) -> dict[str, Any]:
    """Remove the k prompt tokens with the largest attribution, and k random attributable ones (``draws`` times),
    and compare how much the answer's log-probability drops. A faithful attribution drops it more.

    "Removed" means replaced by the baseline token IG integrates from (the deletion metric of Petsiuk et al.), not cut
    out: cutting shifts every later position, which changes the answer for reasons the attribution does not cover."""
    order = sorted(range(len(attr["positions"])), key=lambda j: -attr["seq_attr"][j])
    k = min(k, len(order))
    top = [attr["positions"][j] for j in order[:k]]
    full = answer_logprob(model, seq.prompt, seq.answer)
    base = attr["baseline_token"]

    def without(drop: list[int]) -> float:
        return answer_logprob(model, [base if i in set(drop) else t for i, t in enumerate(seq.prompt)], seq.answer)

    rng = random.Random(seed)
    random_drops = [full - without(rng.sample(attr["positions"], k)) for _ in range(draws)]
    top_drop = full - without(top)
    mean_random = sum(random_drops) / len(random_drops) if random_drops else math.nan
    return {"k": k, "top_positions": top, "top_drop": top_drop, "random_drop": mean_random,
            "passed": bool(top_drop > mean_random)}

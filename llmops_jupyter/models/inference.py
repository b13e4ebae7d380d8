"""Load any registered model version and run batched generation / log-likelihood scoring.

Shared by eval, merge verification, quantize reports, serving and monitoring, so every version (base,
base+adapter, merged, quantized) is loaded and prompted the same way. Requires the ``[finetune]`` extra.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmops_jupyter.core.errors import require
from llmops_jupyter.models.refs import ModelRef


@dataclasses.dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    latency_s: float  # wall time of the batch this prompt was in
    finish_reason: str  # "stop" (EOS) or "length"


def pick_device(device: str | None = None) -> str:
    torch = require("torch", "finetune")
    if device and device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(name: str | None, device: str):
    torch = require("torch", "finetune")
    if name in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[name]


def load_tokenizer(path: str | Path, *, padding_side: str = "left"):
    transformers = require("transformers", "finetune")
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


@contextlib.contextmanager
def without_gptqmodel(base: Any) -> Iterator[None]:
    """peft probes for GPTQModel on every LoRA layer it injects (``dispatch_gptq``), and the probe *imports* it: its
    banner, env messages and seconds of start-up in an eval or fine-tune cell of a model without a single GPTQ
    layer. Unless ``base`` is GPTQ/AWQ-quantized (or GPTQModel is loaded already), peft sees it as absent here;
    GPTQModel is imported only by the quantize stage and by loading a quantized checkpoint."""
    qc = getattr(getattr(base, "config", None), "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if "gptqmodel" in sys.modules or str(getattr(method, "value", method) or "").lower() in ("gptq", "awq"):
        yield
        return
    import peft.import_utils as peft_imports

    sys.modules["gptqmodel"] = None  # type: ignore[assignment]  # find_spec → None, import → ImportError
    peft_imports.is_gptqmodel_available.cache_clear()
    try:
        yield
    finally:
        if "gptqmodel" in sys.modules and sys.modules["gptqmodel"] is None:
            del sys.modules["gptqmodel"]
        peft_imports.is_gptqmodel_available.cache_clear()


def load_model(model: ModelRef | str | Path, *, dtype: str | None = "auto", device: str | None = None,
               registry: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) ready for inference; adapters are applied on their base with peft (not merged)."""
    transformers = require("transformers", "finetune")
    if not isinstance(model, ModelRef):
        from llmops_jupyter.models.refs import resolve_model
        from llmops_jupyter.registry import Registry

        model = resolve_model(model, registry or Registry.open())
    device = pick_device(device)
    torch_dtype = _dtype(dtype, device)
    if model.kind == "adapter":
        peft = require("peft", "finetune")
        if model.base is None:
            from llmops_jupyter.core.errors import StageError

            raise StageError(f"Adapter '{model.ref}' does not say which base model it applies to.",
                             fix="re-train it with %llmops finetune, or pass the base with --model")
        base = transformers.AutoModelForCausalLM.from_pretrained(str(model.base.path), dtype=torch_dtype)
        with without_gptqmodel(base):
            net = peft.PeftModel.from_pretrained(base, str(model.path))
        tok_path = model.path if (model.path / "tokenizer_config.json").exists() else model.base.path
    else:
        kwargs: dict[str, Any] = {"dtype": torch_dtype}
        cfg = Path(model.path) / "config.json"
        if cfg.exists() and "quantization_config" in cfg.read_text():
            kwargs = {"device_map": device}
        net = transformers.AutoModelForCausalLM.from_pretrained(str(model.path), **kwargs)
        tok_path = model.path
    if getattr(net, "hf_device_map", None) is None:
        net.to(device)
    net.eval()
    return net, load_tokenizer(tok_path)


def apply_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """Chat template with the generation prompt; the same call for every model version."""
    from llmops_jupyter.stages.data.format import render

    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return render([*messages, {"role": "assistant", "content": ""}], None)["prompt"]


def generate(model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int = 64, batch_size: int = 8,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             stop_at_eos: bool = True) -> list[Generation]:
    """Batched generation: prompts sorted by token length (little padding), left-padded, KV cache on, input
    order kept. Greedy outputs equal one-prompt-at-a-time outputs in fp32; in bf16/fp16 a different batch shape
    can flip near-tied tokens (see bench/bench_generation.py)."""
    torch = require("torch", "finetune")
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]] if prompts else []
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])  # by token length: least padding per batch
    results: list[Generation | None] = [None] * len(prompts)
    eos = tokenizer.eos_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        batch = {k: v.to(device) for k, v in batch.items()}
        if do_sample:
            torch.manual_seed(seed + start)
        gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "use_cache": True,
                                      "pad_token_id": tokenizer.pad_token_id,
                                      "eos_token_id": eos if stop_at_eos else None}
        if do_sample:
            gen_kwargs.update(temperature=temperature, top_p=top_p)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**batch, **gen_kwargs)
        latency = time.perf_counter() - t0
        width = batch["input_ids"].shape[1]
        for row, i in enumerate(idx):
            new = out[row, width:].tolist()
            finish = "length"
            if eos is not None and eos in new:
                new = new[: new.index(eos)]
                finish = "stop"
            while new and new[-1] == tokenizer.pad_token_id:
                new.pop()
            results[i] = Generation(
                text=tokenizer.decode(new, skip_special_tokens=True), prompt_tokens=int(batch["attention_mask"][row].sum()),
                new_tokens=len(new), latency_s=latency, finish_reason=finish,
            )
    return [r for r in results if r is not None]


def loglikelihood(model: Any, tokenizer: Any, prompts: list[str], completions: list[str], *,
                  batch_size: int = 8, max_length: int | None = None) -> list[tuple[float, int]]:
    """Sum of log-probabilities of each completion given its prompt, and the number of tokens scored.

    An empty prompt scores the whole text: it is tokenized as the model reads a document (with the tokenizer's
    special tokens, e.g. BOS) and every token after the first is scored. ``max_length`` cuts sequences longer than
    that many tokens from the right.
    """
    torch = require("torch", "finetune")
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    for start in range(0, len(prompts), batch_size):
        seqs, masks = [], []
        for p, c in zip(prompts[start:start + batch_size], completions[start:start + batch_size]):
            if p:
                p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
                c_ids = tokenizer(c, add_special_tokens=False)["input_ids"]
            else:  # the whole text; the first token has no context and is never scored (see the shift below)
                p_ids, c_ids = [], tokenizer(c)["input_ids"]
            seq, mask = p_ids + c_ids, [0] * len(p_ids) + [1] * len(c_ids)
            seqs.append(seq[:max_length] if max_length else seq)
            masks.append(mask[:max_length] if max_length else mask)
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        target = torch.zeros((len(seqs), width), dtype=torch.bool)
        for r, (s, m) in enumerate(zip(seqs, masks)):  # right padding: positions stay aligned
            ids[r, : len(s)] = torch.tensor(s)
            attn[r, : len(s)] = 1
            target[r, : len(m)] = torch.tensor(m, dtype=torch.bool)
        ids, attn, target = ids.to(device), attn.to(device), target.to(device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=attn).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        tmask = target[:, 1:]
        for r in range(len(seqs)):
            out.append((float((logp[r] * tmask[r]).sum()), int(tmask[r].sum())))
    return out


def perplexity(model: Any, tokenizer: Any, prompts: list[str] | None, completions: list[str], *, batch_size: int = 8,
               max_length: int | None = None) -> float:
    """Token-weighted perplexity, exp(−Σ log p / tokens scored), so batching never changes it.

    With prompts: of the completions given their prompts (completion-only, as the model was trained; what ``eval``
    reports). With ``prompts=None``: of the whole texts in ``completions`` (what ``quantize`` compares before and
    after quantization, on text the model may never have been prompted with).
    """
    if not completions:
        return float("nan")
    scores = loglikelihood(model, tokenizer, prompts or [""] * len(completions), completions, batch_size=batch_size,
                           max_length=max_length)
    total = sum(s for s, _ in scores)
    n = sum(k for _, k in scores)
    return math.exp(-total / n) if n else float("nan")

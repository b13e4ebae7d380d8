"""Helpers shared by the merge and quantize stages: dtypes, probe prompts, generation speed.

Kept out of the stage modules so their top level stays import-light (``%llmops?`` imports every stage module);
torch/transformers are imported inside the functions. The leading underscore keeps stage discovery from
treating this module as a stage.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmops_jupyter.core.errors import ConfigError, LlmopsError

if TYPE_CHECKING:
    from llmops_jupyter.registry import Artifact, Registry
    from llmops_jupyter.stages.data.format import Dataset

DTYPES = ("auto", "float32", "float16", "bfloat16")

#: Used when no dataset is known: short, varied prompts so every probe exercises several positions.
FIXED_PROBES = (
    "The quick brown fox jumps over the lazy dog.",
    "Question: What is the capital of France? Answer:",
    "def add(a, b):\n    return a + b",
    "Summarize: The meeting was moved to Tuesday because the room was booked.",
    "Translate to French: cat ->",
    "What is 3 plus 4?",
    "Monitoring watches latency, errors and drift.",
    "Repeat the colour blue.",
)


def checkpoint_config(path: str | Path) -> dict[str, Any]:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return {}
    try:
        return json.loads(cfg.read_text())
    except ValueError:
        return {}


def checkpoint_quantization(path: str | Path) -> str | None:
    """A readable name of the quantization a checkpoint is stored with (``None`` for full/half precision)."""
    q = checkpoint_config(path).get("quantization_config")
    if not q:
        return None
    method = str(q.get("quant_method", "unknown"))
    if method == "bitsandbytes":
        if q.get("load_in_4bit") or q.get("_load_in_4bit"):
            return f"bitsandbytes 4-bit ({q.get('bnb_4bit_quant_type', 'nf4')})"
        return "bitsandbytes 8-bit"
    bits = q.get("bits")
    return f"{method} {bits}-bit" if bits else method


def checkpoint_dtype(name: str, checkpoint: str | Path):
    """``auto`` = the dtype the checkpoint was saved in (float32 when unknown or not a float type)."""
    import torch

    if name == "auto":
        cfg = checkpoint_config(checkpoint)
        name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
        if name not in DTYPES:
            name = "float32"
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def default_tolerance(dtype: Any) -> float:
    """Max abs logit difference accepted between base+adapter and merged, by precision of the merged weights."""
    import torch

    return {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 2.5e-1}.get(dtype, 1e-3)


def upstream_dataset(registry: Registry, artifact: Artifact | None) -> Artifact | None:
    """The newest dataset in the lineage above ``artifact`` (e.g. the data an adapter was trained on)."""
    if artifact is None:
        return None
    try:
        graph = registry.lineage(artifact, "up")
    except LlmopsError:
        return None
    datasets = [n for n in graph["nodes"] if n["kind"] == "dataset"]
    if not datasets:
        return None
    arts = [registry.get_artifact(n["hash"]) for n in datasets]
    return max(arts, key=lambda a: a.created_at)


def load_data(ref: str | None, registry: Registry, fallback: Artifact | None, field: str = "data") -> Dataset | None:
    """``--data`` if given (errors name the field), else the dataset found upstream of the model, else ``None``."""
    from llmops_jupyter.stages.data.format import load_dataset

    if ref:
        try:
            return load_dataset(ref, registry)
        except LlmopsError as exc:
            raise ConfigError(f"--{field.replace('_', '-')} '{ref}' is not a dataset: {exc.message}", field=field,
                              value=ref, fix="pass a data run id, dataset hash or dataset folder"
                              " (`%llmops runs --stage data`)") from None
    if fallback is not None:
        return load_dataset(fallback.hash, registry)
    return None


def split_texts(dataset: Dataset | None, n: int, *, split: str = "eval", fill: bool = False,
                field: str = "text") -> list[str]:
    """Up to ``n`` texts from a split in file order; ``fill`` tops up from the other split when it is short."""
    if dataset is None or n <= 0:
        return []
    rows = list(dataset.split(split))
    if fill and len(rows) < n:
        rows += dataset.train if split == "eval" else dataset.eval
    return [r[field] for r in rows[:n] if r.get(field)]


def ensure_pad(tokenizer: Any) -> Any:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def batched_logits(model: Any, tokenizer: Any, texts: list[str], *, max_length: int = 128,
                   batch_size: int = 8) -> list[Any]:
    """Float32 logits of each text (right-padded batches; padding positions dropped), on CPU."""
    import torch

    ensure_pad(tokenizer)
    tokenizer.padding_side = "right"
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length)
            enc = {k: v.to(device) for k, v in enc.items()}
            logits = model(**enc).logits.float().cpu()
            for row, mask in zip(logits, enc["attention_mask"].cpu(), strict=True):
                out.append(row[mask.bool()])
    return out


def max_abs_diff(a: list[Any], b: list[Any]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True)) if a else 0.0


def generation_speed(model: Any, tokenizer: Any, prompt: str, new_tokens: int) -> float:
    """Greedy decode of exactly ``new_tokens`` tokens (EOS ignored) → tokens per second, after a 1-token warm-up."""
    import torch

    if new_tokens <= 0:
        return float("nan")
    ensure_pad(tokenizer)
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    kwargs = {"do_sample": False, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": None}
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=1, min_new_tokens=1, **kwargs)
        t0 = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        elapsed = time.perf_counter() - t0
    produced = out.shape[1] - enc["input_ids"].shape[1]
    return produced / elapsed if elapsed > 0 else float("nan")


def save_tokenizer(source_dirs: list[Path], target: Path) -> Any:
    """Save the first tokenizer found among ``source_dirs`` (adapter folder before base) into ``target``."""
    from transformers import AutoTokenizer

    for d in source_dirs:
        if any((d / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            tok = AutoTokenizer.from_pretrained(str(d))
            tok.save_pretrained(str(target))
            return tok
    raise LlmopsError(f"No tokenizer found in {', '.join(str(d) for d in source_dirs)}.",
                      fix="save the tokenizer with the model (tokenizer.save_pretrained(folder))")


def write_model_card(target: Path, data: dict[str, Any]) -> None:
    """``llmops_model.json``: provenance read by `describe`/`models` and by whoever deploys the folder."""
    from llmops_jupyter.core.files import atomic_write_json

    atomic_write_json(target / "llmops_model.json", data)


def licence_of(path: Path) -> str | None:
    meta = path / "llmops_model.json"
    if meta.exists():
        try:
            return json.loads(meta.read_text()).get("licence")
        except ValueError:
            return None
    return None

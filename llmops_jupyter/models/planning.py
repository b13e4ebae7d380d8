"""Memory planning for fine-tuning: weights, adapters, optimizer state, activations, logits, runtime overhead.

Estimates follow the usual accounting (mixed-precision Adam = 16 bytes per trainable parameter; QLoRA base at
4 bits + NF4 block constants; transformer activations per layer ≈ s·b·h·34 bytes in 16-bit with memory-efficient
attention, Korthikanti et al. 2022; with gradient checkpointing only each layer's input is kept plus one layer's
activations). They are planning numbers, typically within ~20% of measured peaks; the verdict keeps a 10% margin.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

GB = 1024**3

#: Architecture facts of popular open models, so `plan` works offline before anything is downloaded.
CATALOG: dict[str, dict[str, Any]] = {
    "SmolLM2-135M": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "SmolLM2-360M": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                         intermediate_size=2560, vocab_size=49152, tie_word_embeddings=True),
    "SmolLM2-1.7B": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                         intermediate_size=8192, vocab_size=49152, tie_word_embeddings=True),
    "Qwen2.5-0.5B": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-1.5B": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-7B": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
    "Llama-3.2-1B": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "Llama-3.2-3B": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "Llama-3.1-8B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
    "Llama-3.1-70B": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                          intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False),
    "Mistral-7B-v0.3": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                            intermediate_size=14336, vocab_size=32768, tie_word_embeddings=False),
    "Phi-3-mini-4k": dict(hidden_size=3072, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                          intermediate_size=8192, vocab_size=32064, tie_word_embeddings=False),
    "Gemma-2-2B": dict(hidden_size=2304, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                       head_dim=256, intermediate_size=9216, vocab_size=256000, tie_word_embeddings=True),
}


@dataclasses.dataclass
class Arch:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, name: str, cfg: dict[str, Any]) -> Arch:
        cfg = cfg.get("text_config", cfg)
        h = int(cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model"))
        heads = int(cfg.get("num_attention_heads") or cfg.get("n_head"))
        return cls(
            name=name, hidden=h, layers=int(cfg.get("num_hidden_layers") or cfg.get("n_layer")), heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=int(cfg.get("head_dim") or h // heads),
            intermediate=int(cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * h),
            vocab=int(cfg.get("vocab_size")), tied=bool(cfg.get("tie_word_embeddings", False)),
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear projection in one decoder layer (Llama-style naming)."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.linear_shapes().values())

    @property
    def other_params(self) -> int:  # embeddings, lm head, norms
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        return emb + self.layers * 2 * self.hidden + self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    def lora_params(self, rank: int, targets: list[str] | None = None) -> int:
        shapes = self.linear_shapes()
        names = targets or list(shapes)
        return self.layers * sum(rank * (shapes[n][0] + shapes[n][1]) for n in names if n in shapes)


def load_arch(model: str, registry: Any = None) -> Arch:
    """Architecture from the offline catalog, a local checkpoint, a registry artifact or a provider."""
    for key, cfg in CATALOG.items():
        if model.lower() in (key.lower(), key.lower().replace("-", ""), key.split("/")[-1].lower()):
            return Arch.from_config(key, cfg)
    from llmops_jupyter.models.refs import resolve_model
    from llmops_jupyter.registry import Registry

    ref = resolve_model(model, registry or Registry.open(), register=False)
    path = ref.base.path if ref.kind == "adapter" and ref.base else ref.path
    cfg_file = Path(path) / "config.json"
    return Arch.from_config(ref.name, json.loads(cfg_file.read_text()))


@dataclasses.dataclass
class Device:
    kind: str  # "gpu" | "cpu"
    name: str
    total_gb: float
    free_gb: float


def detect_device(gpu_memory_gb: float | None = None) -> Device:
    """The first GPU (nvidia-smi, or torch if already imported), else CPU RAM. Never imports torch itself."""
    if gpu_memory_gb:
        return Device("gpu", "assumed GPU", gpu_memory_gb, gpu_memory_gb)
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,memory.used",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                name, total, used = [x.strip() for x in out.stdout.strip().splitlines()[0].split(",")]
                return Device("gpu", name, float(total) / 1024, (float(total) - float(used)) / 1024)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():  # pragma: no cover - GPU only
        free, total = torch.cuda.mem_get_info(0)
        return Device("gpu", torch.cuda.get_device_name(0), total / GB, free / GB)
    total = free = 0.0
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        total = int(info["MemTotal"].split()[0]) / 1024**2
        free = int(info["MemAvailable"].split()[0]) / 1024**2
    except (OSError, KeyError, ValueError):
        total = free = (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / GB
    return Device("cpu", "CPU RAM", total, free)


@dataclasses.dataclass
class Estimate:
    method: str
    seq_len: int
    batch: int
    gradient_checkpointing: bool
    parts: dict[str, float]  # bytes
    trainable: int

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def estimate(arch: Arch, method: str, seq_len: int, batch: int, *, rank: int = 16, gradient_checkpointing: bool = False,
             dtype_bytes: int = 2, optimizer: str = "adamw", device_kind: str = "gpu") -> Estimate:
    p = arch.params
    if method == "qlora":
        # NF4: 4 bits per linear weight + fp8 absmax per 64-block + fp32 per 256 absmax (double quantization)
        weights = arch.linear_params * (0.5 + 1 / 64 + 4 / (64 * 256)) + arch.other_params * dtype_bytes
    else:
        weights = p * dtype_bytes
    trainable = p if method == "full" else arch.lora_params(rank)
    if method == "full":
        state_bytes = {"adamw": 12, "adamw8bit": 6, "sgd": 4}.get(optimizer, 12)  # fp32 master + moments
        grads = p * dtype_bytes
        optim = p * state_bytes
    else:
        grads = trainable * 4
        optim = trainable * {"adamw": 12, "adamw8bit": 6, "sgd": 4}.get(optimizer, 12)
    tokens = seq_len * batch
    per_layer = tokens * arch.hidden * 34 * dtype_bytes / 2  # 34·s·b·h bytes in 16-bit
    if gradient_checkpointing:
        acts = arch.layers * tokens * arch.hidden * dtype_bytes + per_layer
    else:
        acts = arch.layers * per_layer
    logits = tokens * arch.vocab * 4 * 2  # fp32 logits and their gradient
    overhead = 0.75 * GB if device_kind == "gpu" else 0.0
    parts = {"weights": weights, "adapters+grads": trainable * 4 + grads if method != "full" else grads,
             "optimizer": optim, "activations": acts, "logits": logits, "runtime overhead": overhead}
    return Estimate(method, seq_len, batch, gradient_checkpointing, parts, trainable)


def advise(arch: Arch, est: Estimate, device: Device, rank: int) -> list[str]:
    """Concrete changes that make the plan fit, cheapest quality cost first, each with its new estimate."""
    budget = device.total_gb * GB * 0.9
    tips: list[str] = []

    def fits(e: Estimate) -> bool:
        return e.total <= budget

    kw = dict(rank=rank, device_kind=device.kind)
    if not est.gradient_checkpointing:
        e = estimate(arch, est.method, est.seq_len, est.batch, gradient_checkpointing=True, **kw)
        if e.total < est.total:
            tips.append(f"turn on gradient checkpointing (--gradient-checkpointing): {e.total / GB:.1f} GB"
                        + (" — fits" if fits(e) else ""))
    if est.method in ("full", "lora"):
        e = estimate(arch, "qlora", est.seq_len, est.batch, gradient_checkpointing=True, **kw)
        tips.append(f"use QLoRA (--method qlora, 4-bit base) with gradient checkpointing: {e.total / GB:.1f} GB"
                    + (" — fits" if fits(e) else ""))
    b = est.batch
    while b > 1:
        b //= 2
        e = estimate(arch, est.method, est.seq_len, b, gradient_checkpointing=True, **kw)
        if fits(e):
            tips.append(f"batch {b} with gradient accumulation {max(1, est.batch // b)} (same effective batch) "
                        f"and checkpointing: {e.total / GB:.1f} GB — fits")
            break
    s = est.seq_len
    while s > 256:
        s //= 2
        e = estimate(arch, est.method, s, est.batch, gradient_checkpointing=True, **kw)
        if fits(e):
            tips.append(f"shorter sequences (--seq-len {s}) with checkpointing: {e.total / GB:.1f} GB — fits")
            break
    if not any("fits" in t for t in tips):
        tips.append("none of the above fits one device: use a smaller model, or shard with "
                    "--launcher accelerate (FSDP/DeepSpeed) across GPUs")
    return tips

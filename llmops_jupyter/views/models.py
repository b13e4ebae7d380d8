"""``%llmops models`` (what is available locally) and ``%llmops plan`` (will this fine-tune fit?)."""

from __future__ import annotations

import dataclasses
import html
import os
from pathlib import Path
from typing import Any

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.display import Table
from llmops_jupyter.core.stage import CommandEnv, command


@dataclasses.dataclass
class ModelsConfig(StageConfig):
    path: list[str] = option([], "extra folders to scan for checkpoints (besides the model cache, the HF cache and "
                                 "the registry)")
    kind: str | None = option(None, "only this kind", choices=["base-model", "adapter", "merged", "pruned", "distilled", "quantized",
                                                              "provider"])


def _hf_cache_dirs() -> list[Path]:
    root = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" /
                                                                        "huggingface")) / "hub")
    out = []
    for repo in sorted(root.glob("models--*")):
        snaps = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
        if snaps:
            out.append(snaps[-1])
    return out


def _scan(folder: Path) -> list[Path]:
    if (folder / "config.json").exists() or (folder / "adapter_config.json").exists():
        return [folder]
    return sorted(p.parent for p in folder.glob("*/config.json")) + sorted(
        p.parent for p in folder.glob("*/adapter_config.json"))


@command("models", ModelsConfig)
def models(cfg: ModelsConfig, env: CommandEnv) -> Table:
    """List models available offline: providers, the local model cache, the HF cache and registry artifacts."""
    from llmops_jupyter.models.refs import PROVIDERS, describe_checkpoint, model_cache_dir

    rows: list[list[Any]] = []
    seen: set[str] = set()

    def add(name: str, kind: str, source: str, path: Path | None) -> None:
        key = str(path.resolve()) if path else name
        if key in seen:
            return
        seen.add(key)
        info: dict[str, Any] = {}
        if path is not None and path.exists():
            info = describe_checkpoint(path)
        params = info.get("params")
        rows.append([name, kind, source, f"{params / 1e6:.1f}M" if params else "", info.get("dtype") or "",
                     info.get("quantization") or "", f"{info['bytes'] / 1e6:.1f} MB" if info.get("bytes") else "",
                     str(path) if path else "(built on first use)"])

    for art in env.registry.list_artifacts():
        if art.kind in ("base-model", "adapter", "merged", "pruned", "distilled", "quantized"):
            add(art.name or art.short, art.kind, f"registry {art.short}", art.path)
    cache = model_cache_dir()
    for p in _scan(cache):
        add(p.name, "base-model", "model cache", p)
    for name in sorted(PROVIDERS):
        if not (cache / name).exists():
            add(name, "provider", "provider (offline)", None)
    for p in _hf_cache_dirs():
        add(p.parent.parent.name.replace("models--", "").replace("--", "/"), "base-model", "HF cache", p)
    for folder in cfg.path:
        for p in _scan(Path(folder).expanduser()):
            add(p.name, "adapter" if (p / "adapter_config.json").exists() else "base-model", "path", p)
    if cfg.kind:
        rows = [r for r in rows if r[1] == cfg.kind]
    return Table(["name", "kind", "source", "params", "dtype", "quant", "size", "path"], rows,
                 title="Models available offline",
                 note="Use any name, path or registry hash with --model. `%llmops plan --model NAME` checks memory.")


@dataclasses.dataclass
class PlanConfig(StageConfig):
    model: str = option(help="model: a catalog name (e.g. Llama-3.1-8B), local checkpoint, registry ref or provider")
    method: str = option("lora", "fine-tuning method", choices=["lora", "qlora", "full"])
    seq_len: int = option(1024, "tokens per sequence", min=1, max=1_048_576)
    batch: int = option(4, "sequences per device step (micro-batch)", min=1, max=4096)
    rank: int = option(16, "LoRA rank", min=1, max=4096)
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass")
    dtype: str = option("bf16", "compute dtype of the (non-quantized) weights", choices=["bf16", "fp16", "fp32"])
    optimizer: str = option("adamw", "optimizer state size", choices=["adamw", "adamw8bit", "sgd"])
    gpu_memory: float | None = option(None, "plan for a GPU with this many GB instead of the detected device",
                                      min=0.1, min_exclusive=False)


def _human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


class Plan:
    def __init__(self, arch, est, device, tips):
        self.arch, self.est, self.device, self.tips = arch, est, device, tips

    @property
    def fits(self) -> bool:
        from llmops_jupyter.models.planning import GB

        return self.est.total <= self.device.total_gb * GB * 0.9

    def rows(self) -> list[tuple[str, str]]:
        from llmops_jupyter.models.planning import GB

        rows = [(k, f"{v / GB:.2f} GB") for k, v in self.est.parts.items()]
        rows.append(("total", f"{self.est.total / GB:.2f} GB"))
        return rows

    def verdict(self) -> str:
        from llmops_jupyter.models.planning import GB

        d = self.device
        word = "FITS" if self.fits else "DOES NOT FIT"
        return (f"{word}: {self.est.total / GB:.1f} GB needed vs {d.total_gb:.1f} GB on {d.name} ({d.kind}); "
                f"{self.arch.name}: {_human(self.arch.params)} params, {self.est.method}, trainable "
                f"{_human(self.est.trainable)}, seq {self.est.seq_len} × batch {self.est.batch}"
                + (", gradient checkpointing" if self.est.gradient_checkpointing else ""))

    def __str__(self) -> str:
        lines = [self.verdict(), ""] + [f"  {k:<18} {v:>10}" for k, v in self.rows()]
        if self.tips:
            lines += ["", "To fit or to go faster:"] + [f"  - {t}" for t in self.tips]
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        color = "green" if self.fits else "#c00"
        body = "".join(f"<tr><td>{html.escape(k)}</td><td style='text-align:right'>{v}</td></tr>"
                       for k, v in self.rows())
        tips = "".join(f"<li>{html.escape(t)}</li>" for t in self.tips)
        return (f"<div class='llmops-plan'><b style='color:{color}'>{html.escape(self.verdict())}</b>"
                f"<table>{body}</table>" + (f"<ul>{tips}</ul>" if tips else "") + "</div>")


@command("plan", PlanConfig)
def plan(cfg: PlanConfig, env: CommandEnv) -> Plan:
    """Estimate fine-tuning memory (weights, adapters, optimizer, activations) against the detected GPU or CPU RAM,
    say whether it fits and what to change."""
    from llmops_jupyter.models.planning import advise, detect_device, estimate, load_arch

    arch = load_arch(cfg.model, env.registry)
    device = detect_device(cfg.gpu_memory)
    dtype_bytes = 4 if cfg.dtype == "fp32" else 2
    est = estimate(arch, cfg.method, cfg.seq_len, cfg.batch, rank=cfg.rank,
                   gradient_checkpointing=cfg.gradient_checkpointing, dtype_bytes=dtype_bytes,
                   optimizer=cfg.optimizer, device_kind=device.kind)
    result = Plan(arch, est, device, [])
    if not result.fits:
        result.tips = advise(arch, est, device, cfg.rank)
    return result

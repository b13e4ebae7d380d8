"""Attention kernels and fused training kernels for ``%llmops finetune`` (imported lazily: torch lives here).

* **Attention kernels that take sequence boundaries directly.** Packed rows (``position_ids`` restarting at 0 per
  example, no attention mask, no cache) go through transformers' own packed-sequence path. With SDPA or eager that
  path builds a dense block-diagonal mask, so attention costs the square of the row length; a varlen kernel reads
  the boundaries instead and costs what the examples cost alone. :func:`candidate_kernels` lists the ones usable
  here, fastest first: flash-attn (when installed), PyTorch's own varlen attention (``torch.nn.attention.varlen``,
  registered below as ``torch_varlen`` through transformers' attention interface), ``flex_attention``, then the
  model's dense kernel. The packing check in :mod:`.sft` runs each through the contamination probe.
* **Liger kernels** (``--kernels liger``, CUDA only): fused linear cross-entropy, RMSNorm and SwiGLU, patched onto
  the model and checked against the plain model's loss on the same batch before training.
* **FLOPs for MFU**: LoRA trains a frozen base, so a token costs 2N (forward) + 2N (gradient w.r.t. activations)
  = 4N FLOPs; full fine-tuning adds the weight gradients (6N). Attention's own FLOPs are not counted (the usual
  convention, so MFU figures compare across tools).
"""

from __future__ import annotations

import collections
import importlib.util
from collections.abc import Callable
from typing import Any

from llmops_jupyter.core.errors import MissingDependencyError, StageError, VerificationError

#: Name under which :func:`register_varlen` registers PyTorch's varlen attention with transformers.
TORCH_VARLEN = "torch_varlen"
#: Kernels that read example boundaries from ``position_ids`` (cost ∝ tokens, no dense mask): one packed row per
#: micro-batch is their cheapest layout.
VARLEN_KERNELS = frozenset({"flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention",
                            TORCH_VARLEN})
KERNEL_CHOICES = ("none", "liger")
#: How often each path of :func:`varlen_attention` ran in this process (``fused``: PyTorch's varlen kernel,
#: ``reference``: the per-sequence SDPA loop), counted by the attention function itself: the run summary records
#: what ran (``varlen_calls``), so a chosen kernel that silently fell back would show.
VARLEN_CALLS: collections.Counter[str] = collections.Counter()

#: Dense bf16/fp16 tensor-core peak (TFLOP/s, no sparsity) by GPU name fragment, for MFU. Most specific first.
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0), ("B200", 2250.0),
               ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 125.0),
               ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0), ("T4", 65.0))


def cu_seqlens(position_ids: Any) -> tuple[Any, int]:
    """Cumulative sequence starts (int32, as varlen kernels want) and the longest sequence, from position ids that
    restart at 0 per example (and at every padding token, see :func:`.sft.packed_batch`), flattened row-major."""
    import torch

    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([torch.zeros(1, dtype=starts.dtype, device=flat.device), starts])
    ends = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)])
    lengths = ends[1:] - ends[:-1]
    return ends.to(torch.int32), int(lengths.max())


def _reference_varlen(q: Any, k: Any, v: Any, cu: Any, scale: float | None) -> Any:
    """The same contract as ``torch.nn.attention.varlen.varlen_attn`` (causal) computed one sequence at a time with
    SDPA: the fallback where the fused kernel cannot run (CPU), so the plumbing is testable anywhere."""
    import torch
    import torch.nn.functional as F

    out = torch.empty_like(q)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (H, n, D)
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                  enable_gqa=ks.shape[0] != qs.shape[0]).transpose(0, 1)
    return out


def fused_varlen() -> Callable[..., Any] | None:
    """PyTorch's fused ``varlen_attn``, imported, or None when this torch has none.

    ``torch.nn.attention`` does not import its ``varlen`` submodule, so an attribute check on the package is False
    until something else imported it: the submodule is found with ``find_spec`` and imported here."""
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return None
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def varlen_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers attention-interface function: (B, H, L, D) projections + ``position_ids`` → (B, L, H, D).

    Boundaries come from ``position_ids`` (packed rows); without them every row is one causal sequence. CUDA
    tensors always go through the fused kernel (an error there makes the packing probe drop this kernel rather
    than fall back to the slow loop unseen); CPU tensors through :func:`_reference_varlen`."""
    import torch

    b, hq, length, d = query.shape
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = torch.arange(length, device=query.device).expand(b, -1)
    elif pos.shape[0] != b:
        pos = pos.expand(b, -1)
    cu, longest = cu_seqlens(pos)
    q, k, v = (t.transpose(1, 2).reshape(b * length, t.shape[1], d) for t in (query, key, value))
    if query.is_cuda:
        varlen_attn = fused_varlen()
        if varlen_attn is None:
            raise RuntimeError(f"attention {TORCH_VARLEN} on CUDA needs torch.nn.attention.varlen (this torch "
                               f"{torch.__version__} has none)")
        out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=(-1, 0),
                          enable_gqa=k.shape[1] != hq)
        VARLEN_CALLS["fused"] += 1
    else:
        out = _reference_varlen(q, k, v, cu, scaling)
        VARLEN_CALLS["reference"] += 1
    return out.reshape(b, length, hq, d), None


def register_varlen() -> bool:
    """Register :func:`varlen_attention` as ``attn_implementation="torch_varlen"`` (no mask: boundaries come from
    ``position_ids``). Returns whether transformers accepted it."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    except ImportError:  # pragma: no cover - older transformers
        return False
    AttentionInterface.register(TORCH_VARLEN, varlen_attention)
    AttentionMaskInterface.register(TORCH_VARLEN, flash_attention_mask)
    return True


def torch_varlen_available() -> bool:
    import torch

    return torch.cuda.is_available() and fused_varlen() is not None


def candidate_kernels(model: Any) -> list[str]:
    """Attention implementations to try for packed training on this machine, fastest first; the last is always the
    one the model was loaded with (the dense fallback)."""
    import torch

    current = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
    out: list[str] = []
    if torch.cuda.is_available():
        if importlib.util.find_spec("flash_attn") is not None:
            out.append("flash_attention_2")
        if torch_varlen_available() and register_varlen():
            out.append(TORCH_VARLEN)
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is not None:
            out.append("flex_attention")
    if current not in out:
        out.append(current)
    return out


def set_kernel(model: Any, name: str) -> None:
    """Switch the model's attention implementation in place (peft wrappers included)."""
    if name == TORCH_VARLEN:
        register_varlen()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(name)


# -- Liger ---------------------------------------------------------------------------------------------------------
def check_kernels_option(kernels: str) -> None:
    """``--kernels liger`` needs CUDA (Triton kernels) and liger-kernel (the ``[liger]`` extra): refused with one line
    otherwise, before the model is loaded."""
    import torch

    if kernels != "liger":
        return
    if not torch.cuda.is_available():
        raise StageError("--kernels liger needs a CUDA GPU (Liger's kernels are Triton); this machine has none.",
                         fix="drop --kernels (or use --kernels none) on CPU")
    _liger_apply()


def _liger_apply() -> Callable[..., Any]:
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as exc:
        raise MissingDependencyError("liger-kernel", "liger", feature="--kernels liger") from exc
    return _apply_liger_kernel_to_instance


def apply_liger(model: Any, batch: dict[str, Any], *, rtol: float = 2e-2) -> dict[str, float]:
    """Patch fused linear cross-entropy, RMSNorm and SwiGLU onto ``model`` (the base model, before LoRA) and check the
    loss on ``batch`` against the plain model's; raises :class:`VerificationError` when they differ."""
    import torch

    _apply_liger_kernel_to_instance = _liger_apply()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        plain = float(model(**batch).loss)
        _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=True, rms_norm=True, swiglu=True,
                                        rope=False, cross_entropy=False)
        # fused linear CE skips materialising logits only in training; the loss must still agree
        model.train()
        fused = float(model(**batch).loss)
    model.train(was_training)
    if not abs(fused - plain) <= rtol * max(1.0, abs(plain)):
        raise VerificationError(f"Liger kernels change the loss on the same batch: {fused:.5f} vs plain {plain:.5f}.",
                                fix="train without --kernels liger and report the model architecture")
    return {"liger_loss": fused, "plain_loss": plain}


# -- FLOPs / MFU ---------------------------------------------------------------------------------------------------
def flops_per_token(model: Any, *, lora: bool = True) -> tuple[float, str]:
    """Training FLOPs per token and the rule used: 4N for LoRA (frozen base), 6N for full fine-tuning, N = the
    base's parameters that do matrix products per token (input embeddings excluded, the output layer included)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = sum(p.numel() for name, p in base.named_parameters() if "lora_" not in name)
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    out = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if emb is not None and (out is None or out.weight is not emb.weight):
        n -= emb.weight.numel()  # an untied input table is a lookup; a tied one is the output layer's matmul
    return (4.0 if lora else 6.0) * n, ("4N" if lora else "6N")


def peak_tflops(device_name: str | None = None) -> float | None:
    """Dense bf16 peak of the current CUDA device, or None (CPU, unknown GPU): MFU is then not reported."""
    import torch

    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for frag, tflops in PEAK_TFLOPS:
        if frag.lower() in device_name.lower():
            return tflops
    return None

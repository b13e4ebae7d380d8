"""Pruning engine behind ``%llmops prune`` (imported lazily: torch and transformers live here).

The importance scores and the surgery are small torch code on a loaded transformers causal LM; no pruning library
fits as a dependency (llm-compressor pins an older transformers, NVIDIA ModelOpt's pruning needs Megatron on GPU).

* **depth**: hooks on every decoder layer record its input and output hidden states on calibration texts.
  *Block influence* (ShortGPT, Men et al. 2024) of layer ``i`` is ``1 − cos(x_i, x_{i+1})`` averaged over tokens: a
  layer that barely turns the residual stream matters little. *Angular distance* (Gromov et al. 2024) of the block
  ``l..l+n−1`` is ``arccos(cos(x_l, x_{l+n})) / π``: the contiguous block whose input and output point the same way
  is the one to drop. The layers are then deleted and the survivors renumbered (``layer_idx`` of every attention
  module, ``config.num_hidden_layers``, ``config.layer_types``), so the KV cache indexes the right slots
  (transformers #30508) and the folder is a normal checkpoint that merge, GPTQ and GGUF export read.
* **width**: the mean |activation| of every MLP channel (the input of ``down_proj``) over the calibration tokens
  (Minitron's activation importance); the same number of channels is kept in every layer (``intermediate_size`` in
  the config), so every runtime loads the result.
* **wanda** (Sun et al. 2023): score ``|W_ij| · ‖X_j‖₂`` from the calibration inputs of each linear layer; per output
  row the lowest-scoring 50 % (``--sparsity``) are zeroed, or 2 of every 4 consecutive weights (``2:4``). Zeros in a
  dense matrix save nothing on CPU, in GGUF or GPTQ files; only GPU 2:4 kernels turn them into speed.
* **sparsegpt** (Frantar & Alistarh 2023, following the IST-DASLab reference ``fasterprune``): per linear layer the
  Hessian ``H = 2·X·Xᵀ`` of its calibration inputs, dampened by 1 % of its mean diagonal; the upper Cholesky factor of
  ``H⁻¹``; then blocks of 128 columns in order: the mask by ``w² / [H⁻¹]_jj²`` (50 % of the block, or 2 of every 4),
  the pruned weights zeroed and their error spread over the later columns, so the kept weights compensate. Decoder
  layers are pruned one after another, each calibrated on the outputs of the already-pruned previous layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

#: the linear projections of a decoder layer that wanda sparsifies (everything but embeddings and the output head)
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def decoder_layers(model: Any) -> Any:
    """The ``nn.ModuleList`` of decoder layers of a transformers causal LM."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        from llmops_jupyter.core.errors import StageError

        raise StageError(f"prune: cannot find the decoder layers of a {type(model).__name__} (no model.layers).",
                         fix="prune a Llama-style causal LM (Llama, Mistral, Qwen, SmolLM)")
    return layers


def encode(tokenizer: Any, texts: Iterable[str], max_tokens: int) -> list[Any]:
    """One ``[1, T]`` id tensor per text (no padding, so every token counts in every score)."""
    out = []
    for t in texts:
        ids = tokenizer(t, return_tensors="pt", truncation=True, max_length=max_tokens)["input_ids"]
        if ids.shape[1] >= 2:
            out.append(ids)
    return out


def _hidden(x: Any) -> Any:
    return x[0] if isinstance(x, tuple) else x


def layer_similarities(model: Any, batches: list[Any]) -> dict[str, Any]:
    """Mean cosine between the residual stream before layer ``i`` and after layer ``j − 1`` for every ``i < j``.

    Returns ``{"cos": [[...]], "tokens": n}`` where ``cos[i][j]`` (``0 ≤ i < j ≤ L``) compares the input of layer
    ``i`` with the output of layer ``j − 1``; ``cos[i][i + 1]`` is the one-layer similarity ShortGPT uses.
    """
    import torch

    layers = decoder_layers(model)
    n = len(layers)
    states: list[Any] = [None] * (n + 1)
    hooks = []
    for i, layer in enumerate(layers):
        def pre(mod, args, kwargs, i=i):
            states[i] = _hidden(args[0] if args else kwargs["hidden_states"]).detach()

        def post(mod, args, kwargs, out, i=i):
            if i == n - 1:
                states[n] = _hidden(out).detach()

        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(layer.register_forward_hook(post, with_kwargs=True))
    sums = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    tokens = 0
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for ids in batches:
                model(input_ids=ids.to(device), use_cache=False)
                flat = [s.reshape(-1, s.shape[-1]).float() for s in states]
                normed = [torch.nn.functional.normalize(s, dim=-1) for s in flat]
                for i in range(n):
                    for j in range(i + 1, n + 1):
                        sums[i, j] += float((normed[i] * normed[j]).sum(-1).clamp(-1, 1).sum())
                tokens += flat[0].shape[0]
    finally:
        for h in hooks:
            h.remove()
    cos = (sums / max(tokens, 1)).tolist()
    return {"cos": cos, "tokens": tokens, "layers": n}


def block_influence(sim: dict[str, Any]) -> list[float]:
    """ShortGPT block influence per layer: 1 − cos(input, output)."""
    cos = sim["cos"]
    return [1.0 - cos[i][i + 1] for i in range(sim["layers"])]


def angular_distance(sim: dict[str, Any], n_remove: int) -> list[float]:
    """Gromov et al.'s angular distance of every contiguous block of ``n_remove`` layers (index = first layer)."""
    cos = sim["cos"]
    out = []
    for start in range(sim["layers"] - n_remove + 1):
        c = max(-1.0, min(1.0, cos[start][start + n_remove]))
        out.append(math.acos(c) / math.pi)
    return out


def choose_layers(sim: dict[str, Any], n_remove: int, criterion: str) -> tuple[list[int], list[float], str]:
    """(layers to remove, per-layer importance for the report, why) for ``criterion`` bi | angular."""
    bi = block_influence(sim)
    if criterion == "angular":
        dist = angular_distance(sim, n_remove)
        start = min(range(len(dist)), key=lambda s: (dist[s], s))
        removed = list(range(start, start + n_remove))
        # per-layer importance for the chart: the distance of the block starting at that layer (where defined)
        why = (f"contiguous block {start}..{start + n_remove - 1} has the smallest angular distance "
               f"{dist[start]:.4f} between its input and output")
        return removed, bi, why
    order = sorted(range(len(bi)), key=lambda i: (bi[i], i))
    removed = sorted(order[:n_remove])
    why = "the layers with the lowest block influence (1 − cos of input and output): " + ", ".join(
        f"{i} ({bi[i]:.4f})" for i in removed)
    return removed, bi, why


def remove_layers(model: Any, removed: Iterable[int]) -> list[int]:
    """Delete decoder layers in place and renumber the survivors; returns the kept original indices."""
    import torch

    layers = decoder_layers(model)
    gone = set(removed)
    kept = [i for i in range(len(layers)) if i not in gone]
    new = torch.nn.ModuleList([layers[i] for i in kept])
    for idx, layer in enumerate(new):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = idx
    getattr(model, "model", model).layers = new
    cfg = model.config
    cfg.num_hidden_layers = len(kept)
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(layers):
        cfg.layer_types = [layer_types[i] for i in kept]
    return kept


def layer_params(model: Any) -> int:
    """Parameters of one decoder layer (all layers have the same shape)."""
    return sum(p.numel() for p in decoder_layers(model)[0].parameters())


def count_params(model: Any) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# -- width -------------------------------------------------------------------------------------------------------------
def mlp_channel_importance(model: Any, batches: list[Any]) -> list[Any]:
    """Mean |activation| of every MLP channel (input of ``down_proj``) per layer, over the calibration tokens."""
    import torch

    sums: list[Any] = []
    counts = [0]
    hooks = []
    for layer in decoder_layers(model):
        mlp = layer.mlp
        sums.append(torch.zeros(mlp.down_proj.in_features, dtype=torch.float64))

        def pre(mod, args, acc=sums[-1]):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().double()
            acc += x.sum(0).cpu()

        hooks.append(mlp.down_proj.register_forward_pre_hook(pre))
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for ids in batches:
                model(input_ids=ids.to(device), use_cache=False)
                counts[0] += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    return [s / max(counts[0], 1) for s in sums]


def prune_mlp_width(model: Any, importance: list[Any], keep: int) -> list[list[int]]:
    """Keep the ``keep`` most important MLP channels of every layer (same count everywhere); returns kept indices."""
    import torch

    kept_all = []
    with torch.no_grad():
        for layer, imp in zip(decoder_layers(model), importance, strict=True):
            mlp = layer.mlp
            idx = torch.sort(torch.topk(imp, keep).indices).values
            for name in ("gate_proj", "up_proj"):
                old = getattr(mlp, name)
                new = torch.nn.Linear(old.in_features, keep, bias=old.bias is not None, dtype=old.weight.dtype,
                                      device=old.weight.device)
                new.weight.copy_(old.weight[idx])
                if old.bias is not None:
                    new.bias.copy_(old.bias[idx])
                setattr(mlp, name, new)
            old = mlp.down_proj
            new = torch.nn.Linear(keep, old.out_features, bias=old.bias is not None, dtype=old.weight.dtype,
                                  device=old.weight.device)
            new.weight.copy_(old.weight[:, idx])
            if old.bias is not None:
                new.bias.copy_(old.bias)
            mlp.down_proj = new
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = keep
            kept_all.append(idx.tolist())
    model.config.intermediate_size = keep
    return kept_all


# -- wanda -------------------------------------------------------------------------------------------------------------
def linear_modules(model: Any) -> list[tuple[str, Any]]:
    """(qualified name, module) of every decoder-layer projection wanda sparsifies."""
    import torch

    out = []
    for i, layer in enumerate(decoder_layers(model)):
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in LINEAR_NAMES:
                out.append((f"layers.{i}.{name}", mod))
    return out


def input_norms(model: Any, batches: list[Any]) -> dict[str, Any]:
    """‖X_j‖₂ of every input column of every sparsified linear layer over the calibration tokens."""
    import torch

    mods = linear_modules(model)
    sq = {name: torch.zeros(mod.in_features, dtype=torch.float64) for name, mod in mods}
    hooks = []
    for name, mod in mods:
        def pre(m, args, acc=sq[name]):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            acc += (x * x).sum(0).cpu()

        hooks.append(mod.register_forward_pre_hook(pre))
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for ids in batches:
                model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {k: v.sqrt() for k, v in sq.items()}


def wanda_mask(weight: Any, norms: Any, *, sparsity: float, pattern: str) -> Any:
    """Boolean mask of the weights to zero: per output row the lowest ``|W|·‖X‖`` (unstructured), or the 2 lowest
    of every 4 consecutive inputs (``2:4``)."""
    import torch

    score = weight.detach().abs().float() * norms.to(weight.device).float()[None, :]
    if pattern == "2:4":
        rows, cols = score.shape
        groups = score.reshape(rows, cols // 4, 4)
        low = torch.topk(groups, 2, dim=-1, largest=False).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, low, True)
        return mask.reshape(rows, cols)
    k = int(round(score.shape[1] * sparsity))
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        low = torch.topk(score, k, dim=1, largest=False).indices
        mask.scatter_(1, low, True)
    return mask


def apply_wanda(model: Any, norms: dict[str, Any], *, sparsity: float, pattern: str) -> dict[str, float]:
    """Zero weights in place; returns the measured sparsity of every pruned matrix."""
    import torch

    out = {}
    with torch.no_grad():
        for name, mod in linear_modules(model):
            if pattern == "2:4" and mod.in_features % 4:
                continue  # cannot hold the pattern; left dense and reported as 0
            mask = wanda_mask(mod.weight, norms[name], sparsity=sparsity, pattern=pattern)
            mod.weight[mask] = 0
            out[name] = float((mod.weight == 0).sum()) / mod.weight.numel()
    return out


def measured_sparsity(model: Any) -> float:
    """Share of exact zeros over all sparsified projections (what a sparsity claim should be checked against)."""
    zeros = total = 0
    for _, mod in linear_modules(model):
        zeros += int((mod.weight == 0).sum())
        total += mod.weight.numel()
    return zeros / total if total else 0.0


def holds_2_4(weight: Any) -> bool:
    """Every group of 4 consecutive inputs of every row has at least 2 zeros."""
    rows, cols = weight.shape
    if cols % 4:
        return False
    zeros = (weight.reshape(rows, cols // 4, 4) == 0).sum(-1)
    return bool((zeros >= 2).all())


# -- checks ------------------------------------------------------------------------------------------------------------
def cache_consistent(model: Any, tokenizer: Any, prompt: str, new_tokens: int = 8) -> tuple[bool, list[int], list[int]]:
    """Greedy generation with the KV cache equals generation without it (a broken ``layer_idx`` breaks this)."""
    import torch

    from llmops_jupyter.models.tools import ensure_pad

    ensure_pad(tokenizer)
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    kw = {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
          "pad_token_id": tokenizer.pad_token_id, "eos_token_id": None}
    with torch.inference_mode():
        a = model.generate(**enc, use_cache=True, **kw)[0, enc["input_ids"].shape[1]:].tolist()
        b = model.generate(**enc, use_cache=False, **kw)[0, enc["input_ids"].shape[1]:].tolist()
    return a == b, a, b


# -- sparsegpt ---------------------------------------------------------------------------------------------------------
#: SparseGPT's column block and Hessian dampening (Frantar & Alistarh 2023; the IST-DASLab reference defaults)
SPARSEGPT_BLOCKSIZE = 128
SPARSEGPT_PERCDAMP = 0.01


class HessianAccumulator:
    """``H = 2/N · Σ x xᵀ`` over the N calibration tokens that reach one linear layer (fp32, running mean as in the
    reference implementation, so large calibration sets do not overflow)."""

    def __init__(self, columns: int, device: Any = "cpu") -> None:
        import torch

        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: Any) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.H.device, self.H.dtype)
        t = x.shape[0]
        if not t:
            return
        self.H *= self.tokens / (self.tokens + t)
        self.tokens += t
        x = x * math.sqrt(2.0 / self.tokens)
        self.H += x.t() @ x


def sparsegpt_prune(weight: Any, hessian: Any, *, sparsity: float, pattern: str,
                    blocksize: int = SPARSEGPT_BLOCKSIZE, percdamp: float = SPARSEGPT_PERCDAMP) -> tuple[Any, float]:
    """SparseGPT's ``fasterprune`` on one ``[rows, columns]`` weight: returns ``(pruned fp32 weight, error)``.

    Steps (as in the IST-DASLab reference): input columns that never fire (``H_jj = 0``) are zeroed; ``H`` is
    dampened by ``percdamp · mean(diag H)``; ``U`` = the upper Cholesky factor of ``H⁻¹``. Columns are then visited in
    blocks of ``blocksize``: the mask of a block is chosen once from ``w² / U_jj²`` — the lowest ``sparsity`` share of
    the whole block (unstructured), or, at every 4th column, the 2 lowest of each row's next 4 weights (``2:4``, after
    the earlier columns' updates) — and column by column the pruned weights are zeroed and their error
    ``(w − q) / U_jj`` is spread over the later columns of the block with row ``U_j,j:``; at the end of the block the
    accumulated errors update every later column at once. ``error`` is the reference's layer loss
    ``½ Σ (w − q)² / U_jj²`` (the increase of ``‖WX − ŴX‖²`` the method estimates, in units of ``H``).
    """
    import torch

    W = weight.detach().clone().float()
    H = hessian.detach().clone().float().to(W.device)
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    L = torch.linalg.cholesky(H)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    two_four = pattern == "2:4"
    loss = torch.zeros(rows, dtype=torch.float32, device=W.device)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        n = b1 - b0
        Wb = W[:, b0:b1].clone()
        Qb = torch.zeros_like(Wb)
        Eb = torch.zeros_like(Wb)
        Ub = U[b0:b1, b0:b1]
        d = torch.diag(Ub)
        if two_four:
            mask = torch.zeros_like(Wb, dtype=torch.bool)
        else:
            score = Wb ** 2 / d[None, :] ** 2
            thresh = torch.sort(score.flatten())[0][int(score.numel() * sparsity)]
            mask = score <= thresh
        for j in range(n):
            if two_four and j % 4 == 0:
                score = Wb[:, j:j + 4] ** 2 / d[None, j:j + 4] ** 2
                mask.scatter_(1, j + torch.topk(score, 2, dim=1, largest=False).indices, True)
            w = Wb[:, j]
            q = w.clone()
            q[mask[:, j]] = 0
            Qb[:, j] = q
            err = (w - q) / d[j]
            loss += err ** 2 / 2
            Wb[:, j:] -= err[:, None] @ Ub[j, j:][None, :]
            Eb[:, j] = err
        W[:, b0:b1] = Qb
        W[:, b1:] -= Eb @ U[b0:b1, b1:]
    return W, float(loss.sum())


class _Captured(Exception):
    """Raised by the hook on decoder layer 0 once its inputs are recorded (the rest of the model is not run)."""


def _layer_inputs(model: Any, batches: list[Any]) -> list[tuple[Any, tuple, dict]]:
    """(hidden states, other positional args, keyword args) that decoder layer 0 receives for every batch."""
    import torch

    layers = decoder_layers(model)
    recorded: list[tuple[Any, tuple, dict]] = []

    def catch(mod, args, kwargs):
        if args:
            hs, rest = args[0], tuple(args[1:])
        else:
            hs, rest = kwargs["hidden_states"], ()
        recorded.append((hs.detach(), rest, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Captured

    hook = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _Captured:
                    pass
    finally:
        hook.remove()
    return recorded


def apply_sparsegpt(model: Any, batches: list[Any], *, sparsity: float, pattern: str,
                    blocksize: int = SPARSEGPT_BLOCKSIZE, percdamp: float = SPARSEGPT_PERCDAMP,
                    log: Any = None) -> tuple[dict[str, float], dict[str, float]]:
    """SparseGPT layer by layer, in place: the calibration inputs of decoder layer ``i + 1`` are the outputs of the
    already-pruned layer ``i`` (the reference's sequential pass); inside a layer every projection's Hessian comes from
    the same pass over that layer's inputs. Returns (measured sparsity, reconstruction error) per pruned matrix."""
    import torch

    inputs = _layer_inputs(model, batches)
    sparsities: dict[str, float] = {}
    errors: dict[str, float] = {}
    for i, layer in enumerate(decoder_layers(model)):
        mods = [(name, mod) for name, mod in layer.named_modules()
                if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in LINEAR_NAMES
                and not (pattern == "2:4" and mod.in_features % 4)]
        acc = {name: HessianAccumulator(mod.in_features, mod.weight.device) for name, mod in mods}
        hooks = [mod.register_forward_pre_hook(lambda m, args, a=acc[name]: a.add(args[0])) for name, mod in mods]
        try:
            with torch.no_grad():
                for hs, rest, kw in inputs:
                    layer(hs, *rest, **kw)
        finally:
            for h in hooks:
                h.remove()
        with torch.no_grad():
            for name, mod in mods:
                new, err = sparsegpt_prune(mod.weight, acc[name].H, sparsity=sparsity, pattern=pattern,
                                           blocksize=blocksize, percdamp=percdamp)
                mod.weight.copy_(new.to(mod.weight.dtype))
                key = f"layers.{i}.{name}"
                sparsities[key] = float((mod.weight == 0).sum()) / mod.weight.numel()
                errors[key] = err
            del acc
            inputs = [(_hidden(layer(hs, *rest, **kw)), rest, kw) for hs, rest, kw in inputs]
        if log is not None:
            log(f"sparsegpt: layer {i} pruned ({len(mods)} projections, error "
                f"{sum(errors[f'layers.{i}.{n}'] for n, _ in mods):.4g})")
    return sparsities, errors

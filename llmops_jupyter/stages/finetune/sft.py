"""Fine-tuning engine behind ``%llmops finetune`` (imported lazily: torch, transformers, peft live here).

Training is transformers' ``Trainer`` + peft (LoRA, or QLoRA on a bitsandbytes 4-bit NF4 base with double
quantization and ``prepare_model_for_kbit_training``). What this module adds:

* **Padding-free packing through the library's own path, verified.** transformers 5 packs natively: with
  ``position_ids`` restarting at 0 per example, no attention mask and no cache (``use_cache=False``), it builds the
  block-diagonal mask itself (SDPA, eager) or hands the boundaries to a varlen kernel (flash-attn, flex attention,
  PyTorch's varlen attention: :mod:`.kernels`). The stage never builds a mask by hand. Before training,
  :func:`choose_batching` runs each candidate attention kernel through a contamination probe (two examples packed
  vs each alone, ``use_cache=False`` as in training) and keeps the fastest kernel that passes.
* **The cheapest layout, chosen by a recorded cost model.** ``flat`` puts a micro-batch in one row, ``packed`` in
  rows no longer than its longest example (first-fit decreasing), ``grouped`` pads length-grouped batches. With a
  varlen kernel a row costs its tokens, so ``flat`` is cheapest. With a dense mask a row of width W costs
  W × 4N (linear layers) + W² × 12·d·layers (attention, the mask does not skip work), so :func:`batching_costs`
  prices one epoch of this dataset in each layout and the cheapest wins; the run summary records the mode, the
  kernel, the costs and the reason.
* **Reporting** through a small reporter protocol (``progress``, ``log_metrics``, ``log``) that the RunContext
  implements, and that the accelerate / detached workers implement with files.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from llmops_jupyter.core.errors import StageError

if TYPE_CHECKING:
    from llmops_jupyter.stages.finetune.config import FinetuneConfig

from llmops_jupyter.stages.finetune.train import (
    Reporter,
    TokenCounter,
    TrainOutput,
    _callback_cls,
    compute_dtype,
    efficiency,
    eval_subset,
    finish_run,
    free_memory,
    load_model,
    oom_guard,
    release,
    reset_peak_memory,
    trainer_kwargs,
)


def tokenize(rows: list[dict[str, Any]], tokenizer: Any, seq_len: int, completion_only: bool) -> list[dict[str, list]]:
    """Examples → ``input_ids`` / ``labels`` (prompt tokens masked with -100 for completion-only loss). A text chunk
    that ends its document (``eos``, see :mod:`llmops_jupyter.stages.data.text`) gets the tokenizer's end-of-text
    token after its text, as a target like every other token."""
    out = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for row in rows:
        if row.get("prompt") is not None and row.get("completion") is not None:
            p = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            c = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        else:
            c = tokenizer(row["text"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
            p, c = [], c + (eos if row.get("eos") else [])  # a special token's text in a document stays text
        ids = (p + c)[:seq_len]
        labels = (([-100] * len(p) + c) if completion_only else (p + c))[:seq_len]
        if len(ids) < 2 or all(t == -100 for t in labels[1:]):
            continue  # nothing to learn after truncation
        out.append({"input_ids": ids, "labels": labels})
    return out


def tokenized_splits(model_path: Path, train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]],
                     seq_len: int, completion_only: bool, *, train_completion_only: bool | None = None,
                     ) -> tuple[Any, list[dict[str, list]], list[dict[str, list]]]:
    """The tokenizer of ``model_path`` (pad = EOS when it has none) and both splits tokenized by :func:`tokenize`;
    one line naming the fix when no training example is left. What fine-tuning and distillation both start with.
    ``train_completion_only`` overrides ``completion_only`` for the training split (sequence-level distillation
    learns only the teacher's answers, and is evaluated as configured)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_only = completion_only if train_completion_only is None else train_completion_only
    train_tok = tokenize(train_rows, tokenizer, seq_len, train_only)
    eval_tok = tokenize(eval_rows, tokenizer, seq_len, completion_only)
    if not train_tok:
        raise StageError("No training example has response tokens left after truncation.",
                         fix="raise --seq-len or check the dataset's prompt/completion fields")
    return tokenizer, train_tok, eval_tok


MODES = ("flat", "packed", "grouped")


class Batcher:
    """Collate micro-batches in one of the modes :func:`choose_batching` picks."""

    def __init__(self, mode: str, tokenizer: Any):
        from transformers import DataCollatorForSeq2Seq

        self.mode = mode
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._pad = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        feats = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
        if self.mode == "grouped":
            return dict(self._pad(feats))
        return packed_batch(feats, cap=None if self.mode == "flat" else max(len(f["input_ids"]) for f in feats),
                            pad_id=self.pad_id)


def pack_rows(lengths: list[int], cap: int) -> list[list[int]]:
    """First-fit decreasing: example indices per row, each row's total length ≤ ``cap`` (an example longer than
    ``cap`` gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, left in enumerate(room):
            if lengths[i] <= left:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(cap - lengths[i])
    return rows


def packed_batch(feats: list[dict[str, list]], cap: int | None = None, pad_id: int = 0) -> dict[str, Any]:
    """Examples packed for transformers' own packed-sequence path: ``position_ids`` restarting at 0 per example, no
    attention mask, ``use_cache=False`` (with a cache the library skips the detection and examples attend across).

    ``cap=None``: one row (what varlen kernels want). Otherwise rows of at most ``cap`` tokens (first-fit
    decreasing), padded to the widest; each padding token gets position 0, i.e. is a one-token sequence of its own,
    so no real token attends to it and :func:`real_tokens` tells it apart (a real example has ≥ 2 tokens). The first
    label of each example is ignored (it would be predicted from the previous example).
    """
    import torch

    lengths = [len(f["input_ids"]) for f in feats]
    rows = [list(range(len(feats)))] if cap is None else pack_rows(lengths, cap)
    width = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            ids[r, at:at + n] = torch.tensor(feats[i]["input_ids"])
            labels[r, at + 1:at + n] = torch.tensor(feats[i]["labels"][1:])
            pos[r, at:at + n] = torch.arange(n)
            at += n
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "use_cache": False}


# -- cost model ----------------------------------------------------------------------------------------------------
class ModelShape(NamedTuple):
    token_flops: float  # linear layers per token, fwd + bwd (4N for LoRA)
    pair_flops: float  # attention per (query, key) pair, fwd + bwd: 12 · d_attn · layers

    @classmethod
    def of(cls, model: Any) -> ModelShape:
        from llmops_jupyter.stages.finetune.kernels import flops_per_token

        c = getattr(model, "config", None)
        heads = getattr(c, "num_attention_heads", 1)
        head_dim = getattr(c, "head_dim", None) or getattr(c, "hidden_size", 64) // max(heads, 1)
        layers = getattr(c, "num_hidden_layers", 1)
        return cls(flops_per_token(model)[0], 12.0 * heads * head_dim * layers)


def layout(mode: str, lengths: list[int]) -> list[int]:
    """Row widths a micro-batch of examples with these lengths occupies in ``mode``."""
    if mode == "flat":
        return [sum(lengths)]
    if mode == "packed":
        rows = pack_rows(lengths, max(lengths))
        width = max(sum(lengths[i] for i in row) for row in rows)
        return [width] * len(rows)
    return [max(lengths)] * len(lengths)  # grouped: padded to the longest


def batch_order(mode: str, lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """The micro-batches of one epoch as the Trainer's sampler would draw them (length-grouped for ``grouped``)."""
    import random

    if mode == "grouped":
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        order = get_length_grouped_indices(lengths, batch_size, generator=torch.Generator().manual_seed(seed))
    else:
        order = list(range(len(lengths)))
        random.Random(seed).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def batching_costs(lengths: list[int], batch_size: int, shape: ModelShape, *, dense: bool = True, seed: int = 0,
                   modes: tuple[str, ...] = MODES) -> dict[str, dict[str, float]]:
    """FLOPs of one epoch of these examples in each mode, with the padding share. ``dense``: attention under a
    mask costs every (query, key) pair of a row; a varlen kernel only each example's own causal pairs."""
    out = {}
    for mode in modes:
        flops = positions = 0.0
        for batch in batch_order(mode, lengths, batch_size, seed):
            lens = [lengths[i] for i in batch]
            widths = layout(mode, lens)
            positions += sum(widths)
            pairs = sum(w * w for w in widths) if dense else sum(n * (n + 1) / 2 for n in lens)
            flops += sum(widths) * shape.token_flops + pairs * shape.pair_flops
        tokens = float(sum(lengths))
        out[mode] = {"flops": flops, "padding_pct": 100.0 * (1 - tokens / max(positions, 1.0))}
    return out


# -- the packing check ---------------------------------------------------------------------------------------------
class BatchingChoice(NamedTuple):
    mode: str  # flat | packed | grouped
    max_diff: float  # largest |Δlogit| of the chosen packed mode vs the examples run alone (nan: not checked)
    noise: float  # the model's own |Δlogit| between two correct layouts of the same examples
    kernel: str = ""  # attention implementation trained with
    reason: str = ""
    costs: dict | None = None  # mode → {"flops", "padding_pct"} (cost model), when modes were compared
    probes: dict | None = None  # kernel → max |Δlogit| (nan: failed to run), seconds per probe step on GPU
    errors: dict | None = None  # kernel → "ExceptionType: message" of a kernel that raised in the probe or timing

    def describe(self) -> str:
        text = f"batching: {self.mode}" + (f", attention: {self.kernel}" if self.kernel else "")
        if self.max_diff == self.max_diff:
            text += (f" (packed vs unpacked max |Δlogit| {self.max_diff:.2e}; this model's kernel noise "
                     f"{self.noise:.2e})")
        text += f" — {self.reason}" if self.reason else ""
        unsaid = {k: e for k, e in (self.errors or {}).items() if e not in self.reason}
        return text + ("".join(f"; {k} unusable: {e}" for k, e in unsaid.items()))


def probe_packing(model: Any, examples: list[dict[str, list]], dtype: Any) -> tuple[float, float, float]:
    """(max |Δlogit| packed vs alone, the model's own noise, tolerance) through the library's packed path.

    "Equal" allows for the model's own numerical noise, measured first: the same two examples run alone and as the
    head of a longer causal row must agree, and whatever they differ by is noise (bitsandbytes' 4-bit CPU kernels
    differ by ~2% of the largest logit depending on where a token falls in the batch; fp32 kernels by ~1e-6).
    Attending across examples or using wrong positions changes logits by far more. ``tol`` is inf when the noise
    is too large to tell the two apart."""
    import torch

    a, b = sorted((examples[0]["input_ids"][:12], examples[1]["input_ids"][:12]), key=len, reverse=True)
    device = next(p for p in model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            run = lambda ids, **kw: model(input_ids=torch.tensor([ids], device=device), use_cache=False,  # noqa: E731
                                          **kw).logits[0].float()
            ref = torch.cat([run(x) for x in (a, b)])
            heads = torch.cat([run(x + y)[:len(x)] for x, y in ((a, b), (b, a))])
            noise = (heads - ref).abs().max().item()
            scale = max(1.0, ref.abs().max().item())
            if noise > 0.1 * scale:
                return float("nan"), noise, float("inf")
            tol = max((1e-4 if dtype in (None, torch.float32) else 3e-2) * scale, 3 * noise)
            pos = torch.tensor([list(range(len(a))) + list(range(len(b)))], device=device)
            got = run(a + b, position_ids=pos)
            return (got - ref).abs().max().item(), noise, tol
    finally:
        model.train(was_training)


def _time_kernel(model: Any, lengths: list[int], steps: int = 3) -> float:
    """Seconds per forward + backward of one packed micro-batch (GPU kernel choice; gradients are discarded)."""
    import time

    import torch

    device = next(p for p in model.parameters()).device
    feats = [{"input_ids": [1 + (i % 50)] * n, "labels": [1] * n} for i, n in enumerate(lengths)]
    batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in packed_batch(feats).items()}
    best = float("inf")
    for _ in range(steps + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model(**batch).loss.backward()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    return best


def _attn(model: Any) -> str:
    """The attention implementation the model runs with now ('' when it has no such setting)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) or ""


def _oom_types() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.OutOfMemoryError, MemoryError)


def _error_text(exc: BaseException) -> str:
    """One line: the exception's type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def _no_kernel_reason(probes: dict[str, float], errors: dict[str, str]) -> str:
    """Why no kernel may pack: each kernel's own outcome (logits that differ, or the error it raised)."""
    parts = [f"{k} raised {errors[k]}" if k in errors else f"{k} packed logits differ from unpacked (max |Δlogit| "
             f"{v:.2e})" for k, v in probes.items()]
    if not errors:
        return "packed logits differ from unpacked with every kernel: " + "; ".join(parts)
    return "no attention kernel passed the packing probe: " + "; ".join(parts)


def choose_batching(model: Any, examples: list[dict[str, list]], packing: bool, dtype: Any, *, batch_size: int = 8,
                    seed: int = 0, forced: str = "auto", kernels: list[str] | None = None) -> BatchingChoice:
    """Pick the attention kernel and batching mode to train with (see module doc) and say why.

    Kernels are tried fastest first (:func:`.kernels.candidate_kernels`); each must pass :func:`probe_packing`. On a
    GPU the passing ones are timed on a micro-batch and the fastest kept. Then the mode: ``flat`` for a varlen
    kernel, else the cheapest of :func:`batching_costs` on this dataset. ``forced`` (``--batching``) skips the cost
    model but not the probe.
    """
    import torch

    from llmops_jupyter.stages.finetune.kernels import VARLEN_KERNELS, candidate_kernels, set_kernel

    current = _attn(model)
    if not packing or forced == "grouped" or len(examples) < 2:
        why = "--no-packing" if not packing else "--batching grouped" if forced == "grouped" else "one example"
        return BatchingChoice("grouped", float("nan"), float("nan"), current, why)
    kernels = kernels or candidate_kernels(model)
    _OOM = _oom_types()
    probes: dict[str, float] = {}
    errors: dict[str, str] = {}
    passing: list[str] = []
    noise = worst = float("nan")
    for name in kernels:
        try:
            if current and _attn(model) != name:  # a model without an attention setting is probed as it is
                set_kernel(model, name)
            diff, noise, tol = probe_packing(model, examples, dtype)
        except _OOM:
            raise  # out of memory is the run's problem, not the kernel's: oom_guard turns it into advice
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot run here is not a candidate; say why
            probes[name] = float("nan")
            errors[name] = _error_text(exc)
            continue
        probes[name] = diff
        if tol == float("inf"):  # noise too large to tell a leak: no packing whatever the kernel
            if current and _attn(model) != current:
                set_kernel(model, current)
            return BatchingChoice("grouped", diff, noise, current,
                                  "kernel noise too large to verify packing", probes=probes, errors=errors or None)
        if diff <= tol:
            passing.append(name)
            worst = diff if worst != worst else worst
    if not passing:
        if current and _attn(model) != current:
            set_kernel(model, current)
        return BatchingChoice("grouped", min((v for v in probes.values() if v == v), default=float("nan")), noise,
                              current, _no_kernel_reason(probes, errors), probes=probes, errors=errors or None)
    lengths = [len(e["input_ids"]) for e in examples]
    kernel = passing[0]
    timings: dict[str, float] = {}
    if len(passing) > 1 and torch.cuda.is_available():
        sample = lengths[:batch_size] if len(lengths) >= batch_size else lengths
        for name in passing:
            if current:
                set_kernel(model, name)
            try:
                timings[name] = _time_kernel(model, sample)
            except _OOM:
                raise
            except Exception as exc:  # noqa: BLE001 - fails in backward only (e.g. no grad kernel): not a candidate
                timings[name] = float("inf")
                errors[name] = _error_text(exc)
        kernel = min(passing, key=lambda n: timings[n])
    if current and kernel != _attn(model):
        set_kernel(model, kernel)
    probes.update({f"{k}_s": v for k, v in timings.items()})
    diff = probes[kernel]
    timed = f"fastest of {', '.join(passing)} on a timed micro-batch; " if timings else ""
    if forced in ("flat", "packed"):
        return BatchingChoice(forced, diff, noise, kernel, f"{timed}--batching {forced}", probes=probes,
                              errors=errors or None)
    if kernel in VARLEN_KERNELS:
        costs = batching_costs(lengths, batch_size, ModelShape.of(model), dense=False, seed=seed)
        return BatchingChoice("flat", diff, noise, kernel, f"{timed}{kernel} reads example boundaries from "
                              "position_ids: one packed row per micro-batch, cost ∝ tokens", costs, probes,
                              errors or None)
    costs = batching_costs(lengths, batch_size, ModelShape.of(model), dense=True, seed=seed)
    mode = min(costs, key=lambda m: (costs[m]["flops"], MODES.index(m)))
    best = costs[mode]["flops"]
    rel = ", ".join(f"{m} {c['flops'] / best:.2f}" for m, c in costs.items())
    return BatchingChoice(mode, diff, noise, kernel, f"{timed}dense-mask kernel {kernel}: cost model (epoch FLOPs "
                          f"relative to the cheapest: {rel}) picks {mode}", costs, probes, errors or None)


def embedding_lr(cfg: FinetuneConfig) -> float:
    return cfg.embedding_lr if cfg.embedding_lr is not None else cfg.lr / 10


def trainer_class(cfg: FinetuneConfig) -> type:
    """transformers' Trainer; with --train-embeddings one whose optimizer gives the embeddings their own learning
    rate (:func:`.train.split_embedding_lr`)."""
    from transformers import Trainer

    if not getattr(cfg, "train_embeddings", False):
        return Trainer
    from llmops_jupyter.stages.finetune.train import split_embedding_lr

    lr = embedding_lr(cfg)

    class EmbeddingLRTrainer(Trainer):
        def create_optimizer(self, model=None):
            fresh = self.optimizer is None
            optimizer = super().create_optimizer(model)
            if fresh:
                split_embedding_lr(optimizer, self.model if model is None else model, lr)
            return optimizer

    return EmbeddingLRTrainer


def train(cfg: FinetuneConfig, model_path: Path, train_rows: list[dict], eval_rows: list[dict], out_dir: Path,
          reporter: Reporter, *, resume_from: Path | None = None, model_ref: str = "",
          adapter_dir: Path | None = None, callbacks: list | None = None) -> TrainOutput:
    """Run one training; write the adapter to ``adapter_dir`` (rank 0). Used in-process and by the workers."""
    from transformers import PrinterCallback, TrainingArguments

    dtype = compute_dtype(cfg.dtype)
    reset_peak_memory()
    causal = getattr(cfg, "objective", "sft") == "causal-lm"
    completion_only = cfg.completion_only_loss and not causal  # causal-lm: loss on every token
    eval_total = len(eval_rows)
    eval_rows = eval_subset(eval_rows, getattr(cfg, "eval_limit", 0))
    tokenizer, train_ds, eval_ds = tokenized_splits(model_path, train_rows, eval_rows, cfg.seq_len, completion_only)
    if causal:
        cut = sum(1 for r in train_rows if (r.get("n_tokens") or 0) > cfg.seq_len)
        if cut:
            reporter.log(f"{cut} text chunk(s) are longer than --seq-len {cfg.seq_len} and were truncated; build the "
                         f"dataset with --chunk-tokens {cfg.seq_len} (or raise --seq-len) to train on every token")
    from llmops_jupyter.stages.finetune.kernels import TORCH_VARLEN, VARLEN_CALLS, apply_liger, check_kernels_option

    check_kernels_option(cfg.kernels)
    with oom_guard(cfg, model_ref or str(model_path)):
        model = load_model(cfg, model_path, dtype)
        model.config.use_cache = False  # a cache turns off transformers' packed-sequence detection
        choice = choose_batching(model, train_ds, cfg.packing, dtype, batch_size=cfg.batch_size, seed=cfg.seed,
                                 forced=cfg.batching)
        mode = choice.mode
        reporter.log(choice.describe())
        batcher = Batcher(mode, tokenizer)
        liger: dict[str, float] = {}
        if cfg.kernels == "liger":
            device = next(p for p in model.parameters()).device
            first = {k: (v.to(device) if hasattr(v, "to") else v)
                     for k, v in batcher(train_ds[:cfg.batch_size]).items()}
            liger = apply_liger(model.get_base_model(), first)
            reporter.log(f"liger kernels on: loss {liger['liger_loss']:.5f} vs plain {liger['plain_loss']:.5f}")
        counter = TokenCounter()
        hook = model.register_forward_pre_hook(counter, with_kwargs=True)
        args = TrainingArguments(
            **trainer_kwargs(cfg, out_dir, dtype, has_eval=bool(eval_ds)), remove_unused_columns=False,
            train_sampling_strategy="group_by_length" if mode == "grouped" else "random",
            ddp_find_unused_parameters=False,
        )
        eff = efficiency(model)
        report = _callback_cls()(reporter, counter, batching=mode, kernel=choice.kernel, **eff)
        trainer = trainer_class(cfg)(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds or None,
                          data_collator=batcher, callbacks=[report, *(callbacks or [])])
        trainer.remove_callback(PrinterCallback)  # metrics go to the reporter, not stdout
        try:
            calls_before = dict(VARLEN_CALLS)
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            # what the attention function itself counted while training (the chosen kernel is the one that ran)
            ran = {k: n - calls_before.get(k, 0) for k, n in VARLEN_CALLS.items() if n > calls_before.get(k, 0)}
            metrics: dict[str, float] = {"train_loss": float(result.training_loss),
                                         "train_runtime_s": float(result.metrics.get("train_runtime", 0.0))}
            if eval_ds:
                metrics["eval_loss"] = float(trainer.evaluate()["eval_loss"])
                if causal:
                    import math

                    metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
            emb = ({"train_embeddings": True, "embedding_lr": embedding_lr(cfg)}
                   if getattr(cfg, "train_embeddings", False) else {})
            if len(eval_rows) < eval_total:
                emb["eval_examples_total"] = eval_total
            extra = {"objective": getattr(cfg, "objective", "sft"), **emb, "attention_kernel": choice.kernel, "batching_reason": choice.reason, "kernels": cfg.kernels,
                     **({"batching_costs": choice.costs} if choice.costs else {}),
                     **({"packing_probe": choice.probes} if choice.probes else {}),
                     **({"packing_probe_errors": choice.errors} if choice.errors else {}),
                     **({"varlen_calls": ran} if choice.kernel == TORCH_VARLEN else {}), **liger}
            return finish_run(trainer, model, counter, metrics, dtype=dtype, batching=mode,
                              train_examples=len(train_ds), eval_examples=len(eval_ds), tokenizer=tokenizer,
                              adapter_dir=adapter_dir, efficiency=eff, **extra)
        finally:
            release(trainer, hook)
            del trainer, model
            free_memory()

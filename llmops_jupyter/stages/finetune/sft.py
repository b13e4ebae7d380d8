"""Fine-tuning engine behind ``%llmops finetune`` (imported lazily: torch, transformers, peft live here).

Training is transformers' ``Trainer`` + peft (LoRA, or QLoRA on a bitsandbytes 4-bit NF4 base with double
quantization and ``prepare_model_for_kbit_training``). What this module adds:

* **Padding-free packing, verified.** A micro-batch of examples becomes one row of concatenated tokens with
  ``position_ids`` restarting at each example (transformers' ``DataCollatorWithFlattening``). Whether examples then
  attend across each other depends on the attention implementation: flash-attention kernels honour the
  boundaries from ``position_ids``; eager/SDPA on this transformers version do not. So before training,
  :func:`choose_batching` runs the model on two short examples packed and separately and keeps the first mode that
  gives identical logits: ``flat`` (position_ids only), ``flat-mask`` (plus a block-diagonal causal 4-D mask), else
  ``grouped`` (padding, with length-grouped sampling to keep padding small). A dense mask makes attention cost
  O(row length²), so ``flat-mask`` does not put the whole micro-batch in one row: :func:`pack_rows` fills rows no
  longer than the micro-batch's longest example (first-fit decreasing), which is never more attention work than
  padding and leaves far fewer padded positions.
* **Reporting** through a small reporter protocol (``progress``, ``log_metrics``, ``log``) that the RunContext
  implements, and that the accelerate / detached workers implement with files.
* **Exact resume**: checkpoints go to ``<registry home>/runs/<run>/checkpoints``; the Trainer restores optimizer,
  scheduler, RNG and data position, and a ``llmops-complete`` marker written after each save means a checkpoint
  cut in half by Ctrl-C is never picked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from llmops_jupyter.core.env import pid_alive
from llmops_jupyter.core.errors import NotFoundError, ResourceError, StageError
from llmops_jupyter.core.files import atomic_write_json

if TYPE_CHECKING:
    from llmops_jupyter.core.runner import RunContext
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.stages.finetune.stage import AttachConfig, FinetuneConfig

COMPLETE_MARKER = "llmops-complete"
PROGRESS_FILE = "progress.json"


class Reporter(Protocol):
    def progress(self, done: float, total: float | None = None, desc: str | None = None, **extra: Any) -> None: ...
    def log_metrics(self, values: dict[str, float], step: int | None = None) -> None: ...
    def log(self, message: str) -> None: ...


# -- folders and checkpoints ---------------------------------------------------------------------------------------
def run_dir(registry: Registry, run_id: str) -> Path:
    """Per-run working folder (checkpoints, worker log, progress file) under the registry home."""
    path = registry.home / "runs" / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``folder``, oldest first."""
    out = []
    for p in folder.glob("checkpoint-*"):
        if (p / COMPLETE_MARKER).exists() and p.name.split("-")[-1].isdigit():
            out.append((int(p.name.split("-")[-1]), p))
    return sorted(out)


def last_checkpoint(registry: Registry, run_id: str) -> tuple[int, Path] | None:
    """Newest complete checkpoint of a run, following ``--resume`` chains back to earlier runs."""
    seen = set()
    while run_id and run_id not in seen:
        seen.add(run_id)
        found = checkpoints(registry.home / "runs" / run_id / "checkpoints")
        if found:
            return found[-1]
        try:
            run = registry.get_run(run_id)
        except NotFoundError:
            return None
        run_id = (run.get("summary") or {}).get("resumed_from")
    return None


# -- data ------------------------------------------------------------------------------------------------------------
def tokenize(rows: list[dict[str, Any]], tokenizer: Any, seq_len: int, completion_only: bool) -> list[dict[str, list]]:
    """Examples → ``input_ids`` / ``labels`` (prompt tokens masked with -100 for completion-only loss)."""
    out = []
    for row in rows:
        if row.get("prompt") is not None and row.get("completion") is not None:
            p = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            c = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        else:
            p, c = [], tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        ids = (p + c)[:seq_len]
        labels = (([-100] * len(p) + c) if completion_only else (p + c))[:seq_len]
        if len(ids) < 2 or all(t == -100 for t in labels[1:]):
            continue  # nothing to learn after truncation
        out.append({"input_ids": ids, "labels": labels})
    return out


class Batcher:
    """Collate micro-batches in one of the modes :func:`choose_batching` picks."""

    def __init__(self, mode: str, tokenizer: Any):
        from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

        self.mode = mode
        self._flat = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
        self._pad = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        feats = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
        if self.mode == "grouped":
            return dict(self._pad(feats))
        if self.mode == "flat-mask":
            return packed_rows(feats)
        return dict(self._flat(feats, return_tensors="pt"))


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


def packed_rows(feats: list[dict[str, list]], cap: int | None = None) -> dict[str, Any]:
    """Examples packed into rows of at most ``cap`` tokens (default: the longest example) with a block-diagonal
    causal boolean mask (R, 1, L, L), ``position_ids`` restarting per example and the first label of each example
    ignored (it would be predicted from the previous example).

    Padding at the end of a row attends to the row's first token only: never to itself, so the mask's diagonal is
    True exactly at real tokens (what :class:`TokenCounter` counts), and no real token ever attends to padding.
    Boolean, not additive: SDPA takes a bool mask whatever the query dtype (bf16 LoRA, fp32 QLoRA activations, fp32
    on CPU); attention implementations that would misread it are caught by :func:`choose_batching`.
    """
    import torch

    lengths = [len(f["input_ids"]) for f in feats]
    rows = pack_rows(lengths, cap or max(lengths))
    width = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width, width), dtype=torch.bool)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            ids[r, at:at + n] = torch.tensor(feats[i]["input_ids"])
            labels[r, at + 1:at + n] = torch.tensor(feats[i]["labels"][1:])
            pos[r, at:at + n] = torch.arange(n)
            mask[r, at:at + n, at:at + n] = torch.ones(n, n, dtype=torch.bool).tril()
            at += n
        mask[r, at:, 0] = True
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": mask[:, None]}


class BatchingChoice(NamedTuple):
    mode: str  # flat | flat-mask | grouped
    max_diff: float  # largest |Δlogit| of the chosen packed mode vs the examples run alone (nan: not checked)
    noise: float  # the model's own |Δlogit| between two correct layouts of the same examples

    def describe(self) -> str:
        if self.max_diff != self.max_diff:
            return f"batching: {self.mode}"
        return (f"batching: {self.mode} (packed vs unpacked max |Δlogit| {self.max_diff:.2e}; "
                f"this model's kernel noise {self.noise:.2e})")


def choose_batching(model: Any, examples: list[dict[str, list]], packing: bool, dtype: Any) -> BatchingChoice:
    """Pick the cheapest batching mode whose packed logits equal unpacked ones on this model (see module doc).

    "Equal" allows for the model's own numerical noise, measured first: the same two examples run alone and as the
    head of a longer causal row must agree, and whatever they differ by is noise (bitsandbytes' 4-bit CPU kernels
    differ by ~2% of the largest logit depending on where a token falls in the batch; fp32 kernels by ~1e-6).
    Attending across examples or using wrong positions changes logits by far more. If the noise is too large to
    tell the two apart, packing is not used.
    """
    import torch

    if not packing or len(examples) < 2:
        return BatchingChoice("grouped", float("nan"), float("nan"))
    # longer first, as pack_rows orders a row, so the packed row below is a + b
    a, b = sorted((examples[0]["input_ids"][:12], examples[1]["input_ids"][:12]), key=len, reverse=True)
    device = next(p for p in model.parameters()).device
    was_training = model.training
    model.eval()
    worst = noise = float("nan")
    try:
        with torch.no_grad():
            ref = torch.cat([model(input_ids=torch.tensor([x], device=device)).logits[0].float() for x in (a, b)])
            heads = torch.cat([model(input_ids=torch.tensor([x + y], device=device)).logits[0, :len(x)].float()
                               for x, y in ((a, b), (b, a))])
            noise = (heads - ref).abs().max().item()
            ids = torch.tensor([a + b], device=device)
            pos = torch.tensor([list(range(len(a))) + list(range(len(b)))], device=device)
            scale = max(1.0, ref.abs().max().item())
            if noise > 0.1 * scale:
                return BatchingChoice("grouped", float("nan"), noise)
            tol = max((1e-4 if dtype in (None, torch.float32) else 3e-2) * scale, 3 * noise)
            packed = packed_rows([{"input_ids": x, "labels": x} for x in (a, b)], cap=len(a) + len(b))
            for mode in ("flat", "flat-mask"):
                kwargs = {"position_ids": pos}
                if mode == "flat-mask":  # exactly what the Batcher feeds the model in training
                    kwargs = {k: packed[k].to(device) for k in ("position_ids", "attention_mask")}
                got = model(input_ids=ids, **kwargs).logits[0].float()
                worst = (got - ref).abs().max().item()
                if worst <= tol:
                    return BatchingChoice(mode, worst, noise)
    finally:
        model.train(was_training)
    return BatchingChoice("grouped", worst, noise)


# -- model -----------------------------------------------------------------------------------------------------------
def resolve_dtype(name: str) -> Any:
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def resolve_target_modules(names: list[str], model_type: str) -> Any:
    """``auto`` → peft's ``all-linear`` (every linear projection, output layer excluded); ``peft-default`` →
    peft's per-architecture default list; anything else is used as given."""
    if names == ["auto"]:
        return "all-linear"
    if names == ["peft-default"]:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

        if model_type not in defaults:
            raise StageError(f"peft has no default target modules for architecture '{model_type}'.",
                             fix="use --target-modules auto, or name the modules (e.g. q_proj,v_proj)")
        return list(defaults[model_type])
    return list(names)


def uses_4bit(cfg: FinetuneConfig) -> bool:
    """QLoRA, or DPO on a QLoRA base (``--method dpo --dpo-base qlora``): the frozen base is 4-bit NF4."""
    return cfg.method == "qlora" or (cfg.method == "dpo" and getattr(cfg, "dpo_base", "lora") == "qlora")


def load_model(cfg: FinetuneConfig, model_path: Path, dtype: Any) -> Any:
    """Base model (4-bit NF4 + double quantization for QLoRA) with LoRA adapters attached."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, set_seed

    kwargs: dict[str, Any] = {"dtype": dtype}
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    if uses_4bit(cfg):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
    model = AutoModelForCausalLM.from_pretrained(str(model_path), **kwargs)
    if uses_4bit(cfg):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    set_seed(cfg.seed)  # LoRA A matrices are initialised here: same seed, same adapter
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type="CAUSAL_LM",
                      target_modules=resolve_target_modules(list(cfg.target_modules), model.config.model_type))
    return get_peft_model(model, lora)


def choose_optimizer(cfg: FinetuneConfig) -> str:
    import torch

    if cfg.optim != "auto":
        return cfg.optim
    if uses_4bit(cfg):
        return "paged_adamw_8bit" if torch.cuda.is_available() else "adamw_bnb_8bit"
    return "adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch"


def peak_memory_mb() -> float:
    """Peak accelerator memory (CUDA) or peak process RSS (CPU), in MB."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TokenCounter:
    """Counts real (non-padding) tokens of every training forward pass — the numerator of tokens/s."""

    def __init__(self) -> None:
        self.tokens = 0

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> None:
        import torch

        if not torch.is_grad_enabled():
            return  # evaluation
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is not None and mask.dim() == 2:
            self.tokens += int(mask.sum())
        elif mask is not None and mask.dim() == 4 and mask.dtype == torch.bool:  # packed rows: see packed_rows
            self.tokens += int(mask.diagonal(dim1=-2, dim2=-1).sum())
        elif ids is not None:
            self.tokens += int(ids.numel())


def _callback_cls():
    from transformers import TrainerCallback

    class ReportCallback(TrainerCallback):
        """Trainer → reporter: progress every step, metrics every logging step, checkpoint completion marker."""

        def __init__(self, reporter: Reporter, counter: TokenCounter):
            self.reporter, self.counter = reporter, counter
            self.last_t = time.perf_counter()
            self.last_tokens = 0
            self.train_loss: float | None = None

        def on_train_begin(self, args, state, control, **kw):
            self.last_t, self.last_tokens = time.perf_counter(), self.counter.tokens
            self.reporter.progress(state.global_step, state.max_steps, desc="finetune")

        def on_step_begin(self, args, state, control, **kw):
            if getattr(self, "_first", True):  # after a resume, skipped batches were counted: start fresh
                self._first = False
                self.last_t, self.last_tokens = time.perf_counter(), self.counter.tokens

        def on_step_end(self, args, state, control, **kw):
            self.reporter.progress(state.global_step, state.max_steps, desc="finetune")

        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.exists():
                    (folder / COMPLETE_MARKER).write_text(str(state.global_step))

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            values: dict[str, float] = {}
            if "loss" in logs:
                now = time.perf_counter()
                values["loss"] = logs["loss"]
                values["lr"] = logs.get("learning_rate")
                if logs.get("grad_norm") is not None:
                    values["grad_norm"] = logs["grad_norm"]
                values["tokens_per_s"] = (self.counter.tokens - self.last_tokens) / max(now - self.last_t, 1e-9)
                values["memory_mb"] = peak_memory_mb()
                values["epoch"] = logs.get("epoch")
                self.last_t, self.last_tokens = now, self.counter.tokens
            if "eval_loss" in logs:
                values["eval_loss"] = logs["eval_loss"]
            # preference tuning (DPO): rewards and log-probs per logging step and per evaluation
            values.update({k: v for k, v in logs.items()
                           if k.startswith(("rewards/", "logps/", "eval_rewards/", "eval_logps/"))})
            if "train_loss" in logs:
                self.train_loss = logs["train_loss"]
            values = {k: float(v) for k, v in values.items() if v is not None}
            if values and state.is_world_process_zero:
                self.reporter.log_metrics(values, step=state.global_step)

    return ReportCallback


@contextlib.contextmanager
def oom_guard(cfg: FinetuneConfig, model_ref: str) -> Iterator[None]:
    """CUDA out-of-memory → :class:`ResourceError` with concrete `%llmops plan` advice (and memory freed first)."""
    import torch

    message = None
    try:
        yield
    except torch.OutOfMemoryError as exc:
        traceback.clear_frames(exc.__traceback__)  # drop the activations the failed step's frames still hold
        first = str(exc).splitlines()[0] if str(exc) else "out of memory"
        message = (f"Out of GPU memory while fine-tuning '{model_ref}' with --method {cfg.method}, --batch-size "
                   f"{cfg.batch_size}, --seq-len {cfg.seq_len} ({first}).")
    if message is not None:  # raised outside the except block: the traceback no longer pins the tensors
        free_memory()
        fix = (f"run `%llmops plan --model {model_ref}` to see what fits; then lower --batch-size (raise --grad-accum "
               "to keep the effective batch), lower --seq-len, add --gradient-checkpointing")
        if cfg.method != "qlora":
            fix += ", or use --method qlora"
        raise ResourceError(message, fix=fix) from None


def free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_memory() -> None:
    """Peak memory reported for a run is that run's, not the kernel's since it started."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def finish_run(trainer: Any, model: Any, counter: TokenCounter, metrics: dict[str, float], *, dtype: Any,
               batching: str, train_examples: int, eval_examples: int, tokenizer: Any, adapter_dir: Path | None,
               save_kwargs: dict[str, Any] | None = None, **extra: Any) -> TrainOutput:
    """Throughput and peak memory into ``metrics``, the run summary, and the adapter saved (rank 0): what supervised
    and preference training report alike."""
    metrics["train_tokens_per_s"] = counter.tokens / max(metrics.get("train_runtime_s", 0.0), 1e-9)
    metrics["peak_memory_mb"] = peak_memory_mb()
    optim = trainer.args.optim
    info = {"batching": batching, "optimizer": str(getattr(optim, "value", optim)),
            "steps": trainer.state.global_step, "tokens": counter.tokens, "dtype": str(dtype).replace("torch.", ""),
            **extra,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters()),
            "target_modules": sorted(model.peft_config["default"].target_modules),
            "train_examples": train_examples, "eval_examples": eval_examples}
    if adapter_dir is not None and trainer.is_world_process_zero():
        model.save_pretrained(str(adapter_dir), **(save_kwargs or {}))
        tokenizer.save_pretrained(str(adapter_dir))
    return TrainOutput(adapter_dir, metrics, info)


def release(trainer: Any, hook: Any) -> None:
    """Drop the trainer's hold on model and optimizer state (the caller then deletes its own names and calls
    :func:`free_memory`), so a finished or failed run gives its memory back to the kernel."""
    hook.remove()
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None


@dataclasses.dataclass
class TrainOutput:
    adapter_dir: Path | None
    metrics: dict[str, float]
    info: dict[str, Any]


def trainer_kwargs(cfg: FinetuneConfig, out_dir: Path, dtype: Any, *, has_eval: bool) -> dict[str, Any]:
    """TrainingArguments shared by supervised (Trainer) and preference (DPOTrainer) runs."""
    import torch

    cuda = torch.cuda.is_available()
    return dict(
        output_dir=str(out_dir), per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr, lr_scheduler_type=cfg.scheduler, warmup_steps=cfg.warmup_steps,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1, optim=choose_optimizer(cfg),
        logging_steps=cfg.log_every, save_strategy="steps" if cfg.checkpoint_every else "no",
        save_steps=cfg.checkpoint_every or 500, save_total_limit=cfg.keep_checkpoints,
        eval_strategy="steps" if cfg.eval_every and has_eval else "no", eval_steps=cfg.eval_every or None,
        seed=cfg.seed, data_seed=cfg.seed, report_to=[], disable_tqdm=True,
        gradient_checkpointing=False,  # enabled on the model by load_model when asked (peft/kbit-aware)
        bf16=cuda and dtype == torch.bfloat16, fp16=cuda and dtype == torch.float16, use_cpu=not cuda,
        dataloader_num_workers=0,
    )


def train(cfg: FinetuneConfig, model_path: Path, train_rows: list[dict], eval_rows: list[dict], out_dir: Path,
          reporter: Reporter, *, resume_from: Path | None = None, model_ref: str = "",
          adapter_dir: Path | None = None, callbacks: list | None = None) -> TrainOutput:
    """Run one training; write the adapter to ``adapter_dir`` (rank 0). Used in-process and by the workers."""
    from transformers import AutoTokenizer, PrinterCallback, Trainer, TrainingArguments

    dtype = resolve_dtype(cfg.dtype)
    reset_peak_memory()
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_ds = tokenize(train_rows, tokenizer, cfg.seq_len, cfg.completion_only_loss)
    eval_ds = tokenize(eval_rows, tokenizer, cfg.seq_len, cfg.completion_only_loss)
    if not train_ds:
        raise StageError("No training example has response tokens left after truncation.",
                         fix="raise --seq-len or check the dataset's prompt/completion fields")
    with oom_guard(cfg, model_ref or str(model_path)):
        model = load_model(cfg, model_path, dtype)
        choice = choose_batching(model, train_ds, cfg.packing, dtype)
        mode = choice.mode
        reporter.log(choice.describe())
        counter = TokenCounter()
        hook = model.register_forward_pre_hook(counter, with_kwargs=True)
        args = TrainingArguments(
            **trainer_kwargs(cfg, out_dir, dtype, has_eval=bool(eval_ds)), remove_unused_columns=False,
            train_sampling_strategy="group_by_length" if mode == "grouped" else "random",
            ddp_find_unused_parameters=False,
        )
        report = _callback_cls()(reporter, counter)
        trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds or None,
                          data_collator=Batcher(mode, tokenizer), callbacks=[report, *(callbacks or [])])
        trainer.remove_callback(PrinterCallback)  # metrics go to the reporter, not stdout
        try:
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            metrics: dict[str, float] = {"train_loss": float(result.training_loss),
                                         "train_runtime_s": float(result.metrics.get("train_runtime", 0.0))}
            if eval_ds:
                metrics["eval_loss"] = float(trainer.evaluate()["eval_loss"])
            return finish_run(trainer, model, counter, metrics, dtype=dtype, batching=mode,
                              train_examples=len(train_ds), eval_examples=len(eval_ds), tokenizer=tokenizer,
                              adapter_dir=adapter_dir)
        finally:
            release(trainer, hook)
            del trainer, model
            free_memory()


# -- the stage -------------------------------------------------------------------------------------------------------
def effective_config(ctx: RunContext) -> tuple[FinetuneConfig, dict[str, Any], Path | None]:
    """The config to train with: for ``--resume``, the interrupted run's training options and resolved inputs."""
    from llmops_jupyter.stages.finetune.stage import RESUME_FREE, FinetuneConfig

    cfg: FinetuneConfig = ctx.config
    if not cfg.resume:
        return cfg, {}, None
    src = ctx.registry.get_run(cfg.resume)
    if src["stage"] != "finetune":
        raise StageError(f"Run '{src['id']}' is a {src['stage']} run, not a finetune run.",
                         fix="pass the id of an interrupted finetune run (`%llmops runs --stage finetune`)")
    ckpt = last_checkpoint(ctx.registry, src["id"])
    if ckpt is None:
        raise StageError(f"Run '{src['id']}' has no complete checkpoint to resume from.",
                         fix="start it again without --resume (use --checkpoint-every to save progress)")
    params = {k: v for k, v in src["params"].items() if k not in RESUME_FREE and k in FinetuneConfig.field_names()}
    eff = FinetuneConfig.from_dict({**params, **{k: getattr(cfg, k) for k in RESUME_FREE}})
    pinned = {k: src["summary"].get(k) for k in ("dataset", "base_model_path") if src["summary"].get(k)}
    return eff, {"resumed_from": src["id"], "resumed_at_step": ckpt[0], **pinned}, ckpt[1]


def run_stage(ctx: RunContext) -> dict[str, Any]:
    """In-process (or accelerate-launched) training for a Runner run; saves the adapter artifact."""
    from llmops_jupyter.models.refs import use_model
    from llmops_jupyter.stages.data.format import load_dataset

    cfg, resumed, resume_ckpt = effective_config(ctx)
    model = use_model(ctx, resumed.get("base_model_path") or cfg.model)
    if model.kind != "base-model":
        raise StageError(f"--model '{cfg.model}' is a {model.kind}; LoRA needs a base model.",
                         fix="pass the base model (for an adapter: its merged model from `%llmops merge`)")
    data = load_dataset(resumed.get("dataset") or cfg.data, ctx.registry)
    if data.artifact is not None:
        ctx.use(data.artifact)
    folder = run_dir(ctx.registry, ctx.run_id)
    ctx.set_summary(**{**resumed, "method": cfg.method, "base_model": model.name, "base_model_path": str(model.path),
                       "dataset": data.artifact.hash if data.artifact else str(data.path),
                       "data_version": data.version, "checkpoints": str(folder / "checkpoints")})
    staging = ctx.staging_dir("adapter")
    if cfg.launcher == "accelerate":
        out = run_accelerate(ctx, cfg, model.path, data.path, folder, staging, resume_ckpt)
    elif cfg.method == "dpo":
        from llmops_jupyter.stages.finetune.dpo import check_pairs, train_dpo

        check_pairs(data.train, data.version)
        out = train_dpo(cfg, model.path, data.train, data.eval, folder / "checkpoints", ctx, resume_from=resume_ckpt,
                        model_ref=cfg.model, adapter_dir=staging)
    else:
        out = train(cfg, model.path, data.train, data.eval, folder / "checkpoints", ctx, resume_from=resume_ckpt,
                    model_ref=cfg.model, adapter_dir=staging)
    ctx.set_summary(**out.info)
    ctx.log_metrics({k: v for k, v in out.metrics.items() if k != "eval_loss"}, step=out.info.get("steps"))
    meta = {"base_model": model.name, "base_model_path": str(model.path),
            "base_model_hash": model.artifact.hash if model.artifact else None,
            "dataset": data.artifact.hash if data.artifact else None, "data_version": data.version,
            "method": cfg.method, "config": cfg.to_params(), "metrics": out.metrics, **out.info}
    (staging / "llmops_model.json").write_text(json.dumps(
        {"name": cfg.adapter_name or f"{model.name}-{cfg.method}", "base_model": model.name, "method": cfg.method,
         "data_version": data.version}, indent=2))
    art = ctx.save_artifact(staging, "adapter", name=cfg.adapter_name or f"{model.name}-{cfg.method}", meta=meta)
    from llmops_jupyter.stages.finetune.plots import training_figure

    fig = training_figure(ctx.registry.metric_history(ctx.run_id), title=f"finetune {ctx.run_id}")
    return {"adapter": art, "loss_figure": fig}


# -- accelerate launcher ---------------------------------------------------------------------------------------------
def accelerate_command(num_processes: int, spec: Path, *, cpu: bool, port: int | None = None) -> list[str]:
    """``accelerate launch`` command line for the training worker (one process per device).

    More than one process always goes through accelerate's distributed launcher (``--multi_gpu``, i.e.
    ``torch.distributed.run``): with ``--cpu`` accelerate falls back to a single process, while the distributed
    launcher on a CPU-only machine runs the ranks with the gloo backend (how the CPU test runs 2 processes).
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes > 1:
        cmd += ["--multi_gpu", "--main_process_port", str(port or _free_port())]
    elif cpu:
        cmd.append("--cpu")
    return [*cmd, "-m", "llmops_jupyter.stages.finetune.launch", "train", "--spec", str(spec)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FileReporter:
    """Reporter for worker processes: appends JSON events to a file the parent relays (rank 0 only)."""

    def __init__(self, path: Path):
        self.path = path
        self.rank0 = int(os.environ.get("RANK", 0)) == 0

    def _write(self, **event: Any) -> None:
        if self.rank0:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(event) + "\n")

    def progress(self, done: float, total: float | None = None, desc: str | None = None, **extra: Any) -> None:
        self._write(type="progress", done=done, total=total, desc=desc)

    def log_metrics(self, values: dict[str, float], step: int | None = None) -> None:
        self._write(type="metrics", values=values, step=step)

    def log(self, message: str) -> None:
        self._write(type="log", message=message)


def relay_events(path: Path, offset: int, ctx: Reporter) -> int:
    """Forward new complete lines of a worker's events file to ``ctx``; returns the new offset."""
    if not path.exists():
        return offset
    with open(path, encoding="utf-8") as fh:
        fh.seek(offset)
        while True:
            line = fh.readline()
            if not line.endswith("\n"):
                break
            offset += len(line.encode())
            ev = json.loads(line)
            if ev["type"] == "progress":
                ctx.progress(ev["done"], ev.get("total"), ev.get("desc"))
            elif ev["type"] == "metrics":
                ctx.log_metrics(ev["values"], ev.get("step"))
            elif ev["type"] == "log":
                ctx.log(ev["message"])
            elif ev["type"] == "result":
                return -offset - 1  # sentinel: result line reached (never negative otherwise)
    return offset


def run_accelerate(ctx: RunContext, cfg: FinetuneConfig, model_path: Path, data_path: Path, folder: Path,
                   adapter_dir: Path, resume_ckpt: Path | None) -> TrainOutput:
    """Train under ``accelerate launch``; relay rank 0's events to the run while waiting."""
    import torch

    events = folder / "events.jsonl"
    events.unlink(missing_ok=True)
    spec = folder / "accelerate-spec.json"
    atomic_write_json(spec, {"config": cfg.to_params(), "model_path": str(model_path), "data_path": str(data_path),
                             "out_dir": str(folder / "checkpoints"), "adapter_dir": str(adapter_dir),
                             "resume_from": str(resume_ckpt) if resume_ckpt else None, "events": str(events)})
    cmd = accelerate_command(cfg.num_processes, spec, cpu=not torch.cuda.is_available())
    ctx.log("launch: " + " ".join(cmd))
    log = folder / "accelerate.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    offset, result = 0, None
    try:
        while True:
            rc = proc.poll()
            new = relay_events(events, offset, ctx)
            if new < 0:
                result = _read_result(events)
                offset = -new - 1
            else:
                offset = new
            if rc is not None:
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait()
        raise
    if proc.returncode != 0 or result is None:
        tail = log.read_text(errors="replace")[-1500:]
        if "OutOfMemoryError" in tail:
            raise ResourceError(f"A worker ran out of GPU memory (see {log}).",
                                fix=f"run `%llmops plan --model {cfg.model}`; lower --batch-size or --seq-len")
        raise StageError(f"accelerate launch exited with code {proc.returncode}: ...{tail[-600:]}",
                         fix=f"see the full log at {log}")
    return TrainOutput(adapter_dir, result["metrics"], result["info"])


def _read_result(events: Path) -> dict[str, Any] | None:
    for line in events.read_text(encoding="utf-8").splitlines():
        ev = json.loads(line)
        if ev["type"] == "result":
            return ev
    return None


# -- detached runs ---------------------------------------------------------------------------------------------------
def worker_command(home: Path, run_id: str, parent_id: str, params: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "llmops_jupyter.stages.finetune.launch", "run", "--home", str(home), "--run-id", run_id,
            "--parent", parent_id, "--config", json.dumps(params)]


def launch_detached(ctx: RunContext) -> dict[str, Any]:
    """Start the training as its own run in a worker process, supervised by a thread that records its death."""
    import secrets

    cfg: FinetuneConfig = ctx.config
    child = f"finetune-{secrets.token_hex(4)}"
    params = {**cfg.to_params(), "detach": False}
    folder = run_dir(ctx.registry, child)
    log = folder / "worker.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(worker_command(ctx.registry.home, child, ctx.run_id, params), stdout=fh,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    handle = DetachedRun(ctx.registry.home, child, proc.pid, log, proc)
    threading.Thread(target=handle._supervise, name=f"llmops-supervise-{child}", daemon=True).start()
    ctx.set_summary(detached_run=child, worker_pid=proc.pid, worker_log=str(log))
    ctx.log(f"detached: run {child} in worker pid {proc.pid}")
    return {"run": handle}


def reap_dead_run(registry: Registry, run_id: str, *, returncode: int | None = None, log: Path | None = None) -> bool:
    """If ``run_id`` is still 'running' but its process is gone, mark it failed with why. Returns True if so."""
    from llmops_jupyter.registry import RunStatus

    try:
        run = registry.get_run(run_id)
    except NotFoundError:
        run = None
    if run is not None and run["status"] != RunStatus.RUNNING.value:
        return False
    if run is not None and returncode is None:
        if run["host"] != os.uname().nodename or pid_alive(run["pid"]):
            return False
    how = (f"killed by signal {signal.Signals(-returncode).name}" if returncode is not None and returncode < 0
           else f"exited with code {returncode}" if returncode is not None else "is gone")
    where = f"; see {log}" if log else ""
    error = f"worker process {how} before the run finished{where}"
    if run is None:
        registry.create_run("finetune", {}, run_id=run_id, status=RunStatus.FAILED)
    registry.finish_run(run_id, RunStatus.FAILED, error=error)
    return True


class DetachedRun:
    """Handle on a detached fine-tuning run: ``wait()``, ``stop()``; displays as its live view in a notebook."""

    def __init__(self, home: Path, run_id: str, pid: int, log: Path, proc: subprocess.Popen | None = None):
        self.home, self.run_id, self.pid, self.log, self.proc = Path(home), run_id, pid, log, proc
        self._done = threading.Event()

    def _registry(self) -> Registry:
        from llmops_jupyter.registry import Registry

        return Registry.open(self.home)

    def _supervise(self) -> None:
        rc = self.proc.wait()
        try:
            reap_dead_run(self._registry(), self.run_id, returncode=rc, log=self.log)
        finally:
            self._done.set()

    def status(self) -> str:
        try:
            return self._registry().get_run(self.run_id)["status"]
        except NotFoundError:
            return "starting"

    def wait(self, timeout: float | None = None, poll_s: float = 0.5) -> dict[str, Any]:
        """Block until the run ends; raise :class:`StageError` if it failed (e.g. the worker died)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.proc is None:
                reap_dead_run(self._registry(), self.run_id, log=self.log)
            if self.proc is None or self._done.is_set():
                st = self.status()
                if st not in ("running", "starting"):
                    break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {self.run_id} still {self.status()} after {timeout}s")
            time.sleep(poll_s)
        run = self._registry().get_run(self.run_id)
        if run["status"] == "failed":
            raise StageError(f"Detached run {self.run_id} failed: {run['error']}", fix=f"see {self.log}")
        return run

    def stop(self) -> None:
        """Interrupt the worker like Ctrl-C: it records 'interrupted' and keeps its last checkpoint."""
        if pid_alive(self.pid):
            os.kill(self.pid, signal.SIGINT)

    def __repr__(self) -> str:
        return (f"detached finetune run {self.run_id} (worker pid {self.pid}); watch it with "
                f"`%llmops attach {self.run_id}`, log: {self.log}")

    def _ipython_display_(self) -> None:
        from IPython.display import display

        from llmops_jupyter.stages.finetune.dashboard import RunWatcher

        display(repr(self))
        RunWatcher(self._registry(), self.run_id, front_end="magic", display=display).start()


def attach_run(cfg: AttachConfig, env: Any) -> Any:
    """Body of ``%llmops attach``: stop, wait (scripts) or live background view (notebooks)."""
    from llmops_jupyter.stages.finetune.dashboard import RunWatcher

    run = env.registry.get_run(cfg.run)
    if cfg.stop:
        if run["status"] != "running" or not pid_alive(run["pid"]) or run["host"] != os.uname().nodename:
            raise StageError(f"Run {run['id']} is not running on this machine (status {run['status']}).",
                             fix="nothing to stop; `%llmops runs` shows run states")
        os.kill(run["pid"], signal.SIGINT)
        return f"asked run {run['id']} (pid {run['pid']}) to stop; it keeps its last checkpoint"
    watcher = RunWatcher(env.registry, run["id"], front_end=env.front_end, display=env.display, poll_s=cfg.poll_s)
    if env.front_end == "cli":  # a terminal gets the final numbers, not a figure's JSON
        from llmops_jupyter.core.display import Table

        watcher.follow()
        metrics = env.registry.metrics(run["id"])
        return Table(["metric", "value"], sorted(metrics.items()), title=f"run {run['id']}: {watcher.status}")
    if cfg.wait or env.front_end != "magic":
        return watcher.follow()
    watcher.start()
    return None


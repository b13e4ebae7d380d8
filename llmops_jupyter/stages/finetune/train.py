"""The training-run template shared by supervised (:mod:`.sft`) and preference (:mod:`.dpo`) training.

Model loading (LoRA, or QLoRA on a bitsandbytes 4-bit NF4 base with ``prepare_model_for_kbit_training``), the
optimizer choice, ``TrainingArguments``, the reporter protocol and its callback, token counting, checkpoints and
exact resume, OOM advice, the run summary and releasing memory. SFT and DPO differ only in the data collation and
the trainer class (as papermill's engines share ``wrap_and_execute_notebook``). Imported lazily.

**Exact resume**: checkpoints go to ``<registry home>/runs/<run>/checkpoints``; the Trainer restores optimizer,
scheduler, RNG and data position, and a ``llmops-complete`` marker written after each save means a checkpoint
cut in half by Ctrl-C is never picked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from llmops_jupyter.core.errors import NotFoundError, ResourceError, StageError
from llmops_jupyter.core.runner import free_memory

if TYPE_CHECKING:
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.stages.finetune.config import FinetuneConfig


COMPLETE_MARKER = "llmops-complete"




class Reporter(Protocol):
    def progress(self, done: float, total: float | None = None, desc: str | None = None, **extra: Any) -> None: ...
    def log_metrics(self, values: dict[str, float], step: int | None = None) -> None: ...
    def log(self, message: str) -> None: ...


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


def clear_incomplete_checkpoints(folder: Path) -> list[Path]:
    """Remove checkpoint folders a killed process left half-written (no completion marker). Only for a run that
    has ended: a live trainer's newest checkpoint is incomplete while it is being saved."""
    import shutil

    gone = [p for p in folder.glob("checkpoint-*") if p.is_dir() and not (p / COMPLETE_MARKER).exists()]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


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


def resume_config(ctx: Any, cls: type, stage: str, *, free: tuple[str, ...], extend: tuple[str, ...],
                  pinned: tuple[str, ...]) -> tuple[Any, dict[str, Any], Path | None]:
    """``--resume`` for any training stage built on this template (finetune, distill): the interrupted run's
    training options (``free`` ones may change, ``extend`` ones may change to train longer, any other difference is
    refused), the summary keys in ``pinned`` (resolved inputs) and its newest complete checkpoint."""
    cfg = ctx.config
    if not cfg.resume:
        return cfg, {}, None
    src = ctx.registry.get_run(cfg.resume)
    if src["stage"] != stage:
        raise StageError(f"Run '{src['id']}' is a {src['stage']} run, not a {stage} run.",
                         fix=f"pass the id of an interrupted {stage} run (`%llmops runs --stage {stage}`)")
    if src["status"] == "running":
        raise StageError(f"Run '{src['id']}' is still running (pid {src['pid']} on {src['host']}).",
                         fix=f"stop it first (`%llmops attach {src['id']} --stop`), then resume it")
    clear_incomplete_checkpoints(run_dir(ctx.registry, src["id"]) / "checkpoints")
    ckpt = last_checkpoint(ctx.registry, src["id"])
    if ckpt is None:
        raise StageError(f"Run '{src['id']}' has no complete checkpoint to resume from.",
                         fix="start it again without --resume (use --checkpoint-every to save progress)")
    names = cls.field_names()
    src_cfg = cls.from_dict({k: v for k, v in src["params"].items() if k in names})
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else
                         f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
                for f in dataclasses.fields(cls)}
    changes: dict[str, list[Any]] = {}
    for name in names:
        if name in free:
            continue
        given, before = getattr(cfg, name), getattr(src_cfg, name)
        if given == defaults[name] or given == before:
            continue  # not given on the command line (a default), or the same value
        if name in extend:
            changes[name] = [before, given]
            continue
        flag = "--" + name.replace("_", "-")
        raise StageError(f"{flag} {given} differs from run {src['id']}'s {before}; a resumed run keeps its training "
                         "options.", fix=f"drop {flag} (the run used {before}), or start a new run without --resume")
    eff = dataclasses.replace(src_cfg, **{k: getattr(cfg, k) for k in free},
                              **{k: new for k, (_old, new) in changes.items()})
    if eff.max_steps and eff.max_steps <= ckpt[0]:
        raise StageError(f"--max-steps {eff.max_steps} is not past run {src['id']}'s last checkpoint (step {ckpt[0]}).",
                         fix=f"give --max-steps above {ckpt[0]} to train longer")
    kept = {k: src["summary"].get(k) for k in pinned if src["summary"].get(k)}
    recorded = {"resumed_from": src["id"], "resumed_at_step": ckpt[0], **kept}
    if changes:
        recorded["resume_changes"] = changes
        ctx.log("resume changes " + ", ".join(f"{k}: {a} → {b}" for k, (a, b) in changes.items()))
    return eff, recorded, ckpt[1]


def eval_subset(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most ``limit`` of the eval rows (0: all), evenly spaced over the split so every part of it (every held-out
    document of a text dataset, whose chunks are in document order) is scored, and the same rows on every call."""
    if not limit or len(rows) <= limit:
        return list(rows)
    return [rows[i * len(rows) // limit] for i in range(limit)]


def compute_dtype(name: str) -> Any:
    """The dtype to train in: ``auto`` = bfloat16 on GPUs that support it, else float32 (a checkpoint's saved dtype
    is :func:`llmops_jupyter.models.tools.checkpoint_dtype`)."""
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
    """QLoRA, DPO on a QLoRA base (``--method dpo --dpo-base qlora``) or RL with ``--peft qlora``: the frozen base
    is 4-bit NF4."""
    return (cfg.method == "qlora" or (cfg.method == "dpo" and getattr(cfg, "dpo_base", "lora") == "qlora")
            or getattr(cfg, "peft", None) == "qlora")


def load_model(cfg: FinetuneConfig, model_path: Path, dtype: Any, *, lora: bool = True) -> Any:
    """Base model (4-bit NF4 + double quantization for QLoRA) with LoRA adapters attached; ``lora=False``: the
    model itself, every weight trainable (full fine-tuning, e.g. a distillation student)."""
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
    if not lora:
        model.requires_grad_(True)
        return model
    extra: dict[str, Any] = {}
    if getattr(cfg, "train_embeddings", False):
        extra = embedding_modules(model)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type="CAUSAL_LM",
                      target_modules=resolve_target_modules(list(cfg.target_modules), model.config.model_type),
                      **extra)
    from llmops_jupyter.models.inference import without_gptqmodel  # GPTQModel only for a GPTQ base

    with without_gptqmodel(model):
        return get_peft_model(model, lora)


def embedding_modules(model: Any) -> dict[str, Any]:
    """LoraConfig arguments that train the input embeddings and output layer in full (peft ``modules_to_save``), as
    Unsloth's continued-pretraining notebook does; a model whose output layer shares the embedding matrix keeps
    sharing it (``ensure_weight_tying``), so one matrix is trained, not two drifting copies."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    names = [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and (m is inp or m is out)]
    tied = out is not None and getattr(out, "weight", None) is getattr(inp, "weight", None)
    return {"modules_to_save": names, "ensure_weight_tying": tied}


def is_embedding_param(name: str) -> bool:
    """A parameter --train-embeddings trains (peft's trainable copy of embed_tokens / lm_head)."""
    return ".modules_to_save." in name


def split_embedding_lr(optimizer: Any, model: Any, lr: float) -> int:
    """Move the embedding parameters of every optimizer group into a group of their own at ``lr`` (the schedule then
    scales both groups alike). Done once, right after the optimizer is built and before any step, so resumed runs
    build the same groups. Returns how many parameters moved."""
    emb = {id(p) for n, p in model.named_parameters() if p.requires_grad and is_embedding_param(n)}
    moved = 0
    for group in list(optimizer.param_groups):
        mine = [p for p in group["params"] if id(p) in emb]
        if mine:
            group["params"] = [p for p in group["params"] if id(p) not in emb]
            optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": mine,
                                       "lr": lr, "initial_lr": lr})
            moved += len(mine)
    return moved


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


def real_tokens(position_ids: Any) -> int:
    """Non-padding tokens of a packed batch: positions > 0, plus each example's first token (a 0 followed by a 1);
    padding is a run of zeros (see :func:`.sft.packed_batch`). Rows without padding count every token."""
    pos = position_ids if position_ids.dim() > 1 else position_ids[None]
    if not pos.numel():
        return 0
    starts = (pos[:, :-1] == 0) & (pos[:, 1:] == 1)
    return int((pos > 0).sum()) + int(starts.sum())


class TokenCounter:
    """Counts real (non-padding) tokens and all positions (padding included) of every training forward pass: the
    numerator of tokens/s and the padding-waste share. Every batch layout is counted the same way: a 2-D attention
    mask's ones, packed rows' real tokens from their ``position_ids``, else every id."""

    def __init__(self) -> None:
        self.tokens = 0
        self.positions = 0

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> None:
        import torch

        if not torch.is_grad_enabled():
            return  # evaluation
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        pos = kwargs.get("position_ids")
        if mask is not None and mask.dim() == 2:
            self.tokens += int(mask.sum())
            self.positions += int(mask.numel())
        elif mask is None and pos is not None and ids is not None:
            n = real_tokens(pos.expand(ids.shape[0], -1) if pos.shape[0] != ids.shape[0] else pos)
            self.tokens += n
            self.positions += int(ids.numel())
        elif ids is not None:
            self.tokens += int(ids.numel())
            self.positions += int(ids.numel())

    @property
    def padding_pct(self) -> float:
        return 100.0 * (1 - self.tokens / self.positions) if self.positions else 0.0


def efficiency(model: Any) -> dict[str, Any]:
    """What MFU needs: training FLOPs per token (and the rule, 4N for LoRA) and the device's peak (None on CPU)."""
    from llmops_jupyter.stages.finetune.kernels import flops_per_token, peak_tflops

    fpt, rule = flops_per_token(model, lora=True)
    return {"flops_per_token": fpt, "flops_rule": rule, "peak_tflops": peak_tflops()}


def mfu_pct(tokens_per_s: float, flops_per_token: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation in % (None without a known peak, e.g. on CPU)."""
    if not peak_tflops:
        return None
    return 100.0 * tokens_per_s * flops_per_token / (peak_tflops * 1e12)


def _wall() -> float:
    """The step timer's wall clock (a function of this module, so a test can inject a known step time)."""
    return time.perf_counter()


def _cpu() -> float:
    """The step timer's CPU clock: this process's CPU seconds (all threads), which other load does not stretch."""
    return time.process_time()


class StepTimer:
    """Wall and CPU seconds of every optimizer step, what ``plan --cost --run`` calibrates on.

    A step is the time from the end of the previous step (or from the start of the training loop) to the end of
    this one, so it includes fetching its batch and logging; an evaluation or a checkpoint save in between is taken
    out and recorded as its own part. The first step (allocation, lazy initialisation) is reported apart from the
    others (``first_step_s``); each logging step reports the *median* of the steps since the last one (``step_s``,
    ``step_cpu_s``), their count (``steps_timed``) and their mean real tokens per step (``step_tokens``)."""

    def __init__(self) -> None:
        self.mark: tuple[float, float] | None = None
        self.start: tuple[float, float] | None = None
        self.first: tuple[float, float] | None = None
        self.first_reported = False
        self.walls: list[float] = []
        self.cpus: list[float] = []
        self.tokens: list[int] = []
        self.tokens_mark = 0
        self.ended = False

    @staticmethod
    def now() -> tuple[float, float]:
        return _wall(), _cpu()

    def begin(self, tokens: int) -> None:
        self.mark = self.start = self.now()
        self.tokens_mark = tokens

    def _since_mark(self) -> tuple[float, float]:
        now = self.now()
        if self.mark is None:
            self.mark = self.start = now
        d = (now[0] - self.mark[0], now[1] - self.mark[1])
        self.mark = now
        return d

    def step_end(self, tokens: int) -> None:
        wall, cpu = self._since_mark()
        if self.first is None:
            self.first = (wall, cpu)
        else:
            self.walls.append(wall)
            self.cpus.append(cpu)
            self.tokens.append(tokens - self.tokens_mark)
        self.tokens_mark = tokens

    def pause(self, kind: str) -> dict[str, float]:
        """An evaluation or a checkpoint save (``kind``) has just ended: its seconds, not counted in any step."""
        wall, cpu = self._since_mark()
        return {f"{kind}_s": wall, f"{kind}_cpu_s": cpu}

    def flush(self) -> dict[str, float]:
        """The timings to log at a logging step (and forget)."""
        import statistics

        out: dict[str, float] = {}
        if self.first is not None and not self.first_reported:
            out.update(first_step_s=self.first[0], first_step_cpu_s=self.first[1])
            self.first_reported = True
        if self.walls:
            out.update(step_s=statistics.median(self.walls), step_cpu_s=statistics.median(self.cpus),
                       steps_timed=float(len(self.walls)), step_tokens=sum(self.tokens) / len(self.tokens))
        self.walls, self.cpus, self.tokens = [], [], []
        return out

    def end(self) -> float | None:
        """The training loop ended: its CPU seconds (``None`` if it never began). Pauses after it are the run's
        finishing work (the final evaluation), recorded as ``final_eval_s``."""
        if self.start is None:
            return None
        self.ended = True
        self.mark = self.now()
        return self.mark[1] - self.start[1]


def _callback_cls():
    from transformers import TrainerCallback

    class ReportCallback(TrainerCallback):
        """Trainer → reporter: progress every step, metrics every logging step, checkpoint completion marker."""

        def __init__(self, reporter: Reporter, counter: TokenCounter, *, batching: str | None = None,
                     kernel: str | None = None, flops_per_token: float = 0.0, flops_rule: str = "",
                     peak_tflops: float | None = None, desc: str = "finetune"):
            self.reporter, self.counter = reporter, counter
            self.desc = desc
            self.last_t = time.perf_counter()
            self.last_tokens = self.last_positions = 0
            self.train_loss: float | None = None
            self.fpt, self.peak = flops_per_token, peak_tflops
            self.timer = StepTimer()
            # shown by the dashboard's status line with every progress event
            self.tags = {k: v for k, v in (("batching", batching), ("kernel", kernel),
                                           ("flops_rule", flops_rule if peak_tflops else None)) if v}

        def on_train_begin(self, args, state, control, **kw):
            self.last_t, self.last_tokens = time.perf_counter(), self.counter.tokens
            self.timer.begin(self.counter.tokens)
            self.reporter.progress(state.global_step, state.max_steps, desc=self.desc, **self.tags)

        def on_step_begin(self, args, state, control, **kw):
            if getattr(self, "_first", True):  # after a resume, skipped batches were counted: start fresh
                self._first = False
                self.last_t, self.last_tokens = time.perf_counter(), self.counter.tokens
                self.last_positions = self.counter.positions

        def on_step_end(self, args, state, control, **kw):
            self.timer.step_end(self.counter.tokens)
            self.reporter.progress(state.global_step, state.max_steps, desc=self.desc, **self.tags)
            poll = getattr(self.reporter, "poll_stop", None)  # a worker's reporter: look for the parent's request
            if poll is not None:
                poll()
            self._maybe_stop(control)

        def on_evaluate(self, args, state, control, **kw):
            self._log_pause("eval", state)
            self._maybe_stop(control)

        def on_train_end(self, args, state, control, **kw):
            cpu = self.timer.end()
            if cpu is not None and state.is_world_process_zero:
                self.reporter.log_metrics({"train_cpu_s": cpu}, step=state.global_step)

        def _log_pause(self, kind: str, state) -> None:
            values = self.timer.pause(("final_" if self.timer.ended else "") + kind)  # after the loop: its own part
            if state.is_world_process_zero:
                self.reporter.log_metrics(values, step=state.global_step)

        def _maybe_stop(self, control) -> None:
            """A listener asked the run to stop early (e.g. a search's pruner): end training cleanly here."""
            if getattr(self.reporter, "stop_reason", None):
                control.should_training_stop = True

        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.exists():
                    (folder / COMPLETE_MARKER).write_text(str(state.global_step))
            self._log_pause("save", state)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            values: dict[str, float] = {}
            if "loss" in logs:
                now = time.perf_counter()
                values["loss"] = logs["loss"]
                values["lr"] = logs.get("learning_rate")
                if logs.get("grad_norm") is not None:
                    values["grad_norm"] = logs["grad_norm"]
                tokens = self.counter.tokens - self.last_tokens
                values["tokens_per_s"] = tokens / max(now - self.last_t, 1e-9)
                positions = self.counter.positions - self.last_positions
                if positions:
                    values["padding_pct"] = 100.0 * (1 - tokens / positions)
                values["mfu_pct"] = mfu_pct(values["tokens_per_s"], self.fpt, self.peak)
                values["memory_mb"] = peak_memory_mb()
                values["epoch"] = logs.get("epoch")
                values.update(self.timer.flush())
                self.last_t, self.last_tokens, self.last_positions = now, self.counter.tokens, self.counter.positions
            if "eval_loss" in logs:
                values["eval_loss"] = logs["eval_loss"]
            # preference tuning (DPO): rewards and log-probs per logging step and per evaluation
            values.update({k: v for k, v in logs.items()
                           if k.startswith(("rewards/", "logps/", "eval_rewards/", "eval_logps/"))})
            # distillation: agreement with the teacher per evaluation
            values.update({k: v for k, v in logs.items() if k.startswith(("eval_kl_", "eval_top1_", "eval_ppl"))})
            if "train_loss" in logs:
                self.train_loss = logs["train_loss"]
            values = {k: float(v) for k, v in values.items() if v is not None}
            if values and state.is_world_process_zero:
                self.reporter.log_metrics(values, step=state.global_step)
            self._maybe_stop(control)  # a listener may decide on the metrics just logged (eval loss → pruner)

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


def reset_peak_memory() -> None:
    """Peak memory reported for a run is that run's, not the kernel's since it started."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def finish_run(trainer: Any, model: Any, counter: TokenCounter, metrics: dict[str, float], *, dtype: Any,
               batching: str, train_examples: int, eval_examples: int, tokenizer: Any, adapter_dir: Path | None,
               save_kwargs: dict[str, Any] | None = None, efficiency: dict[str, Any] | None = None,
               **extra: Any) -> TrainOutput:
    """Throughput, padding waste, MFU (GPU) and peak memory into ``metrics``, the run summary, and the adapter saved
    (rank 0): what supervised and preference training report alike."""
    metrics["train_tokens_per_s"] = counter.tokens / max(metrics.get("train_runtime_s", 0.0), 1e-9)
    metrics["padding_waste_pct"] = counter.padding_pct
    metrics["peak_memory_mb"] = peak_memory_mb()
    if efficiency:
        mfu = mfu_pct(metrics["train_tokens_per_s"], efficiency["flops_per_token"], efficiency["peak_tflops"])
        if mfu is not None:
            metrics["mfu_pct"] = mfu
        extra = {**extra, "flops_per_token": efficiency["flops_per_token"], "peak_tflops": efficiency["peak_tflops"],
                 "mfu_rule": f"{efficiency['flops_rule']} FLOPs/token (LoRA: frozen base, no weight gradients), "
                             + (f"peak {efficiency['peak_tflops']:g} TFLOP/s bf16" if efficiency["peak_tflops"]
                                else "no MFU: no known accelerator peak (CPU)")}
    optim = trainer.args.optim
    info = {"batching": batching, "optimizer": str(getattr(optim, "value", optim)),
            "steps": trainer.state.global_step, "tokens": counter.tokens, "positions": counter.positions,
            "padding_waste_pct": round(counter.padding_pct, 2),
            **({"mfu_pct": round(metrics["mfu_pct"], 2)} if "mfu_pct" in metrics else {}),
            "dtype": str(dtype).replace("torch.", ""),
            **extra,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters()),
            "target_modules": (sorted(model.peft_config["default"].target_modules)
                               if getattr(model, "peft_config", None) else "all (full fine-tuning)"),
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
        eval_strategy="steps" if getattr(cfg, "eval_every", 0) and has_eval else "no",
        eval_steps=getattr(cfg, "eval_every", 0) or None,
        seed=cfg.seed, data_seed=cfg.seed, report_to=[], disable_tqdm=True,
        gradient_checkpointing=False,  # enabled on the model by load_model when asked (peft/kbit-aware)
        bf16=cuda and dtype == torch.bfloat16, fp16=cuda and dtype == torch.float16, use_cpu=not cuda,
        dataloader_num_workers=0,
    )

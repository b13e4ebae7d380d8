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
    finish_run,
    free_memory,
    load_model,
    oom_guard,
    release,
    reset_peak_memory,
    resolve_dtype,
    trainer_kwargs,
)


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

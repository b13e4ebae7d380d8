"""Distillation engine behind ``%llmops distill`` (imported lazily: torch, transformers, peft live here).

It is the training template of :mod:`llmops_jupyter.stages.finetune.train` (model loading with LoRA / QLoRA or full
weights, optimizer choice, ``TrainingArguments``, the reporter callback that feeds the live dashboard, checkpoints
with completion markers, exact resume, OOM advice, the run summary) with one trainer subclass: the loss is the
divergence between teacher and student next-token distributions instead of cross-entropy on the labels.

**Chunked over the sequence.** Full-vocabulary logits are the memory peak of distillation (batch × length × vocab
floats, twice: teacher and student). The loss runs the two decoders once, then goes over the scored positions in
chunks of ``chunk_size``: each chunk's student and teacher logits are computed from the hidden states, turned into
the loss and dropped; the chunk is wrapped in activation checkpointing, so the backward pass recomputes its logits
instead of keeping them. Peak logit memory is ``chunk × vocab`` per model whatever the batch and sequence length.

**Teacher**: loaded once, ``eval()``, ``requires_grad_(False)``, run under ``torch.no_grad()``.

TRL 1.16 has ``GKDTrainer`` (``lmbda=0`` = offline logit distillation) and the on-policy ``DistillationTrainer``;
both materialise the whole ``[batch, length, vocab]`` logits of both models, which is what the chunking avoids, so
the off-policy path here is this small trainer subclass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmops_jupyter.stages.distill.stage import DistillConfig
    from llmops_jupyter.stages.finetune.train import Reporter, TrainOutput

LOSSES = ("forward_kl", "reverse_kl", "jsd")


def token_divergence(s_logits: Any, t_logits: Any, loss: str) -> Any:
    """Per-position divergence ``[N]`` between student and teacher distributions given as logits ``[N, V]``.

    forward_kl = KL(teacher ‖ student) (mean-seeking: the usual KD loss); reverse_kl = KL(student ‖ teacher)
    (mode-seeking); jsd = the Jensen-Shannon divergence with β = ½ (bounded, symmetric)."""
    import torch

    log_s = torch.log_softmax(s_logits.float(), dim=-1)
    log_t = torch.log_softmax(t_logits.float(), dim=-1)
    if loss == "forward_kl":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if loss == "reverse_kl":
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    log_m = torch.logsumexp(torch.stack([log_s, log_t]), dim=0) - math.log(2.0)
    return 0.5 * (log_t.exp() * (log_t - log_m)).sum(-1) + 0.5 * (log_s.exp() * (log_s - log_m)).sum(-1)


def parts(model: Any) -> tuple[Any, Any]:
    """(decoder, output head) of a causal LM, through a peft wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    return decoder, base.get_output_embeddings()


def chunked_loss(h_s: Any, h_t: Any, head_s: Any, head_t: Any, targets: Any, *, loss: str, temperature: float,
                 chunk_size: int, ce_weight: float = 0.0, checkpoint: bool = True) -> tuple[Any, int]:
    """Sum over the scored positions of ``T² · divergence(student/T, teacher/T)`` (+ ``ce_weight`` · CE on the
    targets), computed ``chunk_size`` positions at a time. ``h_*`` are ``[B, L, H]`` hidden states of the positions
    that predict ``targets`` ``[B, L]`` (−100 = not scored). Returns (loss sum, scored positions)."""
    import torch
    from torch.utils.checkpoint import checkpoint as ckpt

    flat_s = h_s.reshape(-1, h_s.shape[-1])
    flat_t = h_t.reshape(-1, h_t.shape[-1])
    flat_y = targets.reshape(-1)
    keep = (flat_y != -100).nonzero(as_tuple=True)[0]
    total = h_s.new_zeros((), dtype=torch.float32)
    n = int(keep.numel())

    def piece(hs: Any, ht: Any, y: Any) -> Any:
        raw = head_s(hs)
        with torch.no_grad():
            t = head_t(ht).float() / temperature
        out = (temperature ** 2) * token_divergence(raw.float() / temperature, t, loss).sum()
        if ce_weight:
            out = out + ce_weight * torch.nn.functional.cross_entropy(raw.float(), y, reduction="sum")
        return out

    for start in range(0, n, chunk_size):
        idx = keep[start:start + chunk_size]
        args = (flat_s[idx], flat_t[idx], flat_y[idx])
        total = total + (ckpt(piece, *args, use_reentrant=False) if checkpoint and torch.is_grad_enabled()
                         else piece(*args))
    return total, n


def _trainer_cls():
    import torch
    from transformers import Trainer

    class DistillTrainer(Trainer):
        """``Trainer`` whose loss is the chunked teacher-student divergence (see module docstring)."""

        def __init__(self, *args: Any, teacher: Any, kd: dict[str, Any], metric_rows: list | None = None,
                     pad_id: int = 0, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.teacher, self.kd, self.metric_rows, self.pad_id = teacher, kd, metric_rows, pad_id

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"]
            dec_s, head_s = parts(model)
            dec_t, head_t = parts(self.teacher)
            h_s = dec_s(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            with torch.no_grad():
                h_t = dec_t(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            total, n = chunked_loss(h_s[:, :-1], h_t[:, :-1], head_s, head_t, labels[:, 1:], **self.kd)
            denom = num_items_in_batch if num_items_in_batch is not None else max(n, 1)
            if isinstance(denom, torch.Tensor):
                denom = denom.to(total.device)
            value = total / denom
            return (value, {}) if return_outputs else value

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            result = super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys,
                                      metric_key_prefix=metric_key_prefix)
            if self.metric_rows and metric_key_prefix == "eval":
                m = agreement(self.model, self.teacher, self.metric_rows, self.args.per_device_eval_batch_size,
                              self.pad_id)
                extra = {"eval_kl_to_teacher": m["kl_to_teacher"], "eval_top1_agreement": m["top1_agreement"],
                         "eval_ppl": m["perplexity"]}
                self.log(extra)
                result.update(extra)
            return result

    return DistillTrainer


def agreement(student: Any, teacher: Any, rows: list[dict[str, Any]], batch_size: int = 8,
              pad_id: int = 0) -> dict[str, Any]:
    """Teacher agreement of the student on tokenized ``rows`` (``input_ids``/``labels``): ``kl_to_teacher`` (forward
    KL at T = 1, token mean), ``top1_agreement`` (share of positions with the same argmax), ``perplexity`` of both,
    and per-example ``nll``/``n_tokens`` rows (what a perplexity gate pairs)."""
    import torch

    was_training = student.training
    student.eval()
    dec_s, head_s = parts(student)
    dec_t, head_t = parts(teacher)
    device = next(student.parameters()).device
    kl = agree = tokens = 0.0
    nll_s = nll_t = 0.0
    per_s: list[dict[str, float]] = []
    per_t: list[dict[str, float]] = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(r["input_ids"]) for r in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            lab = torch.full((len(chunk), width), -100, dtype=torch.long)
            att = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, r in enumerate(chunk):
                n = len(r["input_ids"])
                ids[i, :n] = torch.tensor(r["input_ids"])
                lab[i, :n] = torch.tensor(r["labels"])
                att[i, :n] = 1
            ids, lab, att = ids.to(device), lab.to(device), att.to(device)
            hs = dec_s(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state[:, :-1]
            ht = dec_t(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state[:, :-1]
            y = lab[:, 1:]
            for i in range(len(chunk)):
                keep = (y[i] != -100).nonzero(as_tuple=True)[0]
                if not keep.numel():
                    continue
                ls, lt = head_s(hs[i, keep]).float(), head_t(ht[i, keep]).float()
                kl += float(token_divergence(ls, lt, "forward_kl").sum())
                agree += float((ls.argmax(-1) == lt.argmax(-1)).sum())
                es = float(torch.nn.functional.cross_entropy(ls, y[i, keep], reduction="sum"))
                et = float(torch.nn.functional.cross_entropy(lt, y[i, keep], reduction="sum"))
                nll_s, nll_t = nll_s + es, nll_t + et
                tokens += keep.numel()
                per_s.append({"nll": es, "n_tokens": float(keep.numel())})
                per_t.append({"nll": et, "n_tokens": float(keep.numel())})
    if was_training:
        student.train()
    t = max(tokens, 1.0)
    return {"kl_to_teacher": kl / t, "top1_agreement": agree / t, "perplexity": math.exp(nll_s / t),
            "teacher_perplexity": math.exp(nll_t / t), "tokens": int(tokens), "rows_student": per_s,
            "rows_teacher": per_t}


def load_teacher(path: Path, dtype: Any) -> Any:
    """The teacher: loaded once, eval mode, no gradients."""
    import torch
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    if torch.cuda.is_available():
        teacher.to("cuda")
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def train_distill(cfg: DistillConfig, student_path: Path, teacher_path: Path, train_rows: list[dict],
                  eval_rows: list[dict], out_dir: Path, reporter: Reporter, *, resume_from: Path | None = None,
                  model_ref: str = "", save_dir: Callable[[], Path]) -> TrainOutput:
    """Distil the teacher into the student on the dataset's texts; writes the full student checkpoint (LoRA/QLoRA
    merged into full-precision weights) to the folder ``save_dir()`` makes after training (a process killed while
    training leaves no staging folder behind); returned as ``adapter_dir`` of the output."""
    import datasets
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, PrinterCallback, TrainingArguments

    from llmops_jupyter.stages.finetune.sft import tokenize
    from llmops_jupyter.stages.finetune.train import (
        TokenCounter,
        _callback_cls,
        compute_dtype,
        finish_run,
        free_memory,
        load_model,
        oom_guard,
        release,
        reset_peak_memory,
        trainer_kwargs,
    )

    dtype = compute_dtype(cfg.dtype)
    reset_peak_memory()
    tokenizer = AutoTokenizer.from_pretrained(str(student_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_tok = tokenize(train_rows, tokenizer, cfg.seq_len, cfg.completion_only_loss)
    eval_tok = tokenize(eval_rows, tokenizer, cfg.seq_len, cfg.completion_only_loss)
    if not train_tok:
        from llmops_jupyter.core.errors import DataError

        raise DataError("distill: no training example has two or more tokens after tokenization.",
                        fix="check --data and --seq-len")
    train_ds = datasets.Dataset.from_list(train_tok)
    eval_ds = datasets.Dataset.from_list(eval_tok) if eval_tok else None
    pad = tokenizer.pad_token_id or 0
    with oom_guard(cfg, model_ref or str(student_path)):
        teacher = load_teacher(teacher_path, dtype)
        model = load_model(cfg, student_path, dtype, lora=cfg.method != "full")
        counter = TokenCounter()
        hook = parts(model)[0].register_forward_pre_hook(counter, with_kwargs=True)
        targs = TrainingArguments(**trainer_kwargs(cfg, out_dir, dtype, has_eval=eval_ds is not None),
                                  prediction_loss_only=True, remove_unused_columns=False)
        report = _callback_cls()(reporter, counter)
        kd = {"loss": cfg.loss, "temperature": cfg.temperature, "chunk_size": cfg.chunk_size,
              "ce_weight": cfg.ce_weight}
        collate = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
        trainer = _trainer_cls()(model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
                                 data_collator=collate, processing_class=tokenizer, callbacks=[report],
                                 teacher=teacher, kd=kd, metric_rows=eval_tok or None, pad_id=pad)
        trainer.remove_callback(PrinterCallback)
        try:
            start = agreement(model, teacher, eval_tok, cfg.batch_size, pad) if eval_tok and not resume_from else {}
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            metrics: dict[str, float] = {"train_loss": float(result.training_loss),
                                         "train_runtime_s": float(result.metrics.get("train_runtime", 0.0))}
            if eval_ds is not None:
                metrics["eval_loss"] = float(trainer.evaluate()["eval_loss"])
            out = finish_run(trainer, model, counter, metrics, dtype=dtype, batching="padded (distill)",
                             train_examples=len(train_ds), eval_examples=len(eval_tok), tokenizer=tokenizer,
                             adapter_dir=None, loss=cfg.loss, temperature=cfg.temperature,
                             chunk_size=cfg.chunk_size, student_method=cfg.method)
            out.adapter_dir = save_dir()
            final = _save_student(cfg, model, student_path, out.adapter_dir, dtype, tokenizer)
            end = agreement(final, teacher, eval_tok, cfg.batch_size, pad) if eval_tok else {}
            del final
            for key in ("kl_to_teacher", "top1_agreement", "perplexity", "teacher_perplexity"):
                if key in end:
                    out.metrics[key] = float(end[key])
                if key in start and key != "teacher_perplexity":
                    out.metrics[f"{key}_start"] = float(start[key])
            out.info["gate_rows"] = {"student": end.get("rows_student", []), "teacher": end.get("rows_teacher", [])}
            return out
        finally:
            release(trainer, hook)
            del trainer, model, teacher
            free_memory()


def _save_student(cfg: DistillConfig, model: Any, student_path: Path, save_dir: Path, dtype: Any,
                  tokenizer: Any) -> Any:
    """Write the student as a full checkpoint and return it in memory: a LoRA student is merged; a QLoRA student's
    adapter is merged into the NF4 round trip of the full-precision base (the weights it was trained against)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    if cfg.method == "full":
        final = model
    elif cfg.method == "lora":
        final = model.merge_and_unload()
    else:
        from peft import PeftModel

        from llmops_jupyter.stages.merge.stage import nf4_roundtrip

        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            base = AutoModelForCausalLM.from_pretrained(str(student_path), dtype=dtype)
            nf4_roundtrip(base)
            final = PeftModel.from_pretrained(base, tmp).merge_and_unload()
    final.eval()
    if hasattr(final.config, "use_cache"):
        final.config.use_cache = True
    final.save_pretrained(str(save_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(save_dir))
    return final

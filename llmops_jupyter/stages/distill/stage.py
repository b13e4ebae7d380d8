"""``%llmops distill``: logit distillation from a teacher into a (pruned, smaller) student, behind an optional gate.

The usual chain is ``prune`` → ``distill`` (teacher = the unpruned model) → gate → ``quantize`` / ``gguf``; the
student's lineage then reads merged → pruned → distilled → gptq/gguf. Training is the fine-tuning template
(:mod:`llmops_jupyter.stages.finetune.train`): the same live dashboard, checkpoints every ``--checkpoint-every``
steps, ``--resume <run>`` that continues exactly, Ctrl-C that keeps the last checkpoint. The engine
(:mod:`llmops_jupyter.stages.distill.engine`) computes forward KL, reverse KL or JSD at ``--temperature`` chunked
over the sequence, with the teacher frozen, in eval mode and without gradients.

Three ways to learn from the teacher: ``--mode logits`` (default) matches its next-token distributions on the
dataset's texts; ``--mode sequence`` has the teacher answer the train prompts (greedy, the batched generation of
:mod:`llmops_jupyter.models.inference`), stores the answers as a dataset artifact (lineage teacher → answers →
distilled) and trains the student with cross-entropy on them; ``--on-policy`` runs TRL's ``DistillationTrainer``
(the student samples answers, the teacher scores every token of them). All three keep the dashboard, checkpoints
and ``--resume``.

The student is trained fully (``--method full``) or with LoRA / QLoRA adapters that are merged at the end, so the
result is always a full checkpoint (``distilled``) that quantize and GGUF export read directly.

Reported: ``kl_to_teacher`` (forward KL at T = 1 on the eval split), ``top1_agreement`` with the teacher,
``perplexity`` of student and teacher (each before and after), size and greedy tokens/s of teacher and student.
``--gate "perplexity<=+10%"`` compares the student with the teacher on the same eval examples (paired bootstrap, as
``eval`` gates do) and fails the cell after everything is stored.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.display import Table, fmt_num, fmt_tps
from llmops_jupyter.core.errors import ConfigError, require
from llmops_jupyter.core.stage import Stage, register_stage
from llmops_jupyter.models import tools as mt
from llmops_jupyter.stages.finetune.config import OPTIMIZERS, SCHEDULERS

if TYPE_CHECKING:
    from llmops_jupyter.core.runner import RunContext
    from llmops_jupyter.models.refs import ModelRef

LOSSES = ("forward_kl", "reverse_kl", "jsd")


@dataclasses.dataclass
class DistillConfig(StageConfig):
    teacher: str | None = option(None, "teacher model: a merge/prune/distill run, a model artifact, a checkpoint folder or a "
                               "provider name (usually the unpruned model)")
    student: str | None = option(None, "student model to train: a prune run, a model artifact, a checkpoint folder or a "
                               "provider name; must share the teacher's tokenizer")
    data: str = option("data@latest", "dataset whose texts the student learns the teacher's distributions on")
    loss: str = option("forward_kl", "forward_kl = KL(teacher‖student) (standard KD), reverse_kl = KL(student‖"
                                     "teacher) (mode-seeking), jsd = Jensen-Shannon (β = ½)", choices=LOSSES)
    temperature: float = option(1.0, "softmax temperature of both distributions (the loss is scaled by T²)", min=0,
                                min_exclusive=True, max=100)
    ce_weight: float = option(0.0, "add this times cross-entropy on the dataset's tokens to the distillation loss",
                              min=0)
    chunk_size: int = option(128, "positions per loss chunk: teacher and student logits exist for this many "
                                  "positions at a time (memory), recomputed in the backward pass", min=1,
                             max=1_048_576)
    mode: str = option("logits", "logits: match the teacher's next-token distributions on the dataset's texts; "
                                 "sequence: the teacher answers the train prompts (greedy, batched generation; stored "
                                 "as a dataset artifact) and the student is trained with cross-entropy on those "
                                 "answers", choices=("logits", "sequence"))
    on_policy: bool = option(False, "on-policy distillation through TRL's DistillationTrainer: the student samples "
                                    "answers to the train prompts and learns the teacher's distributions on them "
                                    "(--loss sets TRL's beta: forward_kl 0, jsd 0.5, reverse_kl 1)")
    max_new_tokens: int = option(64, "tokens generated per train prompt: the teacher's answers (--mode sequence) or "
                                     "the student's samples (--on-policy)", min=1, max=32768)
    method: str = option("full", "train the student fully, or with LoRA / QLoRA (4-bit NF4 base) adapters merged "
                                 "into full-precision weights at the end", choices=("full", "lora", "qlora"))
    dtype: str = option("auto", "compute dtype (auto: bfloat16 on GPUs that support it, else float32)",
                        choices=("auto", "float32", "bfloat16", "float16"))
    rank: int = option(16, "LoRA rank (with --method lora/qlora)", min=1, max=4096, aliases=["lora_r"])
    alpha: float = option(32.0, "LoRA alpha", min=0, min_exclusive=True, aliases=["lora_alpha"])
    dropout: float = option(0.05, "LoRA dropout", min=0, max=0.9, aliases=["lora_dropout"])
    target_modules: list[str] = option(["auto"], "LoRA target modules ('auto' = every linear projection)")
    lr: float = option(1e-4, "peak learning rate", min=0, min_exclusive=True, max=1.0)
    scheduler: str = option("cosine", "learning-rate schedule", choices=SCHEDULERS)
    warmup_steps: int = option(0, "linear warm-up steps", min=0)
    optim: str = option("auto", "optimizer (auto: AdamW; 8-bit AdamW for qlora)", choices=OPTIMIZERS)
    epochs: float = option(1.0, "passes over the training split (ignored when --max-steps > 0)", min=0,
                           min_exclusive=True)
    max_steps: int = option(0, "stop after this many optimizer steps (0: use --epochs)", min=0)
    batch_size: int = option(8, "examples per micro-batch", min=1, max=65536)
    grad_accum: int = option(1, "micro-batches per optimizer step", min=1, max=65536)
    seq_len: int = option(512, "truncate examples to this many tokens", min=8, max=1_048_576)
    completion_only_loss: bool = option(False, "score only the response tokens (default: every token of the text)")
    gradient_checkpointing: bool = option(False, "recompute the student's activations in the backward pass")
    seed: int = option(0, "seed for initialisation and data order", min=0)
    log_every: int = option(10, "log metrics every N optimizer steps", min=1)
    checkpoint_every: int = option(50, "save a resumable checkpoint every N steps (0: never)", min=0)
    eval_every: int = option(0, "evaluate (loss, KL to teacher, top-1 agreement) every N steps (0: only at the end)",
                             min=0)
    keep_checkpoints: int = option(2, "how many of the newest checkpoints to keep", min=1)
    resume: str | None = option(None, "distill run id to continue from its last checkpoint (its training options "
                                      "are kept; --max-steps/--epochs may grow)")
    gate: str | None = option(None, "gate the student against the teacher on the eval split, e.g. "
                                    "\"perplexity<=+10%\"; a violation fails the cell after the run is stored")
    generate_tokens: int = option(32, "tokens to generate for greedy tokens/s of teacher and student (0 = skip)",
                                  min=0, max=4096)
    name: str | None = option(None, "name of the distilled artifact (default: <student name>-distilled)")

    def validate(self) -> None:
        for role in ("teacher", "student"):
            if not getattr(self, role) and not self.resume:
                raise self.invalid(role, "is required", fix=f"pass --{role} (a run id, model artifact or folder)")
        if self.on_policy and self.mode == "sequence":
            raise self.invalid("on_policy", "cannot be combined with --mode sequence (the student learns from its own "
                                            "answers or from the teacher's, not both)",
                               fix="drop one of --on-policy and --mode sequence")
        if self.ce_weight and (self.on_policy or self.mode == "sequence"):
            what = ("TRL's DistillationTrainer has no cross-entropy term" if self.on_policy
                    else "--mode sequence is cross-entropy on the teacher's answers already")
            raise self.invalid("ce_weight", what, fix="drop --ce-weight (it applies to --mode logits)")
        if not self.target_modules:
            raise self.invalid("target_modules", "must name at least one module", fix="use --target-modules auto")
        if self.gate:
            from llmops_jupyter.stages.eval.gates import parse_gate

            for rule in parse_gate(self.gate):
                if rule.metric not in ("ppl", "loss"):
                    raise self.invalid("gate", f"can only gate on perplexity or loss (got '{rule.metric}')",
                                       fix="write e.g. \"perplexity<=+10%\", or gate other metrics with `%llmops eval`")


#: Options that may differ between an interrupted run and its --resume without changing the result.
RESUME_FREE = ("resume", "checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "name", "gate",
               "generate_tokens")
RESUME_EXTEND = ("max_steps", "epochs")
#: The summary key of the teacher-answers dataset of a ``--mode sequence`` run (a resumed run trains on the same).
ANSWERS_KEY = "teacher_answers"


def check_vocabularies(teacher: ModelRef, student: ModelRef) -> None:
    """Refuse a teacher/student pair whose tokenizers differ, from their files (before any model loads)."""
    from transformers import AutoTokenizer

    t_cfg, s_cfg = mt.checkpoint_config(teacher.path), mt.checkpoint_config(student.path)
    tt = AutoTokenizer.from_pretrained(str(teacher.path))
    ts = AutoTokenizer.from_pretrained(str(student.path))
    problems = []
    if t_cfg.get("vocab_size") != s_cfg.get("vocab_size"):
        problems.append(f"vocab_size {t_cfg.get('vocab_size')} vs {s_cfg.get('vocab_size')}")
    if tt.get_vocab() != ts.get_vocab():
        problems.append(f"tokenizers differ ({len(tt)} vs {len(ts)} tokens)")
    if problems:
        raise ConfigError(f"distill: the student '{student.ref}' does not share the teacher's vocabulary ("
                          f"{'; '.join(problems)}); logit distillation compares distributions token by token.",
                          field="student", value=student.ref,
                          fix="use a student derived from the teacher (`%llmops prune --model <teacher>`) or one "
                              "with the same tokenizer")


@register_stage
class DistillStage(Stage):
    """Distil a teacher into a student (forward/reverse KL or JSD, chunked logits); live dashboard, checkpoints,
    resume; reports KL to the teacher, top-1 agreement, perplexity, size and speed; optional gate."""

    name = "distill"
    extras = ("finetune",)
    config_cls = DistillConfig
    key_metrics = ("kl_to_teacher", "top1_agreement", "perplexity", "eval_loss")
    live_view = "llmops_jupyter.stages.finetune.dashboard:TrainingDashboard"

    def run(self, ctx: RunContext) -> dict[str, Any]:
        require("torch", "finetune")
        require("transformers", "finetune")
        from llmops_jupyter.models.refs import FULL_WEIGHT_KINDS, resolve_model, use_model
        from llmops_jupyter.stages.data.format import load_dataset
        from llmops_jupyter.stages.distill.engine import train_distill
        from llmops_jupyter.stages.finetune.train import resume_config, run_dir
        from llmops_jupyter.stages.quantize.stage import measure, mt_weights_size

        cfg, resumed, resume_ckpt = resume_config(ctx, DistillConfig, "distill", free=RESUME_FREE,
                                                  extend=RESUME_EXTEND,
                                                  pinned=("dataset", "teacher_path", "student_path", ANSWERS_KEY))
        refs = {}
        for role in ("teacher", "student"):
            ref = resumed.get(f"{role}_path") or getattr(cfg, role)
            m = resolve_model(ref, ctx.registry)
            quant = mt.checkpoint_quantization(m.path)
            if m.kind not in FULL_WEIGHT_KINDS or quant:
                what = quant or m.kind
                raise ConfigError(f"distill: --{role} '{getattr(cfg, role)}' is not a full-precision model ({what}); "
                                  "distillation needs full-precision weights.", field=role, value=getattr(cfg, role),
                                  fix=("merge it first (`%llmops merge --adapter ...`)" if m.kind == "adapter"
                                       else "pass the full-precision model it came from (see `%llmops lineage`)"))
            refs[role] = m
        check_vocabularies(refs["teacher"], refs["student"])
        teacher, student = (use_model(ctx, resumed.get(f"{r}_path") or getattr(cfg, r)) for r in ("teacher", "student"))
        data = load_dataset(resumed.get("dataset") or cfg.data, ctx.registry)
        if (cfg.mode == "sequence" or cfg.on_policy) and not any(r.get("prompt") for r in data.train):
            flag = "--on-policy" if cfg.on_policy else "--mode sequence"
            raise ConfigError(f"distill: {flag} needs prompts, and dataset {data.version} has plain texts only.",
                              field="data", value=cfg.data, fix="pass a chat/instruction dataset (`%llmops data` of "
                                                                "prompt/response or messages records)")
        if data.artifact is not None:
            ctx.use(data.artifact)
        folder = run_dir(ctx.registry, ctx.run_id)
        ctx.set_summary(**{**resumed, "teacher": teacher.name, "teacher_path": str(teacher.path),
                           "student": student.name, "student_path": str(student.path),
                           "dataset": data.artifact.hash if data.artifact else str(data.path),
                           "data_version": data.version, "checkpoints": str(folder / "checkpoints")})
        t0 = time.perf_counter()
        train_rows, answers = data.train, None
        if cfg.mode == "sequence":
            answers = self._teacher_answers(ctx, cfg, teacher, data, resumed.get(ANSWERS_KEY))
            train_rows = load_dataset(answers.hash, ctx.registry).train
        out = train_distill(cfg, student.path, teacher.path, train_rows, data.eval, folder / "checkpoints", ctx,
                            resume_from=resume_ckpt, model_ref=cfg.student or "",
                            save_dir=lambda: ctx.staging_dir("distill"))
        staging = out.adapter_dir
        gate_rows = out.info.pop("gate_rows", {})
        ctx.set_summary(**out.info)
        prompt = (mt.split_texts(data, 1, split="eval", fill=True, field="prompt") or [mt.FIXED_PROBES[1]])[0]
        device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
        t_m = measure(teacher.path, [], prompt, cfg.generate_tokens, device=device)
        s_m = measure(staging, [], prompt, cfg.generate_tokens, device=device)
        t_size, s_size = mt_weights_size(teacher.path), mt_weights_size(staging)
        metrics = dict(out.metrics)
        metrics.update({"size_bytes": s_size, "teacher_size_bytes": t_size,
                        "size_ratio": s_size / t_size if t_size else None})
        if s_m.get("tokens_per_s") and t_m.get("tokens_per_s"):
            metrics.update({"tokens_per_s": s_m["tokens_per_s"], "teacher_tokens_per_s": t_m["tokens_per_s"],
                            "tokens_per_s_ratio": s_m["tokens_per_s"] / t_m["tokens_per_s"]})
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
        ctx.log_metrics({k: v for k, v in metrics.items() if k != "eval_loss"}, step=out.info.get("steps"))
        gate_results = self._gate(cfg, gate_rows)
        name = cfg.name or f"{student.name}-distilled"
        report = {"teacher": {"ref": teacher.ref, "hash": teacher.artifact.hash if teacher.artifact else None},
                  "student": {"ref": student.ref, "hash": student.artifact.hash if student.artifact else None},
                  "mode": "on-policy" if cfg.on_policy else cfg.mode,
                  "loss": "cross_entropy (teacher answers)" if answers else cfg.loss, "temperature": cfg.temperature, "method": cfg.method, "metrics": metrics,
                  "dataset": data.version, "gate": [r.to_dict() for r in gate_results]}
        mt.write_model_card(staging, {"name": name, "kind": "distilled", "licence": mt.licence_of(student.path),
                                      "created_by": "llmops-jupyter distill", "created_at": time.time(),
                                      "run_id": ctx.run_id, **report})
        parents = {a.hash: a for a in [*ctx.inputs, *([answers] if answers else [])]}  # teacher answers → student
        art = ctx.save_artifact(staging, "distilled", name=name, inputs=list(parents.values()), meta={
            "teacher": report["teacher"]["hash"], "student": report["student"]["hash"], "loss": report["loss"],
            "temperature": cfg.temperature, "method": cfg.method, "dataset": report["dataset"],
            "mode": report["mode"], "teacher_answers": answers.hash if answers else None,
            "config": cfg.to_params(), **{k: metrics.get(k) for k in ("kl_to_teacher", "top1_agreement",
                                                                     "perplexity", "teacher_perplexity")}})
        ctx.set_summary(distilled=art.hash, seconds=time.perf_counter() - t0,
                        gate=[r.to_dict() | {"worse": r.worse[:20]} for r in gate_results] or None)
        from llmops_jupyter.stages.finetune.plots import training_figure

        fig = training_figure(ctx.registry.metric_history(ctx.run_id), title=f"distill {ctx.run_id}")
        table = Table(["measure", "teacher", "student before", "student after"], [
            ["perplexity (eval split)", fmt_num(metrics.get("teacher_perplexity")), fmt_num(metrics.get("perplexity_start")),
             fmt_num(metrics.get("perplexity"))],
            ["KL to teacher (T = 1, per token)", "0", fmt_num(metrics.get("kl_to_teacher_start")),
             fmt_num(metrics.get("kl_to_teacher"))],
            ["top-1 agreement with teacher", "100%", _pct(metrics.get("top1_agreement_start")),
             _pct(metrics.get("top1_agreement"))],
            ["weights on disk", f"{t_size / 1e6:.2f} MB", "", f"{s_size / 1e6:.2f} MB"],
            ["greedy generation", fmt_tps(t_m.get("tokens_per_s")), "", fmt_tps(s_m.get("tokens_per_s"))],
            *[[f"gate {r.rule.text}", "", "", ("passed" if r.passed else "FAILED") + f" ({r.delta * 100:+.1f}%)"
               if r.rule.relative else ("passed" if r.passed else "FAILED") + f" ({r.delta:+.4g})"]
              for r in gate_results],
        ], title=f"Distilled {teacher.name} → {student.name} ({self._how(cfg)}, {cfg.method}, "
                 f"{out.info.get('steps')} steps)",
            note=f"artifact distilled {art.short}" + (f"; teacher answers: dataset {answers.short}" if answers else ""))
        self._enforce(gate_results, name)
        return {"report": table, "artifact": art, "loss_figure": fig}

    @staticmethod
    def _how(cfg: DistillConfig) -> str:
        if cfg.mode == "sequence":
            return f"sequence-level: cross-entropy on the teacher's answers (≤ {cfg.max_new_tokens} tokens)"
        what = f"{cfg.loss}, T={cfg.temperature:g}"
        return f"on-policy (TRL), {what}" if cfg.on_policy else what

    @staticmethod
    def _teacher_answers(ctx: RunContext, cfg: DistillConfig, teacher: ModelRef, data: Any,
                         pinned: str | None) -> Any:
        """``--mode sequence``: the teacher's greedy answers to the train prompts, generated by the batched
        generation every stage uses (:func:`llmops_jupyter.models.inference.generate`), stored as a dataset artifact
        whose parents are the teacher and the source dataset (lineage teacher → answers → distilled). The eval split
        is the source's, so perplexity and the gate score the same held-out references as ``--mode logits``. A
        resumed run trains on the answers its interrupted run stored."""
        if pinned:
            return ctx.use(pinned)
        from llmops_jupyter.models.inference import generate, load_model
        from llmops_jupyter.stages.data.format import example_id, write_dataset_dir

        rows = [r for r in data.train if r.get("prompt")]
        net, tok = load_model(teacher, dtype=cfg.dtype, registry=ctx.registry)
        eos = tok.eos_token or ""
        train: list[dict[str, Any]] = []
        step = max(cfg.batch_size * 4, 1)
        ctx.progress(0, len(rows), desc="teacher answers")
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            gens = generate(net, tok, [r["prompt"] for r in chunk], max_new_tokens=cfg.max_new_tokens,
                            batch_size=cfg.batch_size)
            for r, g in zip(chunk, gens, strict=True):
                completion = g.text + (eos if g.finish_reason == "stop" else "")
                msgs = [*r["messages"][:-1], {"role": "assistant", "content": g.text}] if r.get("messages") else None
                train.append({"id": example_id(msgs or [{"role": "assistant", "content": r["prompt"] + completion}]),
                              **({"messages": msgs} if msgs else {}), "prompt": r["prompt"],
                              "completion": completion, "text": r["prompt"] + completion,
                              "n_tokens": g.prompt_tokens + g.new_tokens,
                              "meta": {"source_id": r.get("id"), "finish_reason": g.finish_reason}})
            ctx.progress(min(start + step, len(rows)), len(rows), desc="teacher answers")
        del net
        stopped = sum(1 for r in train if r["meta"]["finish_reason"] == "stop")
        folder = ctx.staging_dir("teacher-answers")
        name = f"{data.manifest.get('name') or 'data'}-{teacher.name}-answers"
        version = write_dataset_dir(folder, train, data.eval, {
            "name": name, "source": "distill --mode sequence", "teacher": teacher.ref,
            "from_dataset": data.version, "generation": f"greedy, at most {cfg.max_new_tokens} new tokens",
            "eval_split": "the source dataset's (references, not teacher answers)",
            "chat_template": data.manifest.get("chat_template"), "tokenizer_hash": data.manifest.get("tokenizer_hash"),
            "counts": {"answers": len(train), "stopped": stopped, "cut_at_max_new_tokens": len(train) - stopped}})
        parents = [a for a in (teacher.artifact, data.artifact) if a is not None]
        art = ctx.save_artifact(folder, "dataset", name=name, inputs=parents,
                                meta={"version": version, "teacher": teacher.ref, "from_dataset": data.version})
        ctx.set_summary(**{ANSWERS_KEY: art.hash, "teacher_answers_stopped": stopped})
        ctx.log(f"teacher answers: {len(train)} train prompts, {stopped} ended at EOS, "
                f"{len(train) - stopped} cut at {cfg.max_new_tokens} tokens; dataset {art.short}")
        return art

    @staticmethod
    def _gate(cfg: DistillConfig, rows: dict[str, list]) -> list:
        if not cfg.gate:
            return []
        from llmops_jupyter.stages.eval.gates import check, parse_gate

        student, teacher = rows.get("student") or [], rows.get("teacher") or []
        if not student:
            raise ConfigError("distill: --gate needs an eval split to compare student and teacher on.", field="gate",
                              value=cfg.gate, fix="rebuild the dataset with an eval split (`%llmops data "
                                                  "--eval-size N`)")
        ids = [f"eval-{i}" for i in range(len(student))]
        return check(parse_gate(cfg.gate), ids, teacher, student, seed=cfg.seed)

    @staticmethod
    def _enforce(results: list, name: str) -> None:
        if results:
            from llmops_jupyter.stages.eval.gates import enforce

            enforce(results, candidate=f"student {name}", baseline="the teacher")

    def interrupt_hint(self, ctx: RunContext) -> str:
        from llmops_jupyter.stages.finetune.train import last_checkpoint

        ckpt = last_checkpoint(ctx.registry, ctx.run_id)
        if ckpt is None:
            return "No checkpoint was written yet (set --checkpoint-every lower to keep progress); start it again."
        return f"Last checkpoint: step {ckpt[0]}. Continue with: %llmops distill --resume {ctx.run_id} ..."


def _pct(v: float | None) -> str:
    return "" if v is None or v != v else f"{100 * v:.1f}%"

"""``%llmops finetune``: LoRA / QLoRA adapters on a versioned dataset, with a live dashboard and exact resume.

The stage only wires things together; the training engine is :mod:`llmops_jupyter.stages.finetune.sft` (imported inside
:meth:`FinetuneStage.run`, so ``%load_ext`` stays free of torch/transformers/peft). Three ways to run the same
training:

* in the kernel (default) — the Runner's events drive the dashboard, Ctrl-C/Interrupt stops cleanly;
* ``--detach`` — a supervised worker process (:mod:`llmops_jupyter.stages.finetune.launch`) runs it as its own registry run;
  the cell returns at once and ``%llmops attach <run>`` re-opens the live view from the registry;
* ``--launcher accelerate`` — ``accelerate launch`` runs the training on ``--num-processes`` devices; rank 0 reports
  through an events file the stage relays to the registry.

``attach`` is a view command registered here too.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmops_jupyter.core.errors import StageError
from llmops_jupyter.core.stage import CommandEnv, Stage, command, register_stage
from llmops_jupyter.stages.finetune.config import RESUME_EXTEND, RESUME_FREE, AttachConfig, FinetuneConfig

if TYPE_CHECKING:
    from llmops_jupyter.core.runner import RunContext

__all__ = ["AttachConfig", "FinetuneConfig", "FinetuneStage", "RESUME_FREE"]


@register_stage
class FinetuneStage(Stage):
    """Fine-tune a base model with LoRA or QLoRA on a dataset; records the adapter with lineage."""

    name = "finetune"
    extras = ("finetune",)
    config_cls = FinetuneConfig
    key_metrics = ("eval_loss", "train_loss", "train_tokens_per_s", "peak_memory_mb")
    live_view = "llmops_jupyter.stages.finetune.dashboard:TrainingDashboard"

    def run(self, ctx) -> dict[str, Any]:
        cfg: FinetuneConfig = ctx.config
        if cfg.detach:
            from llmops_jupyter.stages.finetune.launch import launch_detached

            return launch_detached(ctx)
        return run_stage(ctx)

    def interrupt_hint(self, ctx) -> str:
        from llmops_jupyter.stages.finetune.train import last_checkpoint

        ckpt = last_checkpoint(ctx.registry, ctx.run_id)
        if ckpt is None:
            return ("No checkpoint was written yet (set --checkpoint-every lower to keep progress); "
                    "start the run again.")
        return f"Last checkpoint: step {ckpt[0]}. Continue with: %llmops finetune --resume {ctx.run_id}"


@command("attach", AttachConfig)
def attach(cfg: AttachConfig, env: CommandEnv) -> Any:
    """Re-open the live training view of a (possibly detached) fine-tuning run by polling the registry."""
    from llmops_jupyter.stages.finetune.launch import attach_run

    return attach_run(cfg, env)


def effective_config(ctx: RunContext) -> tuple[FinetuneConfig, dict[str, Any], Path | None]:
    """The config to train with: for ``--resume``, the interrupted run's training options and resolved inputs."""
    from llmops_jupyter.stages.finetune.train import resume_config

    return resume_config(ctx, FinetuneConfig, "finetune", free=RESUME_FREE, extend=RESUME_EXTEND,
                         pinned=("dataset", "base_model_path"))


def resolve_objective(cfg: FinetuneConfig, data: Any) -> str:
    """The objective to train with: ``auto`` follows the dataset's layout; an explicit one that does not fit the
    dataset is refused in one line (causal-lm on instructions would learn the prompts, sft on documents has no
    response to learn)."""
    if cfg.method == "dpo":
        return "sft" if cfg.objective == "auto" else cfg.objective
    text = data.manifest.get("layout") == "text"
    if cfg.objective == "auto":
        return "causal-lm" if text else "sft"
    if cfg.objective == "causal-lm" and not text:
        raise StageError(f"--objective causal-lm needs a text dataset; '{data.version}' is a "
                         f"{data.manifest.get('layout')} dataset of instructions.",
                         fix="drop --objective (sft), or prepare documents with `%llmops data DOCS --format text`")
    if cfg.objective == "sft" and text:
        raise StageError(f"--objective sft needs instruction/chat examples; '{data.version}' is a text dataset "
                         "(documents, no responses).", fix="use --objective causal-lm (or drop --objective)")
    return cfg.objective


def run_stage(ctx: RunContext) -> dict[str, Any]:
    """In-process (or accelerate-launched) training for a Runner run; saves the adapter artifact."""
    from llmops_jupyter.models.refs import use_model
    from llmops_jupyter.stages.data.format import load_dataset
    from llmops_jupyter.stages.finetune.train import run_dir

    cfg, resumed, resume_ckpt = effective_config(ctx)
    model = use_model(ctx, resumed.get("base_model_path") or cfg.model)
    if model.kind not in ("base-model", "merged", "pruned", "distilled"):
        raise StageError(f"--model '{cfg.model}' is a {model.kind}; LoRA needs a base model.",
                         fix="pass the base model (for an adapter: its merged model from `%llmops merge`)")
    data = load_dataset(resumed.get("dataset") or cfg.data, ctx.registry)
    if data.artifact is not None:
        ctx.use(data.artifact)
    cfg = dataclasses.replace(cfg, objective=resolve_objective(cfg, data))
    folder = run_dir(ctx.registry, ctx.run_id)
    ctx.set_summary(**{**resumed, "method": cfg.method, "objective": cfg.objective, "base_model": model.name,
                       "base_model_path": str(model.path),
                       "dataset": data.artifact.hash if data.artifact else str(data.path),
                       "data_version": data.version, "checkpoints": str(folder / "checkpoints")})
    staging = ctx.staging_dir("adapter")
    if cfg.launcher == "accelerate":
        from llmops_jupyter.stages.finetune.launch import run_accelerate

        out = run_accelerate(ctx, cfg, model.path, data.path, folder, staging, resume_ckpt)
    elif cfg.method == "dpo":
        from llmops_jupyter.stages.finetune.dpo import check_pairs, train_dpo

        check_pairs(data.train, data.version)
        out = train_dpo(cfg, model.path, data.train, data.eval, folder / "checkpoints", ctx, resume_from=resume_ckpt,
                        model_ref=cfg.model, adapter_dir=staging)
    else:
        from llmops_jupyter.stages.finetune.sft import train

        out = train(cfg, model.path, data.train, data.eval, folder / "checkpoints", ctx, resume_from=resume_ckpt,
                    model_ref=cfg.model, adapter_dir=staging)
    ctx.set_summary(**out.info)
    ctx.log_metrics({k: v for k, v in out.metrics.items() if k != "eval_loss"}, step=out.info.get("steps"))
    meta = {"base_model": model.name, "base_model_path": str(model.path),
            "base_model_hash": model.artifact.hash if model.artifact else None,
            "dataset": data.artifact.hash if data.artifact else None, "data_version": data.version,
            "method": cfg.method, "objective": cfg.objective, "config": cfg.to_params(), "metrics": out.metrics,
            **out.info}
    (staging / "llmops_model.json").write_text(json.dumps(
        {"name": cfg.adapter_name or f"{model.name}-{cfg.method}", "base_model": model.name, "method": cfg.method,
         "data_version": data.version}, indent=2))
    art = ctx.save_artifact(staging, "adapter", name=cfg.adapter_name or f"{model.name}-{cfg.method}", meta=meta)
    from llmops_jupyter.stages.finetune.plots import training_figure

    fig = training_figure(ctx.registry.metric_history(ctx.run_id), title=f"finetune {ctx.run_id}")
    return {"adapter": art, "loss_figure": fig}

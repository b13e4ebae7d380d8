"""``%llmops rl`` (GRPO / RLOO on notebook reward functions) and ``%llmops reward-model`` (RLHF's reward model).

The stage wires things together: resolve the rewards (notebook callables by name, ``$fn``, built-ins, ``judge``,
``reward-model@<ref>``), load the base and data with lineage, run the engine (:mod:`.grpo`, imported lazily so
``%load_ext`` stays free of torch/transformers/trl), save the adapter with its sampled completions. Interrupt and
``--resume`` follow the fine-tuning stage: checkpoints under ``<home>/runs/<run>/checkpoints`` with a completion
marker, training options taken from the interrupted run.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

from llmops_jupyter.core.errors import ConfigError, StageError
from llmops_jupyter.core.stage import Stage, register_stage
from llmops_jupyter.stages.rl.config import RESUME_EXTEND, RESUME_FREE, RewardModelConfig, RLConfig, reward_name

if TYPE_CHECKING:
    from llmops_jupyter.core.runner import RunContext

__all__ = ["RLConfig", "RLStage", "RewardModelConfig", "RewardModelStage"]


@register_stage
class RLStage(Stage):
    """Reinforcement learning from rewards (GRPO/RLOO, TRL) on a LoRA adapter: notebook reward functions,
    built-ins, a judge (RLAIF) or a trained reward model (RLHF)."""

    name = "rl"
    extras = ("finetune",)
    config_cls = RLConfig
    key_metrics = ("reward_end", "reward_start", "check_end", "train_runtime_s")
    live_view = "llmops_jupyter.stages.rl.dashboard:RLDashboard"

    @classmethod
    def extras_for(cls, config) -> tuple[str, ...]:
        judge = getattr(config, "judge", None) or ""
        return ("eval",) if judge.startswith(("http://", "https://")) else ("finetune",)  # [eval] has openai

    def run(self, ctx) -> dict[str, Any]:
        cfg: RLConfig = ctx.config
        if cfg.detach:
            return launch_rl_detached(ctx)
        return run_rl(ctx)

    def interrupt_hint(self, ctx) -> str:
        from llmops_jupyter.stages.finetune.train import last_checkpoint

        ckpt = last_checkpoint(ctx.registry, ctx.run_id)
        if ckpt is None:
            return "No checkpoint was written yet (set --checkpoint-every lower to keep progress); start the run again."
        return f"Last checkpoint: step {ckpt[0]}. Continue with: %llmops rl --resume {ctx.run_id}"


def launch_rl_detached(ctx: RunContext) -> dict[str, Any]:
    """``--detach``: fine-tuning's supervised worker process runs this rl run. The config already holds rewards a
    worker can import (:func:`llmops_jupyter.stages.rl.rewards.portable`); a resumed run's, taken from the
    interrupted run, are checked here, in the cell."""
    from llmops_jupyter.stages.finetune.launch import launch_detached
    from llmops_jupyter.stages.rl.rewards import portable

    cfg: RLConfig = ctx.config
    if cfg.resume and not cfg.reward:
        src = ctx.registry.get_run(cfg.resume)
        for name in src["params"].get("reward") or []:
            if portable(name, cfg) != name:
                raise ConfigError(f"rl: run {src['id']}'s reward {name} is a notebook function; a --detach worker "
                                  "cannot find it by name.", field="reward", value=name,
                                  fix=f"resume without --detach: %llmops rl --resume {src['id']}")
    return launch_detached(ctx, {**cfg.to_params(), "detach": False})


def effective_config(ctx: RunContext) -> tuple[RLConfig, dict[str, Any], Any]:
    """For ``--resume``: the interrupted run's training options (rewards compared by name) and its inputs."""
    from llmops_jupyter.stages.finetune.train import clear_incomplete_checkpoints, last_checkpoint, run_dir

    cfg: RLConfig = ctx.config
    if not cfg.resume:
        return cfg, {}, None
    src = ctx.registry.get_run(cfg.resume)
    if src["stage"] != "rl":
        raise StageError(f"Run '{src['id']}' is a {src['stage']} run, not an rl run.",
                         fix="pass the id of an interrupted rl run (`%llmops runs --stage rl`)")
    if src["status"] == "running":
        raise StageError(f"Run '{src['id']}' is still running.", fix="stop it first, then resume it")
    clear_incomplete_checkpoints(run_dir(ctx.registry, src["id"]) / "checkpoints")
    ckpt = last_checkpoint(ctx.registry, src["id"])
    if ckpt is None:
        raise StageError(f"Run '{src['id']}' has no complete checkpoint to resume from.",
                         fix="start it again without --resume (use --checkpoint-every to save progress)")
    params = {k: v for k, v in src["params"].items() if k in RLConfig.field_names()}
    given_names = [reward_name(r) for r in cfg.reward]
    if given_names and given_names != params.get("reward"):
        raise StageError(f"--reward {','.join(given_names)} differs from run {src['id']}'s "
                         f"{','.join(params.get('reward') or [])}; a resumed run keeps its rewards.",
                         fix="drop --reward (the names are resolved again in this notebook)")
    src_cfg = RLConfig.from_dict({**params, "reward": list(cfg.reward) if cfg.reward else params["reward"]})
    defaults = RLConfig.from_dict({"reward": ["format"]})
    changes: dict[str, list[Any]] = {}
    for name in RLConfig.field_names():
        if name in RESUME_FREE or name == "reward":
            continue
        given, before = getattr(cfg, name), getattr(src_cfg, name)
        if given == getattr(defaults, name) or given == before:
            continue
        if name in RESUME_EXTEND:
            changes[name] = [before, given]
            continue
        flag = "--" + name.replace("_", "-")
        raise StageError(f"{flag} {given} differs from run {src['id']}'s {before}; a resumed run keeps its training "
                         "options.", fix=f"drop {flag} (the run used {before}), or start a new run without --resume")
    eff = dataclasses.replace(src_cfg, **{k: getattr(cfg, k) for k in RESUME_FREE if k != "reward"},
                              **{k: new for k, (_old, new) in changes.items()})
    if eff.max_steps and eff.max_steps <= ckpt[0]:
        raise StageError(f"--max-steps {eff.max_steps} is not past run {src['id']}'s last checkpoint (step {ckpt[0]}).",
                         fix=f"give --max-steps above {ckpt[0]} to train longer")
    if eff.keep == "best-check" and not eff.check_every:
        raise StageError(f"Run {src['id']} keeps its best-check adapter, and this --resume has no held-out check.",
                         fix=f"pass --check-every N again (the run used {src['params'].get('check_every')})")
    pinned = {k: src["summary"].get(k) for k in ("dataset", "base_model_path") if src["summary"].get(k)}
    return eff, {"resumed_from": src["id"], "resumed_at_step": ckpt[0], **pinned}, ckpt[1]


def resolve_rewards(ctx: RunContext, cfg: RLConfig, policy: Any, folder: Any) -> list[tuple[str, Any]]:
    """``--reward`` items → named callables; ``judge`` and ``reward-model@<ref>`` are built here (and recorded as
    inputs); a reward's source text is hashed into the run summary so a card says what was optimised."""
    from llmops_jupyter.stages.rl.rewards import resolve

    def judge(_name: str):
        from llmops_jupyter.stages.rl.judge_reward import JudgeReward

        return JudgeReward.from_config(cfg, ctx.registry, policy=policy, cache_path=folder / "judge_cache.jsonl")

    def reward_model(name: str):
        from llmops_jupyter.stages.rl.reward_model import RewardModelScorer

        ref = name.partition("@")[2] or "latest"
        art = ctx.registry.get_artifact("reward-model@latest" if ref == "latest" else ref, kind="reward-model")
        if art.kind != "reward-model":
            raise ConfigError(f"rl: --reward {name} is a {art.kind}, not a reward model.", field="reward",
                              fix="train one with `%llmops reward-model --data <pairs>`")
        ctx.use(art)
        return RewardModelScorer(art.path, name=name, baseline=cfg.rm_reward, prefix=cfg.response_prefix)

    out = [resolve(r, cfg, factories={"judge": judge, "reward-model": reward_model}) for r in cfg.reward]
    return out


def source_hashes(funcs: list[tuple[str, Any]]) -> dict[str, str]:
    import hashlib
    import inspect

    out = {}
    for name, fn in funcs:
        try:
            src = inspect.getsource(getattr(fn, "func", fn))
        except (OSError, TypeError):
            src = repr(fn)
        out[name] = hashlib.sha256(src.encode()).hexdigest()[:12]
    return out


def carry_best(ctx: RunContext, src_folder: Any, folder: Any, at_step: int) -> None:
    """A resumed ``--keep best-check`` run starts from the interrupted run's best adapter when that was checked at
    or before the checkpoint it resumes from (a later one came from steps the resumed run trains again)."""
    from llmops_jupyter.stages.rl.grpo import BEST_DIR, copy_best, read_best

    best = read_best(src_folder / BEST_DIR)
    if best is None:
        return
    if best["step"] > at_step:
        ctx.log(f"best check of the interrupted run (step {best['step']}) is past its checkpoint (step {at_step}); "
                "the resumed run picks its best again from its own checks")
        return
    copy_best(src_folder / BEST_DIR, folder / BEST_DIR, best)


def run_rl(ctx: RunContext) -> dict[str, Any]:
    from llmops_jupyter.core.capture import run_log_path
    from llmops_jupyter.models.refs import use_model
    from llmops_jupyter.stages.data.format import load_dataset
    from llmops_jupyter.stages.finetune.train import run_dir
    from llmops_jupyter.stages.rl.rewards import RewardSet, resolve

    cfg, resumed, resume_ckpt = effective_config(ctx)
    model = use_model(ctx, resumed.get("base_model_path") or cfg.model)
    if model.kind != "base-model":
        raise StageError(f"--model '{cfg.model}' is a {model.kind}; RL trains a LoRA adapter on a base model.",
                         fix="pass the base model (for an adapter: its merged model from `%llmops merge`)")
    folder = run_dir(ctx.registry, ctx.run_id)
    if cfg.keep == "best-check" and resumed:
        carry_best(ctx, run_dir(ctx.registry, resumed["resumed_from"]), folder, resumed["resumed_at_step"])
    funcs = resolve_rewards(ctx, cfg, model, folder)
    rewards = RewardSet(funcs, list(cfg.reward_weights), num_generations=cfg.num_generations, method=cfg.method,
                        scale_rewards=cfg.scale_rewards)
    check_fn = None
    if cfg.check_every:
        check_fn = dict(funcs).get(cfg.check_reward) or resolve(cfg.check_reward, cfg)[1]
    data = load_dataset(resumed.get("dataset") or cfg.data, ctx.registry)
    if data.artifact is not None:
        ctx.use(data.artifact)
    ctx.set_summary(**{**resumed, "method": cfg.method, "base_model": model.name, "base_model_path": str(model.path),
                       "dataset": data.artifact.hash if data.artifact else str(data.path),
                       "data_version": data.version, "checkpoints": str(folder / "checkpoints"),
                       "rewards": rewards.names, "reward_weights": rewards.weights,
                       "reward_sources": source_hashes(funcs), "samples": str(folder / "samples.jsonl")})
    staging = ctx.staging_dir("adapter")
    from llmops_jupyter.stages.rl.grpo import alert_to, train_rl

    out = train_rl(cfg, model.path, data.train, data.eval, folder / "checkpoints", ctx, rewards, run_folder=folder,
                   resume_from=resume_ckpt, model_ref=cfg.model, adapter_dir=staging, check_fn=check_fn,
                   alert=alert_to(ctx, run_log_path(ctx.registry.home, ctx.run_id)))
    for f in funcs:
        closer = getattr(f[1], "close", None)
        if callable(closer):
            closer()
    info = {k: v for k, v in out.info.items() if k != "alerts"}
    ctx.set_summary(**info, judge_calls=sum(getattr(f, "calls", 0) for _, f in funcs if hasattr(f, "cache")))
    ctx.log_metrics(out.metrics, step=out.info.get("steps"))
    name = cfg.adapter_name or f"{model.name}-{cfg.method}"
    meta = {"base_model": model.name, "base_model_path": str(model.path),
            "base_model_hash": model.artifact.hash if model.artifact else None,
            "dataset": data.artifact.hash if data.artifact else None, "data_version": data.version,
            "method": cfg.method, "rewards": rewards.names, "reward_weights": rewards.weights,
            "config": cfg.to_params(), "metrics": out.metrics, **info}
    (staging / "llmops_model.json").write_text(json.dumps(
        {"name": name, "base_model": model.name, "method": cfg.method, "data_version": data.version,
         "rewards": rewards.names}, indent=2))
    art = ctx.save_artifact(staging, "adapter", name=name, meta=meta)
    from llmops_jupyter.stages.rl.dashboard import completions_table, reward_figure

    fig = reward_figure(ctx.registry.metric_history(ctx.run_id), title=f"rl {ctx.run_id}")
    samples = []
    samples_file = folder / "samples.jsonl"
    if samples_file.exists():
        samples = [json.loads(line) for line in samples_file.read_text(encoding="utf-8").splitlines() if line]
    return {"adapter": art, "reward_figure": fig, "completions": completions_table(samples[-16:])}


@register_stage
class RewardModelStage(Stage):
    """Train a reward model (RLHF) on preference pairs: TRL RewardTrainer, LoRA on a sequence-classification head;
    reports held-out pairwise accuracy; `%llmops rl --reward reward-model@latest` uses it."""

    name = "reward-model"
    extras = ("finetune",)
    config_cls = RewardModelConfig
    key_metrics = ("pairwise_accuracy", "train_pairwise_accuracy", "train_loss")

    def run(self, ctx) -> dict[str, Any]:
        from llmops_jupyter.models.refs import use_model
        from llmops_jupyter.stages.data.format import load_dataset
        from llmops_jupyter.stages.rl.reward_model import train_reward_model

        cfg: RewardModelConfig = ctx.config
        model = use_model(ctx, cfg.model)
        if model.kind != "base-model":
            raise StageError(f"--model '{cfg.model}' is a {model.kind}; the reward model starts from a base model.",
                             fix="pass a base model (or a merged model)")
        data = load_dataset(cfg.data, ctx.registry)
        if data.artifact is not None:
            ctx.use(data.artifact)
        staging = ctx.staging_dir("reward-model")
        metrics, info = train_reward_model(cfg, model.path, data.train, data.eval, staging, ctx)
        ctx.log_metrics(metrics)
        ctx.set_summary(**info, base_model=model.name, base_model_path=str(model.path),
                        dataset=data.artifact.hash if data.artifact else str(data.path))
        name = cfg.name or f"{model.name}-reward-model"
        art = ctx.save_artifact(staging, "reward-model", name=name,
                                meta={"base_model": model.name, "base_model_path": str(model.path),
                                      "dataset": data.artifact.hash if data.artifact else None,
                                      "metrics": metrics, "config": cfg.to_params(), **info})
        from llmops_jupyter.core.display import Table

        rows = [["reward model", art.short], ["held-out pairs", info["eval_pairs"]],
                ["pairwise accuracy (held out)", f"{metrics['pairwise_accuracy']:.3f}"],
                ["pairwise accuracy (train)", f"{metrics['train_pairwise_accuracy']:.3f}"]]
        return {"reward_model": art, "report": Table(["field", "value"], rows, title="Reward model")}

"""Online RL engine: GRPO / RLOO with TRL on a LoRA (or QLoRA) policy, in the fine-tuning template.

Model loading, optimizer choice, ``TrainingArguments``, the reporter protocol, checkpoints with their completion
marker (exact resume), OOM advice and the run summary are :mod:`llmops_jupyter.stages.finetune.train`'s, shared with
SFT and DPO; this module adds what reinforcement learning needs on top: the reward functions' contract check on
completions sampled from the base before any step, the RL metrics and sampled completions per log, the guards, and
a greedy held-out check every ``--check-every`` steps. Imported lazily (torch, transformers, peft, trl live here).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmops_jupyter.core.errors import StageError
from llmops_jupyter.stages.rl.guards import Alert, Guards
from llmops_jupyter.stages.rl.rewards import RewardSet, contract_check

if TYPE_CHECKING:
    from llmops_jupyter.stages.finetune.train import Reporter, TrainOutput
    from llmops_jupyter.stages.rl.config import RLConfig

#: TRL's logged metrics that the dashboard and guards read (besides ``rewards/<fn>/mean`` and ``/std``).
RL_KEYS = ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "completions/mean_length",
           "completions/clipped_ratio", "clip_ratio/region_mean")
SAMPLES_FILE = "samples.jsonl"
BEST_DIR = "best-check"  # in the run folder: step-<N>/ (the adapter) and best.json naming it, for --keep best-check


def read_best(best_dir: Path) -> dict[str, Any] | None:
    """The best held-out check so far ({"step", "score", "dir"}) of a ``--keep best-check`` run, or None. best.json is
    written only once its adapter folder is complete, so a run killed mid-save still names a whole adapter."""
    try:
        best = json.loads((best_dir / "best.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return best if (best_dir / best.get("dir", "")).is_dir() else None


def save_best(model: Any, best_dir: Path, step: int, score: float) -> dict[str, Any]:
    """Save ``model``'s adapter as the best so far: its folder first, then best.json, then older folders go."""
    from llmops_jupyter.core.files import atomic_dir

    name = f"step-{step}"
    with atomic_dir(best_dir / name) as tmp:
        model.save_pretrained(str(tmp), selected_adapters=["default"])
    return _publish_best(best_dir, {"step": step, "score": score, "dir": name})


def copy_best(src_dir: Path, dest_dir: Path, best: dict[str, Any]) -> dict[str, Any]:
    """Copy ``best`` (as :func:`read_best` returned it from ``src_dir``) into ``dest_dir``, in save_best's order."""
    from llmops_jupyter.core.files import atomic_dir

    with atomic_dir(dest_dir / best["dir"]) as tmp:
        shutil.copytree(src_dir / best["dir"], tmp, dirs_exist_ok=True)
    return _publish_best(dest_dir, best)


def _publish_best(best_dir: Path, best: dict[str, Any]) -> dict[str, Any]:
    """Name ``best`` in best.json once its folder is whole, then remove the older folders."""
    from llmops_jupyter.core.files import atomic_write_json

    atomic_write_json(best_dir / "best.json", best)
    for old in best_dir.glob("step-*"):
        if old.name != best["dir"]:
            shutil.rmtree(old, ignore_errors=True)
    return best


def keep_best(adapter_dir: Path, best_dir: Path) -> dict[str, Any] | None:
    """Put the best check's adapter weights and config in place of the last step's in ``adapter_dir``."""
    best = read_best(best_dir)
    if best is None:
        return None
    for f in (best_dir / best["dir"]).iterdir():
        if f.is_file():
            shutil.copy2(f, adapter_dir / f.name)
    return best


def reference(row: dict[str, Any]) -> str:
    """The reference answer of a dataset example: its last assistant turn's content (else its completion)."""
    for m in reversed(row.get("messages") or []):
        if m.get("role") == "assistant":
            return str(m.get("content", ""))
    return str(row.get("answer") or row.get("completion") or "")


def rows_for_trl(rows: list[dict[str, Any]], prefix: str = "") -> list[dict[str, Any]]:
    """TRL's rows: the prompt (plus the response prefix the policy continues from) and the reference answer."""
    if not rows:
        return []
    missing = [k for k in ("prompt",) if k not in rows[0]]
    if missing:
        from llmops_jupyter.core.errors import DataError

        raise DataError("The dataset has no 'prompt' field to sample completions from.",
                        fix="build it with `%llmops data` (each example's prompt is templated there)")
    return [{"prompt": r["prompt"] + prefix, "answer": reference(r), "example_id": str(r.get("id", i))}
            for i, r in enumerate(rows)]


def sample_completions(model: Any, tokenizer: Any, prompts: list[str], *, n: int, max_new_tokens: int,
                       temperature: float, seed: int) -> tuple[list[str], list[str], list[list[int]]]:
    """``n`` sampled completions for each prompt (what the contract check calls the rewards on)."""
    from llmops_jupyter.models.inference import generate

    ps = [p for p in prompts for _ in range(n)]
    gens = generate(model, tokenizer, ps, max_new_tokens=max_new_tokens, batch_size=len(ps), do_sample=True,
                    temperature=temperature, seed=seed)
    texts = [g.text for g in gens]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return ps, texts, ids


def greedy_check(model: Any, tokenizer: Any, rows: list[dict[str, Any]], fn: Callable, max_new_tokens: int) -> float:
    """Mean of ``fn`` on greedy answers to held-out prompts (the verifiable check the reward is compared with)."""
    from llmops_jupyter.models.inference import generate

    was_training = model.training
    model.eval()
    try:
        gens = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens,
                        batch_size=len(rows))
    finally:
        if was_training:
            model.train()
    texts = [g.text for g in gens]
    scores = fn(prompts=[r["prompt"] for r in rows], completions=texts, completion_ids=None,
                answer=[r["answer"] for r in rows], trainer_state=None, log_extra=lambda *a, **k: None,
                log_metric=lambda *a, **k: None)
    vals = [float(s) for s in scores if s is not None and not math.isnan(float(s))]
    return statistics.fmean(vals) if vals else 0.0


def _rl_callback_cls():
    from transformers import TrainerCallback

    class RLCallback(TrainerCallback):
        """RL metrics, sampled completions, guards and the held-out check, per logging step."""

        def __init__(self, cfg: RLConfig, reporter: Reporter, rewards: RewardSet, guards: Guards,
                     samples_path: Path, check: Callable[[Any], float] | None, alert: Callable[[Alert], None]):
            self.cfg, self.reporter, self.rewards, self.guards = cfg, reporter, rewards, guards
            self.samples_path, self.check, self.alert = samples_path, check, alert
            self.model = None
            self.rewards_logged: list[float] = []
            self.checks: list[tuple[int, float]] = []
            self.best_dir = samples_path.parent / BEST_DIR if cfg.keep == "best-check" else None
            self.best = read_best(self.best_dir) if self.best_dir is not None else None  # a resumed run's so far

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.model = model
            if self.check is not None and state.global_step == 0:
                self._run_check(state.global_step, control)

        def on_step_end(self, args, state, control, **kw):
            if self.check is not None and self.cfg.check_every and state.global_step % self.cfg.check_every == 0:
                self._run_check(state.global_step, control)

        def _run_check(self, step: int, control) -> None:
            score = self.check(self.model)
            self.checks.append((step, score))
            self.reporter.log_metrics({f"check/{self.cfg.check_reward}": score}, step=step)
            if self.best_dir is not None and (self.best is None or score > self.best["score"]):
                self.best = save_best(self.model, self.best_dir, step, score)
            self._alerts(self.guards.observe_check(step, score), control)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "reward" not in logs:
                return
            values = {k: float(logs[k]) for k in RL_KEYS if logs.get(k) is not None}
            self.rewards_logged.append(values["reward"])
            samples = self.rewards.drain()
            keep = samples[-self.cfg.samples_per_log:] if self.cfg.samples_per_log else []
            if keep:
                with open(self.samples_path, "a", encoding="utf-8") as fh:
                    for s in keep:
                        fh.write(json.dumps(s, ensure_ascii=False) + "\n")
            if state.is_world_process_zero:
                self.reporter.log_metrics(values, step=state.global_step)
                emit = getattr(self.reporter, "emit", None)
                if emit is not None and keep:
                    from llmops_jupyter.core.runner import EventType

                    emit(EventType.LOG, message=f"{len(keep)} sampled completions at step {state.global_step}",
                         samples=keep, step=state.global_step)
            self._alerts(self.guards.observe(state.global_step, values, samples), control)

        def _alerts(self, alerts: list[Alert], control) -> None:
            for a in alerts:
                self.alert(a)
                if self.cfg.guard_action == "stop":
                    control.should_training_stop = True

    return RLCallback


def train_rl(cfg: RLConfig, model_path: Path, train_rows: list[dict], eval_rows: list[dict], out_dir: Path,
             reporter: Reporter, rewards: RewardSet, *, run_folder: Path, resume_from: Path | None = None,
             model_ref: str = "", adapter_dir: Path | None = None, check_fn: Callable | None = None,
             alert: Callable[[Alert], None] = print, callbacks: list | None = None) -> TrainOutput:
    """GRPO or RLOO on the prompts of ``train_rows``; writes the adapter (and its sampled completions) to
    ``adapter_dir``. The contract check runs first: nothing is trained or stored when a reward is broken."""
    import datasets
    import torch
    from transformers import AutoTokenizer, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

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

    train = rows_for_trl(train_rows, cfg.response_prefix)
    held = rows_for_trl(eval_rows, cfg.response_prefix)[: cfg.check_examples] or train[: cfg.check_examples]
    if not train:
        raise StageError("The dataset has no training prompts.", fix="pass a dataset with examples as --data")
    dtype = compute_dtype(cfg.dtype)
    reset_peak_memory()
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    gen_tokenizer = AutoTokenizer.from_pretrained(str(model_path))  # left padding for our own generation
    if gen_tokenizer.pad_token is None:
        gen_tokenizer.pad_token = gen_tokenizer.eos_token
    with oom_guard(cfg, model_ref or str(model_path)):  # type: ignore[arg-type]
        model = load_model(cfg, model_path, dtype)  # type: ignore[arg-type]
        if cfg.check_contract and not resume_from:
            reporter.progress(0, None, desc="contract check")
            picked = train[: max(1, min(2, len(train)))]
            ps, texts, ids = sample_completions(model, gen_tokenizer, [r["prompt"] for r in picked], n=2,
                                                max_new_tokens=min(cfg.max_completion_length, 32),
                                                temperature=cfg.temperature, seed=cfg.seed)
            columns = {"answer": [r["answer"] for r in picked for _ in range(2)],
                       "example_id": [r["example_id"] for r in picked for _ in range(2)]}
            problems = contract_check(rewards.funcs, ps, texts, ids, columns, timeout_s=cfg.reward_timeout_s)
            if problems:
                del model
                free_memory()
                raise StageError("Reward contract check failed before training (nothing was trained or stored):\n"
                                 + "\n".join(f"  - {p}" for p in problems),
                                 fix="fix the named reward function(s); each must return one finite number (or None) "
                                     "per completion")
            reporter.log(f"contract check passed: {', '.join(rewards.names)} on {len(texts)} sampled completions")
        counter = TokenCounter()
        hook = model.register_forward_pre_hook(counter, with_kwargs=True)
        common = dict(trainer_kwargs(cfg, out_dir, dtype, has_eval=False), num_generations=cfg.num_generations,  # type: ignore[arg-type]
                      max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, beta=cfg.beta,
                      epsilon=cfg.epsilon, reward_weights=list(rewards.weights), log_completions=False,
                      remove_unused_columns=False, gradient_checkpointing=False)
        if cfg.method == "rloo":
            args = RLOOConfig(**common)
            trainer_cls = RLOOTrainer
        else:
            args = GRPOConfig(**common, loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards)
            trainer_cls = GRPOTrainer
        guards = Guards(cfg)
        samples_path = run_folder / SAMPLES_FILE
        report = _callback_cls()(reporter, counter, desc="rl")
        check = None
        if check_fn is not None:
            def check(m: Any) -> float:
                return greedy_check(m, gen_tokenizer, held, check_fn, cfg.max_completion_length)
        rl = _rl_callback_cls()(cfg, reporter, rewards, guards, samples_path, check, alert)
        trainer = trainer_cls(model=model, reward_funcs=rewards.wrapped(), args=args,
                              train_dataset=datasets.Dataset.from_list(train), processing_class=tokenizer,
                              callbacks=[report, rl, *(callbacks or [])])
        trainer.remove_callback(PrinterCallback)
        try:
            torch.manual_seed(cfg.seed)
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            metrics: dict[str, float] = {"train_loss": float(result.training_loss),
                                         "train_runtime_s": float(result.metrics.get("train_runtime", 0.0))}
            logged = rl.rewards_logged
            if logged:
                k = min(5, len(logged))
                metrics["reward_start"] = statistics.fmean(logged[:k])
                metrics["reward_end"] = statistics.fmean(logged[-k:])
            if check is not None:
                if not rl.checks or rl.checks[-1][0] != trainer.state.global_step:
                    rl.model = trainer.model
                    rl._run_check(trainer.state.global_step, trainer.control)
                metrics["check_start"], metrics["check_end"] = rl.checks[0][1], rl.checks[-1][1]
            if adapter_dir is not None and samples_path.exists():
                adapter_dir.mkdir(parents=True, exist_ok=True)
                (adapter_dir / SAMPLES_FILE).write_bytes(samples_path.read_bytes())
            out = finish_run(trainer, model, counter, metrics, dtype=dtype, batching=f"generate+score ({cfg.method})",
                             train_examples=len(train), eval_examples=len(held), tokenizer=tokenizer,
                             adapter_dir=adapter_dir, save_kwargs={"selected_adapters": ["default"]},
                             rewards=list(rewards.names), reward_weights=list(rewards.weights),
                             alerts=[str(a) for a in guards.fired.values()])
            if rl.best_dir is not None and adapter_dir is not None:
                best = keep_best(adapter_dir, rl.best_dir)
                if best is None:  # pragma: no cover - every run with a check saves one at its first check
                    raise StageError("--keep best-check: no checked adapter was saved.", fix="rerun with --keep last")
                out.metrics["check_kept"] = best["score"]
                out.info.update(kept="best-check", kept_step=best["step"])
            elif adapter_dir is not None:
                out.info.update(kept="last", kept_step=trainer.state.global_step)
            return out
        finally:
            release(trainer, hook)
            del trainer, model
            free_memory()


def alert_to(ctx: Any, log_path: Path) -> Callable[[Alert], None]:
    """An alert goes to the cell (a toolkit warning, always shown), the run's log, the run's events and summary;
    with ``--guard-action stop`` the run also ends cleanly as ``pruned`` with the reason."""
    from llmops_jupyter.core.capture import LlmopsWarning

    def alert(a: Alert) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(f"ALERT {a}\n")
        warnings.warn(LlmopsWarning(str(a)), stacklevel=2)
        from llmops_jupyter.core.runner import EventType

        ctx.emit(EventType.LOG, message=str(a), alert={"guard": a.guard, "step": a.step, "message": a.message})
        ctx.summary.setdefault("alerts", []).append(str(a))
        if getattr(ctx.config, "guard_action", "alert") == "stop":
            ctx.request_stop(str(a))

    return alert

"""Options of ``%llmops rl`` and ``%llmops reward-model``: one dataclass each, the single source of every front
end's flags, help and validation.

The defaults are CPU-sane (they differ from TRL's ``GRPOConfig`` where TRL's bite on a CPU or a small model):
float32 unless a GPU supports bfloat16 (TRL: ``bf16=True``), no gradient checkpointing (TRL: on), a LoRA learning
rate (TRL: 1e-6, a full fine-tuning rate), 4 generations per prompt (TRL: 8) and 64-token completions (TRL: 512).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.stages.finetune.config import DTYPES, OPTIMIZERS, SCHEDULERS
from llmops_jupyter.stages.rl.rewards import portable, reward_name

__all__ = ["RLConfig", "RewardModelConfig", "reward_name"]

METHODS = ("grpo", "rloo")
LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")
GUARD_ACTIONS = ("alert", "stop")
KEEP = ("last", "best-check")


@dataclasses.dataclass
class RLConfig(StageConfig):
    model: str = option("tiny-llama", "base model: local checkpoint folder, registry ref or provider name")
    data: str = option("data@latest", "dataset artifact whose `prompt` is sampled from and whose reference answer "
                                      "(last assistant turn) reaches reward functions as `answer`")
    reward: list[Any] = option([], "reward functions, comma-separated: names of notebook callables "
                                   "(`fn(prompts, completions, answer, **kw) -> list[float]`), `$fn`, import paths "
                                   "module:function, or built-ins: exact, numeric, format, overlong, repetition, "
                                   "judge, reward-model@<ref>")
    reward_weights: list[float] = option([], "one weight per --reward (default: all 1.0); the total reward is the "
                                             "weighted sum")
    format_pattern: str = option(r"<answer>.*?</answer>", "regular expression the built-in `format` reward looks for "
                                                          "in a completion (1.0 when found)")
    method: str = option("grpo", "grpo: group-relative advantages (TRL GRPOTrainer); rloo: leave-one-out baseline "
                                 "(TRL RLOOTrainer)", choices=METHODS)
    peft: str = option("lora", "lora: adapters on a full-precision base; qlora: on a 4-bit NF4 base",
                       choices=["lora", "qlora"])
    response_prefix: str = option("", "text every answer starts with (e.g. '<answer>'): appended to each prompt for "
                                      "sampling and for the held-out check; rewards see the completion after it")
    num_generations: int = option(4, "completions sampled per prompt (the group whose rewards are compared)", min=2,
                                  max=1024)
    max_completion_length: int = option(64, "longest completion in tokens (longer ones are cut: 'clipped')", min=1,
                                        max=65536)
    temperature: float = option(1.0, "sampling temperature of the completions", min=0, min_exclusive=True, max=10)
    beta: float = option(0.0, "KL penalty towards the base model (0: none and no reference pass; KL is logged when "
                              "> 0)", min=0.0)
    epsilon: float = option(0.2, "clipping range of the policy ratio", min=0, min_exclusive=True, max=10)
    loss_type: str = option("dapo", "GRPO loss normalisation (TRL's loss_type; grpo only)", choices=LOSS_TYPES)
    scale_rewards: str = option("group", "divide advantages by the reward std of the group, the batch, or not at "
                                         "all (grpo only)", choices=["group", "batch", "none"])
    dtype: str = option("auto", "compute dtype (auto: bfloat16 on GPUs that support it, else float32)",
                        choices=DTYPES)
    rank: int = option(16, "LoRA rank r", min=1, max=4096, aliases=["lora_r"])
    alpha: float = option(32.0, "LoRA alpha (update scaled by alpha / rank)", min=0, min_exclusive=True,
                          aliases=["lora_alpha"])
    dropout: float = option(0.0, "dropout on the LoRA input (0: sampling and scoring see the same policy)", min=0,
                            max=0.9, aliases=["lora_dropout"])
    target_modules: list[str] = option(["auto"], "modules to adapt: 'auto' = every linear projection of the decoder, "
                                                 "'peft-default', or names")
    lr: float = option(1e-5, "peak learning rate", min=0, min_exclusive=True, max=1.0)
    scheduler: str = option("constant", "learning-rate schedule", choices=SCHEDULERS)
    warmup_steps: int = option(0, "linear warm-up steps", min=0)
    optim: str = option("auto", "optimizer (auto: AdamW; bitsandbytes 8-bit AdamW for qlora)", choices=OPTIMIZERS)
    epochs: float = option(1.0, "passes over the prompts (ignored when --max-steps > 0)", min=0, min_exclusive=True)
    max_steps: int = option(50, "stop after this many optimizer steps (0: use --epochs)", min=0)
    batch_size: int = option(8, "completions per device per step (a multiple of --num-generations)", min=1,
                             max=65536)
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step", min=1, max=65536)
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (GPU memory; slower)")
    seed: int = option(0, "seed for initialisation, prompt order and sampling", min=0)
    log_every: int = option(1, "log rewards, KL, lengths and sampled completions every N steps", min=1)
    samples_per_log: int = option(8, "sampled completions kept per log for the completions table", min=0, max=1024)
    checkpoint_every: int = option(25, "save a resumable checkpoint every N steps (0: never)", min=0)
    keep_checkpoints: int = option(2, "how many of the newest checkpoints to keep", min=1)
    resume: str | None = option(None, "rl run id to continue from its last checkpoint (training options come from "
                                      "that run; --max-steps may grow); reward functions are resolved again by name")
    detach: bool = option(False, "train in a supervised worker process; the cell returns at once (`%llmops attach "
                                 "<run>` shows it). Rewards must then be importable: built-ins, judge, "
                                 "reward-model@<ref>, or module:function (a notebook-only function is refused)")
    rm_reward: str = option("score", "what a reward-model@<ref> reward gives a completion: score (the reward model's "
                                     "raw score) or vs-reference (sigmoid of its score minus the score of the row's "
                                     "reference answer: the chance the reward model prefers it to the reference, in "
                                     "0-1, so an over-scored answer gains little; pair it with --scale-rewards none)",
                            choices=["score", "vs-reference"])
    check_contract: bool = option(True, "before training, call every reward on a few sampled completions and refuse "
                                        "wrong lengths, non-numbers, NaN, exceptions and slow calls")
    reward_timeout_s: float = option(5.0, "a reward call slower than this in the contract check is refused", min=0,
                                     min_exclusive=True)
    # guards
    guard_action: str = option("alert", "what a tripped guard does: alert (cell + run log) or stop (end cleanly, "
                                        "status 'pruned' with the reason)", choices=GUARD_ACTIONS)
    zero_std_max: float = option(0.8, "guard: share of groups with equal rewards above this for 3 logs", min=0, max=1)
    length_ratio_max: float = option(2.0, "guard: mean completion length above this × its first logged value", min=1)
    clipped_max: float = option(0.5, "guard: share of completions cut at --max-completion-length above this", min=0,
                                max=1)
    kl_max: float = option(1.0, "guard: KL to the base model above this (only logged when --beta > 0)", min=0,
                           min_exclusive=True)
    dominance_max: float = option(0.9, "guard: one reward component carrying more than this share of the reward "
                                       "variance (needs 2+ rewards)", min=0, max=1)
    check_every: int = option(0, "every N steps, greedy answers on held-out prompts scored by --check-reward (0: "
                                 "off); guard: reward rising while this check does not", min=0)
    check_reward: str = option("exact", "verifiable reward for the held-out check (a built-in or a notebook "
                                        "callable)")
    check_examples: int = option(8, "held-out prompts for the check (from the eval split, else the train split)",
                                 min=1)
    keep: str = option("last", "which adapter the run stores: last (the final step's) or best-check (the one from "
                               "the step whose held-out check scored best, as the Trainer's load_best_model_at_end; "
                               "needs --check-every)", choices=KEEP)
    # RLAIF judge
    judge: str | None = option(None, "with --reward judge: the judge model (registry ref, provider) or an "
                                     "OpenAI-compatible URL")
    judge_model: str | None = option(None, "model name sent to a judge endpoint")
    judge_rubric: str | None = option(None, "rubric for --reward judge (text or file; {{ prompt }}, "
                                            "{{ reference }}, {{ output }}); scores 1-5 are scaled to 0-1")
    judge_api_key_env: str = option("OPENAI_API_KEY", "environment variable holding the judge endpoint's API key")
    judge_max_calls: int = option(2000, "most judge calls in a run (cached (prompt, completion) pairs are free)",
                                  min=1)
    adapter_name: str | None = option(None, "name for the adapter artifact (default: <base model>-<method>)")

    def validate(self) -> None:
        if isinstance(self.reward, (str,)) or callable(self.reward):
            self.reward = [self.reward]
        flat: list[Any] = []
        for r in self.reward:
            flat.extend(x.strip() for x in r.split(",") if x.strip()) if isinstance(r, str) else flat.append(r)
        self.reward = flat
        if not self.reward and not self.resume:  # a resumed run takes its rewards' names from that run
            raise self.invalid("reward", "needs at least one reward function",
                               fix="pass --reward NAME (a notebook function, or a built-in such as format)")
        for r in self.reward:
            if not isinstance(r, str) and not callable(r):
                raise self.invalid("reward", f"item {r!r} is neither a name nor a callable",
                                   fix="pass function names or $fn")
        if self.detach:  # the worker process has no notebook: every reward must be importable there
            self.reward = [portable(r, self) for r in self.reward]
            if self.check_every:
                self.check_reward = portable(self.check_reward, self, flag="--check-reward")
        if isinstance(self.reward_weights, (int, float)):
            self.reward_weights = [float(self.reward_weights)]
        try:
            self.reward_weights = [float(w) for w in self.reward_weights]
        except (TypeError, ValueError):
            raise self.invalid("reward_weights", "must be numbers", fix="e.g. --reward-weights 1.0,0.5") from None
        if self.reward_weights and len(self.reward_weights) != len(self.reward):
            raise self.invalid("reward_weights", f"has {len(self.reward_weights)} weight(s) for {len(self.reward)} "
                               "reward(s)", fix="give one weight per --reward, in the same order")
        if self.batch_size % self.num_generations:
            raise self.invalid("batch_size", f"must be a multiple of --num-generations ({self.num_generations})",
                               fix=f"use --batch-size {self.num_generations * max(1, self.batch_size // self.num_generations)}")
        if "judge" in [reward_name(r) for r in self.reward] and not self.judge:
            raise self.invalid("judge", "is needed with --reward judge",
                               fix="pass --judge <model or http(s) URL> (not the model being trained)")
        if not self.target_modules:
            raise self.invalid("target_modules", "must name at least one module", fix="use --target-modules auto")
        if self.keep == "best-check" and not self.check_every and not self.resume:
            raise self.invalid("keep", "best-check picks the adapter by the held-out check, and --check-every is 0",
                               fix="add --check-every N (e.g. 10), or drop --keep")
        if self.rm_reward != "score" and self.reward and not any(
                reward_name(r).startswith("reward-model") for r in self.reward):
            raise self.invalid("rm_reward", f"{self.rm_reward} applies to a reward-model@<ref> reward, and --reward "
                               "has none", fix="add --reward reward-model@latest, or drop --rm-reward")

    def to_params(self) -> dict[str, Any]:
        out = super().to_params()
        out["reward"] = [reward_name(r) for r in self.reward]  # callables are stored by name (resolved again)
        return out


#: Options that may differ between an interrupted run and its --resume without changing the result.
RESUME_FREE = ("resume", "detach", "checkpoint_every", "keep_checkpoints", "log_every", "samples_per_log", "adapter_name",
               "check_contract", "reward_timeout_s", "guard_action", "zero_std_max", "length_ratio_max",
               "clipped_max", "kl_max", "dominance_max", "check_every", "check_examples", "judge_max_calls", "reward")
RESUME_EXTEND = ("max_steps", "epochs")


@dataclasses.dataclass
class RewardModelConfig(StageConfig):
    data: str = option("pairs@latest", "preference dataset (prompt/chosen/rejected), e.g. from `%llmops pairs`")
    model: str = option("tiny-llama", "base model the reward model starts from (a sequence-classification head is "
                                      "added)")
    rank: int = option(16, "LoRA rank r", min=1, max=4096, aliases=["lora_r"])
    alpha: float = option(32.0, "LoRA alpha", min=0, min_exclusive=True, aliases=["lora_alpha"])
    dropout: float = option(0.0, "LoRA dropout", min=0, max=0.9)
    lr: float = option(1e-3, "learning rate", min=0, min_exclusive=True, max=1.0)
    epochs: float = option(3.0, "passes over the training pairs (ignored when --max-steps > 0)", min=0,
                           min_exclusive=True)
    max_steps: int = option(0, "stop after this many optimizer steps (0: use --epochs)", min=0)
    batch_size: int = option(8, "pairs per step", min=1, max=65536)
    seq_len: int = option(256, "longest prompt + answer in tokens: longer training pairs are left out (TRL drops "
                               "them; the count is logged), longer scored texts are truncated", min=8, max=1_048_576)
    eval_fraction: float = option(0.2, "share of pairs held out for pairwise accuracy when the dataset has no eval "
                                       "split", min=0.0, max=0.9)
    seed: int = option(0, "seed", min=0)
    log_every: int = option(5, "log loss every N steps", min=1)
    name: str | None = option(None, "name of the reward-model artifact (default: <base>-reward-model)")

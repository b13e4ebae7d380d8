"""Options of ``%llmops finetune`` and ``%llmops attach``: one dataclass each, the single source of every front end's
flags, help and validation."""

from __future__ import annotations

import dataclasses

from llmops_jupyter.core.config import StageConfig, option

METHODS = ("lora", "qlora", "dpo")

#: sft: loss on the response of instruction/chat examples; causal-lm: continued pretraining on raw text (a dataset
#: made with ``data --format text``), loss on every token; auto: what the dataset's layout says.
OBJECTIVES = ("auto", "sft", "causal-lm")


DTYPES = ("auto", "float32", "bfloat16", "float16")


SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr", "inverse_sqrt",
              "polynomial", "warmup_stable_decay")


OPTIMIZERS = ("auto", "adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
              "adafactor", "sgd")


@dataclasses.dataclass
class FinetuneConfig(StageConfig):
    model: str = option("tiny-llama", "base model: local checkpoint folder, registry ref or provider name")
    data: str = option("data@latest", "dataset artifact: data run id, dataset hash, 'data@latest' or a folder")
    method: str = option("lora", "lora: adapters on a full-precision base; qlora: on a 4-bit NF4 base "
                                 "(bitsandbytes, double quantization); dpo: a LoRA adapter trained with TRL's "
                                 "DPOTrainer on a preference dataset (`%llmops pairs`)", choices=METHODS)
    objective: str = option("auto", "sft: learn the responses of an instruction/chat dataset; causal-lm: continued "
                                    "pretraining on a text dataset (`data DOCS --format text`), loss on every token, "
                                    "chunks packed with positions and attention reset per chunk; auto: causal-lm for "
                                    "a text dataset, else sft (a mismatch is refused)", choices=OBJECTIVES)
    train_embeddings: bool = option(False, "also train the input embeddings and the output layer (embed_tokens, "
                                           "lm_head) in full beside the LoRA adapters (peft modules_to_save; tied "
                                           "embeddings stay tied), at --embedding-lr: new domain vocabulary in "
                                           "continued pretraining")
    embedding_lr: float | None = option(None, "learning rate of the embeddings with --train-embeddings (default "
                                              "--lr / 10, as Unsloth's continued-pretraining notebook)", min=0,
                                        min_exclusive=True, max=1.0)
    dpo_base: str = option("lora", "with --method dpo: adapt a full-precision (lora) or 4-bit NF4 (qlora) base",
                           choices=["lora", "qlora"])
    beta: float = option(0.1, "with --method dpo: DPO temperature β (higher = stay closer to the base model)",
                         min=0.0, min_exclusive=True)
    dtype: str = option("auto", "compute dtype of the base model (auto: bfloat16 on GPUs that support it, else "
                                "float32)", choices=DTYPES)
    rank: int = option(16, "LoRA rank r (size of the low-rank update; peft's `r`)", min=1, max=4096,
                       aliases=["lora_r"])
    alpha: float = option(32.0, "LoRA alpha; the update is scaled by alpha / rank (peft's `lora_alpha`)", min=0,
                          min_exclusive=True, aliases=["lora_alpha"])
    dropout: float = option(0.05, "dropout on the LoRA input (peft's `lora_dropout`)", min=0, max=0.9,
                            aliases=["lora_dropout"])
    target_modules: list[str] = option(["auto"], "modules to adapt: 'auto' = every linear projection of the decoder "
                                                 "(peft 'all-linear', lm_head excluded), 'peft-default' = peft's "
                                                 "per-architecture default (e.g. q_proj,v_proj for Llama), or names")
    lr: float = option(2e-4, "peak learning rate", min=0, min_exclusive=True, max=1.0)
    scheduler: str = option("cosine", "learning-rate schedule (transformers scheduler names)", choices=SCHEDULERS)
    warmup_steps: int = option(0, "linear warm-up steps before the schedule", min=0)
    optim: str = option("auto", "optimizer (auto: paged 8-bit AdamW for qlora on CUDA, bitsandbytes 8-bit AdamW for "
                                "qlora on CPU, else AdamW)", choices=OPTIMIZERS)
    epochs: float = option(1.0, "passes over the training split (ignored when --max-steps > 0)", min=0,
                           min_exclusive=True)
    max_steps: int = option(0, "stop after this many optimizer steps (0: use --epochs)", min=0)
    batch_size: int = option(8, "examples per device per micro-batch", min=1, max=65536)
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step", min=1, max=65536)
    seq_len: int = option(1024, "truncate examples to this many tokens", min=8, max=1_048_576)
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory, ~30% "
                                                 "slower)")
    seed: int = option(0, "seed for initialisation, data order and dropout (same seed → same adapter)", min=0)
    packing: bool = option(True, "padding-free packing: a micro-batch's examples are concatenated into rows and "
                                 "never attend across each other (verified on the attention implementation in use; "
                                 "falls back to length-grouped padding when that check fails)")
    batching: str = option("auto", "auto: the packing check picks the attention kernel (fastest that passes its "
                                   "contamination probe) and the cheapest layout by a cost model, and records why; "
                                   "flat: one packed row per micro-batch; packed: rows no longer than the "
                                   "micro-batch's longest example; grouped: length-grouped padding",
                           choices=["auto", "flat", "packed", "grouped"])
    kernels: str = option("none", "liger: Liger's fused linear cross-entropy, RMSNorm and SwiGLU kernels (CUDA only, "
                                  "the [liger] extra; checked against the plain model's loss on the first batch)",
                          choices=["none", "liger"])
    completion_only_loss: bool = option(True, "train on the response tokens only (prompt tokens are masked)")
    log_every: int = option(10, "log metrics (loss, lr, tokens/s, memory) every N optimizer steps", min=1)
    checkpoint_every: int = option(50, "save a resumable checkpoint every N steps (0: never)", min=0)
    eval_every: int = option(0, "evaluate on the eval split every N steps (0: only at the end)", min=0)
    eval_limit: int = option(0, "score at most N examples of the eval split, spread evenly over it (0: all): the "
                                "eval_loss of --eval-every and of the end of the run; a large held-out split of "
                                "documents can otherwise cost more than the training", min=0)
    keep_checkpoints: int = option(2, "how many of the newest checkpoints to keep", min=1)
    resume: str | None = option(None, "run id to continue from its last checkpoint: training options come from that "
                                      "run (the result equals an uninterrupted run); --max-steps/--epochs may change "
                                      "to train longer, cadence options (--log-every, --checkpoint-every, "
                                      "--eval-every) are free, any other changed option is refused")
    detach: bool = option(False, "train in a supervised worker process; the cell returns at once "
                                 "(`%llmops attach <run>` shows it)")
    launcher: str = option("none", "none: train in this process; accelerate: `accelerate launch` with "
                                   "--num-processes workers (multi-GPU)", choices=["none", "accelerate"])
    num_processes: int = option(1, "processes for --launcher accelerate (one per GPU)", min=1, max=1024)
    adapter_name: str | None = option(None, "name for the adapter artifact (default: <base model>-<method>)")

    def validate(self) -> None:
        if self.method == "dpo" and self.launcher != "none":
            raise self.invalid("launcher", "is not supported with --method dpo yet",
                               fix="drop --launcher (DPO trains in the kernel or with --detach)")
        if self.num_processes > 1 and self.launcher == "none":
            raise self.invalid("num_processes", "needs --launcher accelerate to start more than one process",
                               fix="add --launcher accelerate, or drop --num-processes")
        if self.method == "dpo" and self.objective == "causal-lm":
            raise self.invalid("objective", "causal-lm does not apply to --method dpo (it trains on preference pairs)",
                               fix="use --method lora or qlora for continued pretraining")
        if self.embedding_lr is not None and not self.train_embeddings:
            raise self.invalid("embedding_lr", "only applies with --train-embeddings",
                               fix="add --train-embeddings, or drop --embedding-lr")
        if self.train_embeddings and self.method == "dpo":
            raise self.invalid("train_embeddings", "is not supported with --method dpo",
                               fix="drop --train-embeddings")
        if not self.target_modules:
            raise self.invalid("target_modules", "must name at least one module", fix="use --target-modules auto")


#: Options that may differ between an interrupted run and its --resume without changing the result.
RESUME_FREE = ("resume", "detach", "launcher", "num_processes", "checkpoint_every", "keep_checkpoints", "log_every",
               "eval_every", "eval_limit", "adapter_name")
#: Options a --resume may change to train longer or shorter; honoured and recorded (``resume_changes``). Every other
#: training option is the interrupted run's, and giving a different value is refused.
RESUME_EXTEND = ("max_steps", "epochs")


@dataclasses.dataclass
class AttachConfig(StageConfig):
    run: str = option("finetune@latest", "the training run to watch: finetune or rl (id, prefix, 'finetune@latest', "
                                         "'rl@latest')",
                      positional=True)
    wait: bool = option(False, "block until the run ends (scripts, papermill); otherwise the view updates in the "
                               "background and the cell returns")
    poll_s: float = option(1.0, "seconds between registry polls", min=0.05, max=3600)
    stop: bool = option(False, "ask the run's worker process to stop (like Ctrl-C: it keeps its last checkpoint)")

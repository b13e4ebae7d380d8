"""Preference tuning: human judgements → (prompt, chosen, rejected) pairs → a DPO-trained LoRA adapter.

Two sources of judgements, both already in the registry:

* ratings from the eval side-by-side widget (``%llmops rate``): a preferred version makes its output *chosen* and
  every other version shown next to it *rejected* (:func:`llmops_jupyter.stages.eval.store.preference_pairs`);
* labels from monitoring's flagged-records widget: a record labelled *bad* with a corrected response gives
  chosen = the correction, rejected = what the deployment answered.

:func:`train_dpo` is the DPO counterpart of :func:`llmops_jupyter.stages.finetune.sft.train`: the same model loading
(LoRA, or QLoRA on a 4-bit NF4 base), optimizer choice, checkpoints, reporter protocol and OOM advice, with TRL's
``DPOTrainer`` in place of ``Trainer``. The reference model is the base itself (TRL keeps a frozen copy of the
freshly initialised adapter, which equals the base because LoRA's B matrix starts at zero), so no second model is
loaded. Imported lazily (torch, transformers, peft, trl live here).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmops_jupyter.core.errors import DataError

if TYPE_CHECKING:
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.stages.finetune.config import FinetuneConfig
    from llmops_jupyter.stages.finetune.train import Reporter, TrainOutput

DPO_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected")


# -- pairs -------------------------------------------------------------------------------------------------------------
def rating_pairs(registry: Registry, runs: list[str]) -> list[dict[str, Any]]:
    """Pairs from the ratings of the given eval runs (the latest rating per example and comparison wins)."""
    from llmops_jupyter.stages.eval import store as evalstore

    out: dict[tuple, dict[str, Any]] = {}
    for run in runs:
        for p in evalstore.preference_pairs(registry, run):
            key = (p["example_id"], tuple(p["chosen_version"]), tuple(p["rejected_version"]))
            out[key] = {**p, "source": "rating"}
    return list(out.values())


def label_pairs(registry: Registry, deployment: str) -> list[dict[str, Any]]:
    """Pairs from monitoring labels: 'bad' records with a corrected response (chosen) vs the logged answer."""
    rows = registry.corrected_requests(deployment)
    out = []
    for r in rows:
        if not r["response"] or r["corrected"].strip() == r["response"].strip():
            continue
        msgs = json.loads(r["messages"]) if r["messages"] else [{"role": "user", "content": r["prompt"] or ""}]
        out.append({"example_id": f"request-{r['id']}", "messages": msgs, "chosen": r["corrected"],
                    "rejected": r["response"], "source": "monitor-label", "request": r["id"],
                    "model": r["model"], "created_at": r["ts"]})
    return out


def to_examples(pairs: list[dict[str, Any]], tokenizer: Any | None) -> list[dict[str, Any]]:
    """Pair rows in the dataset format: ``prompt`` (chat-templated), ``chosen``, ``rejected`` — plus
    ``completion``/``text`` = the chosen answer, so the same dataset also works for supervised fine-tuning."""
    import hashlib

    from llmops_jupyter.stages.data.format import render

    out = []
    for p in pairs:
        if "messages" in p:  # monitoring records: template the conversation like the data stage does
            rendered = render([*p["messages"], {"role": "assistant", "content": p["chosen"]}], tokenizer)
            prompt = rendered["prompt"]
        else:  # ratings: exactly the prompt the rated versions were given
            prompt = p["prompt"]
        eos = getattr(tokenizer, "eos_token", None) or "<|im_end|>"
        ex_id = hashlib.sha1(json.dumps([prompt, p["chosen"], p["rejected"]]).encode()).hexdigest()[:16]
        meta = {k: v for k, v in p.items() if k not in ("prompt", "chosen", "rejected", "messages")}
        out.append({"id": ex_id, "prompt": prompt, "chosen": p["chosen"], "rejected": p["rejected"],
                    "completion": p["chosen"] + eos, "text": prompt + p["chosen"] + eos, "messages":
                    p.get("messages"), "meta": meta})
    return out


def check_pairs(rows: list[dict[str, Any]], where: str) -> None:
    """A DPO dataset must hold prompt/chosen/rejected rows; say how to make one otherwise."""
    if not rows:
        raise DataError(f"Dataset {where} has no training pairs.", fix="rate more examples (`%llmops rate`) and "
                        "rebuild the pairs with `%llmops pairs --from <eval run>`")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in rows[0]]
    if missing:
        raise DataError(f"Dataset {where} has no {'/'.join(missing)} fields: it is not a preference dataset.",
                        fix="build one from ratings with `%llmops pairs --from <eval run>` and pass it as --data")


# -- training ----------------------------------------------------------------------------------------------------------
def _capture_cls():
    from transformers import TrainerCallback

    class Capture(TrainerCallback):
        """Keeps the last evaluation's logs (DPOTrainer adds its reward metrics at log time, not to the return)."""

        def __init__(self) -> None:
            self.last: dict[str, float] = {}

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and any(k.startswith("eval_") for k in logs):
                self.last = dict(logs)

    return Capture


def train_dpo(cfg: FinetuneConfig, model_path: Path, train_rows: list[dict], eval_rows: list[dict], out_dir: Path,
              reporter: Reporter, *, resume_from: Path | None = None, model_ref: str = "",
              adapter_dir: Path | None = None, callbacks: list | None = None) -> TrainOutput:
    """DPO on ``train_rows`` (prompt/chosen/rejected); writes the adapter to ``adapter_dir``.

    Besides the per-step ``rewards/*`` metrics (streamed to the dashboard), the mean chosen-vs-rejected reward
    margin on the training pairs is measured before and after training (``dpo_margin_start`` /
    ``dpo_margin_end``): the number that says whether the preferences were learned.
    """
    import datasets
    from transformers import AutoTokenizer, PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from llmops_jupyter.stages.finetune.train import (
        TokenCounter,
        _callback_cls,
        compute_dtype,
        eval_subset,
        finish_run,
        free_memory,
        load_model,
        oom_guard,
        release,
        reset_peak_memory,
        trainer_kwargs,
    )

    check_pairs(train_rows, str(model_ref))
    dtype = compute_dtype(cfg.dtype)
    reset_peak_memory()
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def ds(rows: list[dict]) -> Any:
        return datasets.Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                                           for r in rows])

    eval_total = len(eval_rows)
    eval_rows = eval_subset(eval_rows, cfg.eval_limit)
    train_ds, eval_ds = ds(train_rows), (ds(eval_rows) if eval_rows else None)
    with oom_guard(cfg, model_ref or str(model_path)):
        model = load_model(cfg, model_path, dtype)  # LoRA / QLoRA exactly as for supervised fine-tuning
        counter = TokenCounter()
        hook = model.register_forward_pre_hook(counter, with_kwargs=True)
        args = DPOConfig(**trainer_kwargs(cfg, out_dir, dtype, has_eval=eval_ds is not None), beta=cfg.beta,
                         max_length=cfg.seq_len, dataset_num_proc=None)
        report = _callback_cls()(reporter, counter)
        capture = _capture_cls()()
        trainer = DPOTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             processing_class=tokenizer, callbacks=[report, capture, *(callbacks or [])])
        trainer.remove_callback(PrinterCallback)
        try:
            prepared = trainer._prepare_dataset(train_ds, tokenizer, args, "margin")  # tokenized once, used twice

            def margins(t: Any = trainer) -> dict[str, float]:
                t.evaluate(eval_dataset=prepared, metric_key_prefix="pairs")
                return {k[len("eval_"):]: v for k, v in capture.last.items() if k.startswith("eval_rewards/")}

            start = margins() if not resume_from else {}
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            end = margins()
            metrics: dict[str, float] = {"train_loss": float(result.training_loss),
                                         "train_runtime_s": float(result.metrics.get("train_runtime", 0.0))}
            names = {"rewards/margins": "margin", "rewards/accuracies": "accuracy", "rewards/chosen": "reward_chosen",
                     "rewards/rejected": "reward_rejected"}
            for prefix, values in (("start", start), ("end", end)):
                for key, name in names.items():
                    if values.get(key) is not None:
                        metrics[f"dpo_{name}_{prefix}"] = float(values[key])
            if eval_ds is not None:
                ev = trainer.evaluate()
                metrics["eval_loss"] = float(ev["eval_loss"])
                if "eval_rewards/margins" in ev:
                    metrics["eval_margin"] = float(ev["eval_rewards/margins"])
            return finish_run(trainer, model, counter, metrics, dtype=dtype, batching="padded (DPO)",
                              train_examples=len(train_ds), eval_examples=len(eval_ds) if eval_ds is not None else 0,
                              tokenizer=tokenizer, adapter_dir=adapter_dir,
                              save_kwargs={"selected_adapters": ["default"]}, beta=cfg.beta,
                              **({"eval_examples_total": eval_total} if len(eval_rows) < eval_total else {}))
        finally:
            release(trainer, hook)
            del trainer, model
            free_memory()

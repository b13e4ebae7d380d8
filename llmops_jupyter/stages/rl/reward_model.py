"""RLHF's reward model: TRL ``RewardTrainer`` on (prompt, chosen, rejected) pairs — the preference datasets that
``%llmops pairs`` builds from ratings and monitoring labels, the same ones DPO trains on — with LoRA on a
sequence-classification head (one scalar per sequence), and :class:`RewardModelScorer`, the reward callable that
``--reward reward-model@<ref>`` resolves to. Imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmops_jupyter.stages.finetune.train import Reporter
    from llmops_jupyter.stages.rl.config import RewardModelConfig

META_FILE = "llmops_reward_model.json"


def _load_seqcls(base_path: str | Path, dtype: Any = None) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(str(base_path), num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def as_trained(tok: Any, text: str) -> str:
    """The text as TRL's ``RewardTrainer`` feeds it: the EOS token appended (non-conversational rows), then the
    tokenizer's own special tokens. Scoring any other way reads the head at a different token than it was trained
    on: with a pad token other than EOS the trained score sits on the EOS, not on the answer's last token."""
    eos = tok.eos_token
    return text if not eos or text.endswith(eos) else text + eos


def score_texts(model: Any, tok: Any, texts: list[str], *, batch_size: int = 16, max_length: int = 512) -> list[float]:
    import torch

    tok.padding_side = "right"
    out: list[float] = []
    model.eval()
    texts = [as_trained(tok, t) for t in texts]
    for i in range(0, len(texts), batch_size):
        batch = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                    max_length=max_length)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with torch.inference_mode():
            out += model(**batch).logits[:, 0].float().tolist()
    return out


def pairwise_accuracy(model: Any, tok: Any, rows: list[dict[str, Any]], max_length: int) -> float:
    """Share of pairs whose chosen answer scores above the rejected one. Each distinct text is scored once: pairs
    that share a prompt and a chosen answer (one preferred answer against many rejected ones) do not re-score it."""
    if not rows:
        return float("nan")
    texts = list(dict.fromkeys(r["prompt"] + r[k] for r in rows for k in ("chosen", "rejected")))
    score = dict(zip(texts, score_texts(model, tok, texts, max_length=max_length)))
    return sum(score[r["prompt"] + r["chosen"]] > score[r["prompt"] + r["rejected"]] for r in rows) / len(rows)


def train_reward_model(cfg: RewardModelConfig, base_path: Path, train_rows: list[dict], eval_rows: list[dict],
                       out_dir: Path, reporter: Reporter) -> tuple[dict[str, float], dict[str, Any]]:
    """Train, measure held-out pairwise accuracy (the dataset's eval split, else a deterministic ``--eval-fraction``
    of the pairs) and save the LoRA adapter with its head to ``out_dir``."""
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import PrinterCallback, set_seed
    from trl import RewardConfig, RewardTrainer

    from llmops_jupyter.stages.finetune.dpo import check_pairs
    from llmops_jupyter.stages.finetune.train import _callback_cls, free_memory

    check_pairs(train_rows, cfg.data)
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in train_rows]
    held = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in eval_rows
            if "chosen" in r]
    if not held and cfg.eval_fraction > 0 and len(rows) > 1:
        def is_eval(r: dict) -> bool:
            h = hashlib.sha1(json.dumps([r["prompt"], r["chosen"], r["rejected"]]).encode()).hexdigest()
            return int(h, 16) % 1000 < cfg.eval_fraction * 1000

        held = [r for r in rows if is_eval(r)]
        rows = [r for r in rows if not is_eval(r)] or held[:1]
    set_seed(cfg.seed)
    model, tok = _load_seqcls(base_path)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type="SEQ_CLS",
                      target_modules="all-linear")
    model = get_peft_model(model, lora)
    args = RewardConfig(output_dir=str(out_dir.parent / (out_dir.name + "-ckpt")), per_device_train_batch_size=cfg.batch_size,
                        learning_rate=cfg.lr, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
                        logging_steps=cfg.log_every, save_strategy="no", report_to=[], disable_tqdm=True,
                        seed=cfg.seed, data_seed=cfg.seed, max_length=cfg.seq_len, bf16=False, use_cpu=True,
                        gradient_checkpointing=False, dataset_num_proc=None)
    import torch

    if torch.cuda.is_available():
        args.use_cpu = False
    report = _callback_cls()(reporter, _NoCounter(), desc="reward-model")
    trainer = RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                            processing_class=tok, callbacks=[report])
    trainer.remove_callback(PrinterCallback)
    too_long = len(rows) - len(trainer.train_dataset)  # TRL drops (does not truncate) pairs over max_length
    if too_long:
        reporter.log(f"reward-model: {too_long} of {len(rows)} training pair(s) are longer than --seq-len "
                     f"{cfg.seq_len} tokens and were left out (TRL's RewardTrainer drops them); raise --seq-len to "
                     "keep them")
    try:
        start = pairwise_accuracy(model, tok, held, cfg.seq_len)
        result = trainer.train()
        metrics = {"train_loss": float(result.training_loss),
                   "train_runtime_s": float(result.metrics.get("train_runtime", 0.0)),
                   "pairwise_accuracy_start": start,
                   "pairwise_accuracy": pairwise_accuracy(model, tok, held, cfg.seq_len),
                   "train_pairwise_accuracy": pairwise_accuracy(model, tok, rows, cfg.seq_len)}
        model.save_pretrained(str(out_dir))
        tok.save_pretrained(str(out_dir))
        (out_dir / META_FILE).write_text(json.dumps({"base_model_path": str(base_path), "seq_len": cfg.seq_len}))
        info = {"train_pairs": len(rows) - too_long, "train_pairs_too_long": too_long, "eval_pairs": len(held),
                "steps": trainer.state.global_step}
        return {k: v for k, v in metrics.items() if v == v}, info
    finally:
        trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
        del trainer, model
        free_memory()


class _NoCounter:
    tokens = positions = 0
    padding_pct = 0.0


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class RewardModelScorer:
    """``--reward reward-model@<ref>``: score prompt + completion with a trained reward model (a scalar per text).

    ``baseline="vs-reference"`` (``--rm-reward vs-reference``) gives ``sigmoid(score - score of the reference)``,
    the reference being the row's answer (its last assistant turn, after ``--response-prefix``): the Bradley-Terry
    chance that the reward model prefers the completion to the reference. It is bounded, so an answer the reward
    model over-scores gets at most 1, only 0.5 above one it scores like the reference, and with ``--scale-rewards none`` a
    group of answers all far below the reference gets (almost) no advantage instead of a push towards its
    best-scored one (the "Preference As Reward" shaping of Fu et al., 2025, arXiv:2502.18770)."""

    def __init__(self, path: Path, *, name: str = "reward-model", baseline: str = "score", prefix: str = ""):
        from peft import PeftModel

        meta = json.loads((Path(path) / META_FILE).read_text())
        base, self.tok = _load_seqcls(meta["base_model_path"])
        self.model = PeftModel.from_pretrained(base, str(path)).eval()
        self.max_length = int(meta.get("seq_len", 512))
        self.__name__ = name
        self.baseline, self.prefix = baseline, prefix
        self._reference: dict[str, float] = {}  # prompt + reference text -> its score (scored once per run)

    def _score(self, texts: list[str]) -> list[float]:
        return score_texts(self.model, self.tok, texts, max_length=self.max_length)

    def __call__(self, prompts: list, completions: list, answer: list | None = None, **_: Any) -> list[float]:
        scores = self._score([str(p) + str(c) for p, c in zip(prompts, completions)])
        if self.baseline == "score":
            return scores
        if answer is None or any(not str(a).strip() for a in answer):
            raise ValueError("--rm-reward vs-reference needs each row's reference answer (the dataset's last "
                             "assistant turn or answer field) and a row has none")
        refs = [str(p) + (str(a)[len(self.prefix):] if self.prefix and str(a).startswith(self.prefix) else str(a))
                for p, a in zip(prompts, answer)]
        new = list(dict.fromkeys(t for t in refs if t not in self._reference))
        self._reference.update(zip(new, self._score(new)))
        return [_sigmoid(s - self._reference[r]) for s, r in zip(scores, refs)]

    def close(self) -> None:
        self.model = None

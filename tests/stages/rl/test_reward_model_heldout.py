"""The reward model's held-out pairwise accuracy is measured on the dataset's eval split, can fail, and reads the
score where TRL's RewardTrainer trained it.

A learnable distinction (the chosen answer starts with one of six words, the rejected one with one of six others;
an untrained head ranks them at about chance) reaches a high held-out accuracy; the
same pairs with chosen and rejected swapped at random carry no signal and stay near 0.5. Pairs come from the data
stage's preference format, as a user's would."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("trl")

COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
GOOD = ["yes", "good", "right", "true", "correct", "fine"]  # the chosen answer starts with one of these,
BAD = ["no", "bad", "wrong", "false", "broken", "poor"]  # the rejected one with one of these


def pairs_dataset(registry, tmp_path, tokenizer, *, shuffled: bool, n: int = 100):
    from llmops_jupyter.core.runner import Runner

    rng = random.Random(0)
    rows = []
    for i in range(n):
        c = rng.choice(COLOURS)
        chosen, rejected = f"{rng.choice(GOOD)}, {c} {i}", f"{rng.choice(BAD)}, {c} {i}"
        if shuffled and rng.random() < 0.5:
            chosen, rejected = rejected, chosen
        rows.append({"prompt": f"Is item {i} {c}?", "chosen": chosen, "rejected": rejected})
    src = tmp_path / ("shuffled.jsonl" if shuffled else "pairs.jsonl")
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return Runner(registry).run("data", source=str(src), tokenizer=str(tokenizer), eval_fraction=0.4).artifact


def train(registry, data, tiny_model):
    from llmops_jupyter.core.runner import Runner

    return Runner(registry, defaults=False).run("reward-model", {
        "data": data.hash, "model": str(tiny_model), "max_steps": 12, "batch_size": 8, "lr": 5e-3, "seed": 0})


def test_held_out_accuracy_is_high_when_learnable_and_chance_when_labels_are_shuffled(registry, tmp_path,
                                                                                      tiny_model):
    from llmops_jupyter.stages.data.format import load_dataset

    good = pairs_dataset(registry, tmp_path, tiny_model, shuffled=False)
    ds = load_dataset(good.hash, registry)
    rm = train(registry, good, tiny_model)
    assert rm.summary["eval_pairs"] == len(ds.eval) == 40 and rm.summary["train_pairs"] == len(ds.train) == 60
    assert rm.metrics["pairwise_accuracy"] >= 0.9 and rm.metrics["pairwise_accuracy_start"] <= 0.6, rm.metrics
    noise = train(registry, pairs_dataset(registry, tmp_path, tiny_model, shuffled=True), tiny_model)
    assert 0.3 <= noise.metrics["pairwise_accuracy"] <= 0.7, noise.metrics
    # the reward model is a registered artifact with lineage from its pairs
    assert {a.kind for a in registry.lineage_chain(rm.artifact)} >= {"dataset", "reward-model"}


def test_the_scorer_reads_the_score_at_the_token_trl_trained(registry, tmp_path, tiny_model):
    """The tiny tokenizer's pad token is not its EOS, so TRL trains the score on the EOS it appends; scoring the bare
    text (as the stage once did) reads another position and disagrees."""
    import datasets
    import torch
    from trl import RewardConfig, RewardTrainer

    from llmops_jupyter.stages.rl.reward_model import RewardModelScorer

    rm = train(registry, pairs_dataset(registry, tmp_path, tiny_model, shuffled=False, n=20), tiny_model)
    scorer = RewardModelScorer(rm.artifact.path)
    assert scorer.tok.pad_token != scorer.tok.eos_token
    row = {"prompt": "<|im_start|>user\nIs item 3 red?<|im_end|>\n<|im_start|>assistant\n", "chosen": "yes, red 3",
           "rejected": "no, red 3"}
    trainer = RewardTrainer(model=scorer.model, processing_class=scorer.tok, train_dataset=datasets.Dataset.from_list(
        [row]), args=RewardConfig(output_dir=str(tmp_path / "t"), report_to=[], use_cpu=True, bf16=False))
    ids = trainer.train_dataset[0]["chosen_ids"]
    with torch.inference_mode():
        trl_score = scorer.model.eval()(input_ids=torch.tensor([ids])).logits[0, 0].item()
    ours = scorer([row["prompt"]], [row["chosen"]])[0]
    assert ours == pytest.approx(trl_score, abs=1e-5)
    bare = scorer.tok(row["prompt"] + row["chosen"], return_tensors="pt")
    with torch.inference_mode():
        assert scorer.model(**bare).logits[0, 0].item() != pytest.approx(trl_score, abs=1e-3)


def test_pairs_longer_than_seq_len_are_counted_not_silently_dropped(registry, tmp_path, tiny_model):
    from transformers import AutoTokenizer

    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.stages.data.format import load_dataset

    data = pairs_dataset(registry, tmp_path, tiny_model, shuffled=False)
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    train = load_dataset(data.hash, registry).train
    lengths = sorted(max(len(tok(r["prompt"] + r[k] + tok.eos_token)["input_ids"]) for k in ("chosen", "rejected"))
                     for r in train)
    seq_len = lengths[len(lengths) // 2]
    expected = sum(n > seq_len for n in lengths)
    assert 0 < expected < len(train)
    rm = Runner(registry, defaults=False).run("reward-model", {"data": data.hash, "model": str(tiny_model),
                                                               "max_steps": 2, "seq_len": seq_len})
    assert rm.summary["train_pairs_too_long"] == expected
    assert rm.summary["train_pairs"] == len(train) - expected


def test_pairwise_accuracy_scores_each_distinct_text_once(monkeypatch):
    """One chosen answer against many rejected ones (every wrong number of a problem) is scored once, not per pair:
    the accuracy is the same as pair by pair."""
    from llmops_jupyter.stages.rl import reward_model

    calls: list[list[str]] = []
    value = {"P:right": 1.0, "P:w1": 0.5, "P:w2": 2.0, "Q:right": 0.0, "Q:w1": -1.0}

    def fake_score(model, tok, texts, **_):
        calls.append(list(texts))
        return [value[t] for t in texts]

    monkeypatch.setattr(reward_model, "score_texts", fake_score)
    rows = [{"prompt": "P:", "chosen": "right", "rejected": "w1"}, {"prompt": "P:", "chosen": "right", "rejected": "w2"},
            {"prompt": "Q:", "chosen": "right", "rejected": "w1"}]
    assert reward_model.pairwise_accuracy(None, None, rows, 64) == pytest.approx(2 / 3)
    assert sum(len(c) for c in calls) == 5 and sorted(t for c in calls for t in c) == sorted(value)


def test_vs_reference_is_the_preference_for_the_completion_over_the_reference_answer():
    """--rm-reward vs-reference: sigmoid(score(prompt + completion) - score(prompt + reference after the response
    prefix)); each reference is scored once per run; a row without a reference is refused (the contract check then
    names the reward), not scored against an empty answer."""
    import math

    from llmops_jupyter.stages.rl.reward_model import RewardModelScorer

    value = {"Q<a>7</a>": 2.0, "Q<a>9</a>": 0.0, "Q<a>x</a>": 2000.0, "R<a>1</a>": -1.0}
    scored: list[str] = []
    scorer = object.__new__(RewardModelScorer)
    scorer.baseline, scorer.prefix, scorer._reference = "vs-reference", "<a>", {}
    scorer._score = lambda texts: scored.extend(texts) or [value[t] for t in texts]
    out = scorer(prompts=["Q<a>", "Q<a>", "Q<a>", "R<a>"], completions=["7</a>", "9</a>", "x</a>", "1</a>"],
                 answer=["<a>7</a>", "<a>7</a>", "<a>7</a>", "<a>1</a>"])
    assert out == pytest.approx([0.5, 1 / (1 + math.exp(2.0)), 1.0, 0.5])
    scorer(prompts=["Q<a>"], completions=["9</a>"], answer=["<a>7</a>"])
    assert scored.count("Q<a>7</a>") == 2  # once as a completion, once as the reference (cached after that)
    with pytest.raises(ValueError, match="--rm-reward vs-reference needs each row's reference answer"):
        scorer(prompts=["Q<a>"], completions=["9</a>"], answer=[""])
    scorer.baseline = "score"
    assert scorer(prompts=["Q<a>"], completions=["9</a>"]) == [0.0]


def test_rm_reward_without_a_reward_model_reward_is_refused_in_one_line():
    from llmops_jupyter.core.errors import ConfigError
    from llmops_jupyter.stages.rl.config import RLConfig

    with pytest.raises(ConfigError, match="rm_reward|rm-reward") as e:
        RLConfig.from_dict({"reward": ["format"], "rm_reward": "vs-reference"})
    assert "reward-model@latest" in str(e.value)

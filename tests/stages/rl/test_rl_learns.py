"""Acceptance: a learnable format reward on a tiny model rises by ≥ 0.3 (mean of the last 5 logs over the first 5)
within 30 steps, with a fixed seed; and the reward model (RLHF) ranks correct over wrong answers on held-out pairs
and is used as a reward by name."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def peaky_model(model_cache):
    """The tiny Llama with a wider initialisation: its random output is not uniform, so LoRA can move it."""
    from llmops_jupyter.testing import build_tiny_model

    return build_tiny_model(model_cache / "tiny-llama-peaky", initializer_range=0.2)


@pytest.mark.slow  # ~1 s per step on 2 idle cores; several times that on a loaded machine
def test_a_format_reward_is_learned_within_30_steps(registry, peaky_model, tiny_dataset):
    from llmops_jupyter.core.runner import Runner

    res = Runner(registry, defaults=False).run("rl", {
        "model": str(peaky_model), "data": tiny_dataset.hash, "reward": ["format"], "format_pattern": r"\d",
        "max_steps": 15, "lr": 2e-2, "max_completion_length": 8, "batch_size": 8, "num_generations": 4,
        "checkpoint_every": 0, "seed": 0})
    rewards = [r["value"] for r in registry.metric_history(res.run_id, "reward")]
    assert len(rewards) == 15
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last >= first + 0.3, rewards
    assert res.metrics["reward_end"] == pytest.approx(last)


@pytest.mark.slow  # 30 reward-model steps and an rl step: ~40 s on 2 idle cores
def test_reward_model_ranks_correct_answers_and_is_a_reward_by_name(registry, tiny_model, tmp_path):
    import json
    import random

    from llmops_jupyter.core.runner import Runner

    rng = random.Random(0)
    rows = []
    for i in range(40):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"prompt": f"What is {a} plus {b}? ({i})", "chosen": f"{a} plus {b} is {a + b}.",
                     "rejected": "The quick brown fox jumps over the lazy dog."})
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = Runner(registry).run("data", source=str(src), tokenizer=str(tiny_model), eval_fraction=0.2).artifact.hash
    runner = Runner(registry, defaults=False)
    rm = runner.run("reward-model", {"data": pairs, "model": str(tiny_model), "max_steps": 30,
                                     "batch_size": 8, "lr": 5e-3})
    assert rm.metrics["pairwise_accuracy"] >= 0.8 and rm.summary["eval_pairs"] == 8
    assert rm.artifact.kind == "reward-model"
    from llmops_jupyter.testing import write_tiny_dataset

    data = write_tiny_dataset(registry, tiny_model)
    res = runner.run("rl", {"model": str(tiny_model), "data": data.hash, "reward": ["reward-model@latest"],
                            "max_steps": 1, "batch_size": 4, "num_generations": 2, "max_completion_length": 8,
                            "checkpoint_every": 0, "check_contract": False})
    assert "rewards/reward-model@latest/mean" in res.metrics
    # --rm-reward vs-reference: the reward model's preference for each completion over the row's reference answer,
    # through TRL's answer column and the contract check (which now runs): a probability, not a raw score
    ref = runner.run("rl", {"model": str(tiny_model), "data": data.hash, "reward": ["reward-model@latest"],
                            "rm_reward": "vs-reference", "scale_rewards": "none", "max_steps": 1, "batch_size": 4,
                            "num_generations": 2, "max_completion_length": 8, "checkpoint_every": 0})
    assert str(ref.status) == "finished"
    assert 0.0 < ref.metrics["rewards/reward-model@latest/mean"] < 1.0, ref.metrics
    chain = {a.kind for a in registry.lineage_chain(res.artifact)}
    assert "reward-model" in chain

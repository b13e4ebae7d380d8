"""The rl stage on the tiny model: a notebook function through the magic (lineage, card, completions table,
resume), the contract check refusing before any step, guards tripping on a constant reward and on a length bonus,
interrupt, and the judge reward's cache counted on a local OpenAI-compatible endpoint."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llmops_jupyter.core.errors import StageError
from llmops_jupyter.core.runner import RunInterrupted

pytest.importorskip("trl")

FAST = {"batch_size": 4, "num_generations": 2, "max_completion_length": 8, "lr": 1e-2, "log_every": 1,
        "checkpoint_every": 0, "check_contract": False}


def run_rl(registry, model, dataset, rewards, listeners=(), **kw):
    from llmops_jupyter.core.runner import Runner

    return Runner(registry, listeners=list(listeners)).run(
        "rl", {"model": str(model), "data": dataset.hash, "reward": rewards, **FAST, **kw})


def test_magic_trains_on_a_notebook_function_with_lineage_card_and_resume(shell, registry, tiny_model, tiny_dataset):
    def has_digit(completions, **kw):
        return [float(any(ch.isdigit() for ch in c)) for c in completions]

    shell.user_ns["has_digit"] = has_digit
    res = shell.run_line_magic("llmops", f"rl --model {tiny_model} --data {tiny_dataset.hash} --reward "
                                         "has_digit,overlong --reward-weights 1,0.5 --max-steps 2 --batch-size 4 "
                                         "--num-generations 2 --max-completion-length 8 --checkpoint-every 1")
    assert str(res.status) == "finished"
    art = res.artifact
    assert art.kind == "adapter" and (art.path / "adapter_config.json").exists()
    samples = [json.loads(line) for line in (art.path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and set(samples[0]["rewards"]) == {"has_digit", "overlong"}
    assert {"completion", "total", "advantage", "prompt", "answer"} <= set(samples[0])
    assert art.meta["rewards"] == ["has_digit", "overlong"] and art.meta["reward_weights"] == [1.0, 0.5]
    assert res.params["reward"] == ["has_digit", "overlong"]
    assert len(res.summary["reward_sources"]["has_digit"]) == 12  # the function's source, hashed
    for key in ("reward", "reward_std", "frac_reward_zero_std", "entropy", "completions/mean_length",
                "completions/clipped_ratio", "rewards/has_digit/mean", "rewards/overlong/mean"):
        assert key in res.metrics, key
    chain = {a.kind for a in registry.lineage_chain(art)}
    assert {"dataset", "base-model"} <= chain
    fig = res.outputs["reward_figure"]
    assert {"reward", "rewards/has_digit/mean", "frac_reward_zero_std", "completions/clipped_ratio"} <= {
        t.name for t in fig.data}
    assert "has_digit" in res.outputs["completions"].columns
    card = registry.derived_artifacts(art.hash, "model-card", limit=1)[0]
    text = (card.path / "README.md").read_text()
    assert "rl run" in text and "has_digit" in text
    # resume from its last checkpoint: the rewards are found again by name in the notebook
    more = shell.run_line_magic("llmops", f"rl --resume {res.run_id} --max-steps 3")
    assert more.summary["resumed_from"] == res.run_id and more.summary["resumed_at_step"] == 2
    assert more.summary["steps"] == 3 and more.summary["rewards"] == ["has_digit", "overlong"]
    with pytest.raises(StageError, match="differs from run"):
        shell.run_line_magic("llmops", f"rl --resume {res.run_id} --max-steps 4 --reward format")


def test_contract_check_refuses_before_any_step_and_stores_nothing(registry, tiny_model, tiny_dataset):
    def fine(completions, **kw):
        return [1.0] * len(completions)

    def wrong_length(completions, **kw):
        return [1.0]

    def explodes(completions, answer, **kw):
        raise ZeroDivisionError("division by zero")

    with pytest.raises(StageError) as info:
        run_rl(registry, tiny_model, tiny_dataset, [fine, wrong_length, explodes], check_contract=True)
    lines = str(info.value).splitlines()
    assert any("reward 'wrong_length' returned 1 value(s) for 4 completions" in ln for ln in lines)
    assert any("reward 'explodes' raised ZeroDivisionError: division by zero" in ln for ln in lines)
    assert not any("'fine'" in ln for ln in lines)
    run = registry.list_runs(stage="rl")[0]
    assert run["status"] == "failed"
    assert registry.metrics(run["id"]) == {} and registry.run_artifacts(run["id"], "output") == []
    assert not list((registry.home / "runs" / run["id"]).glob("checkpoints/checkpoint-*"))


def test_response_prefix_starts_every_sampled_and_checked_answer(registry, tiny_model, tiny_dataset):
    seen: list[tuple[str, str]] = []

    def records(prompts, completions, **kw):
        seen.extend(zip(prompts, completions))
        return [float(len(c) % 2) for c in completions]

    res = run_rl(registry, tiny_model, tiny_dataset, [records], max_steps=1, response_prefix="<answer>",
                 check_every=1, check_reward="records", check_examples=2, check_contract=True, clipped_max=1.0)
    assert str(res.status) == "finished" and res.params["response_prefix"] == "<answer>"
    from llmops_jupyter.stages.data.format import Dataset

    data = Dataset(tiny_dataset.path)
    templated = {r["prompt"] for r in data.train + data.eval}
    # contract check (4) + one step (4) + greedy checks before and after (2 each): each is a dataset prompt + prefix
    assert len(seen) == 12
    assert all(p.endswith("<answer>") and p[: -len("<answer>")] in templated for p, _ in seen)
    samples = [json.loads(line) for line in (res.artifact.path / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"].endswith("<answer>") for s in samples)


def test_constant_reward_fires_the_zero_variance_alert_and_stops_cleanly(registry, tiny_model, tiny_dataset):
    def constant(completions, **kw):
        return [1.0] * len(completions)

    with pytest.warns(UserWarning, match="zero-variance"):
        res = run_rl(registry, tiny_model, tiny_dataset, [constant], max_steps=6, guard_action="stop",
                     clipped_max=1.0)
    assert str(res.status) == "pruned" and "zero-variance" in registry.get_run(res.run_id)["error"]
    assert res.summary["steps"] == 3  # stopped at the third log, not after all 6 steps
    log = (registry.home / "runs" / res.run_id / "run.log").read_text()
    assert "ALERT rl guard 'zero-variance' at step 3" in log and "--num-generations" in log


def test_a_hackable_length_bonus_trips_the_length_guard(registry, tiny_model, tiny_dataset):
    def longer_is_better(completions, completion_ids, **kw):
        return [float(len(ids)) for ids in completion_ids]

    with pytest.warns(UserWarning, match="guard 'length'"):
        res = run_rl(registry, tiny_model, tiny_dataset, [longer_is_better], max_steps=2)
    assert any("guard 'length'" in a and "overlong" in a for a in res.summary["alerts"])
    assert str(res.status) == "finished"  # --guard-action alert (the default) only alerts


def test_interrupt_is_recorded_with_the_resume_hint(registry, tiny_model, tiny_dataset):
    calls = []

    def stops_at_third_batch(completions, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return [float(len(c) % 2) for c in completions]

    with pytest.raises(RunInterrupted, match="--resume"):
        run_rl(registry, tiny_model, tiny_dataset, [stops_at_third_batch], max_steps=5, checkpoint_every=1)
    run = registry.list_runs(stage="rl")[0]
    assert run["status"] == "interrupted" and "%llmops rl --resume" in run["error"]


class _Judge(BaseHTTPRequestHandler):
    calls = 0

    def do_POST(self):  # noqa: N802 - http.server's name
        type(self).calls += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": "Score: 4. Fine."}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture()
def judge_url():
    pytest.importorskip("openai")
    _Judge.calls = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_judge_reward_is_scaled_cached_and_capped(judge_url, tmp_path):
    from llmops_jupyter.stages.eval.judge import make_judge
    from llmops_jupyter.stages.rl.judge_reward import JudgeReward

    reward = JudgeReward(make_judge(judge_url), max_calls=5, cache_path=tmp_path / "cache.jsonl")
    epoch = {"prompts": ["p1", "p1", "p2", "p2"], "completions": ["a", "b", "a", "a"], "answer": ["r"] * 4}
    assert reward(**epoch) == [0.75, 0.75, 0.75, 0.75]  # Score 4 of 1-5 → 0.75
    assert _Judge.calls == 3  # (p2, a) twice in the batch: one call
    assert reward(**epoch) == [0.75] * 4 and _Judge.calls == 3  # the second identical epoch: no judge call
    again = JudgeReward(make_judge(judge_url), max_calls=5, cache_path=tmp_path / "cache.jsonl")
    assert again(**epoch) == [0.75] * 4 and _Judge.calls == 3  # the cache file survives (a resumed run)
    with pytest.warns(UserWarning, match="--judge-max-calls 5 reached"):
        out = reward(prompts=["q"] * 4, completions=["1", "2", "3", "4"], answer=["r"] * 4)
    assert out == [0.75, 0.75, None, None] and _Judge.calls == 5


def test_rl_with_the_judge_reward_and_the_policy_refused_as_its_own_judge(registry, tiny_model, tiny_dataset,
                                                                         judge_url):
    res = run_rl(registry, tiny_model, tiny_dataset, ["judge"], judge=judge_url, max_steps=1)
    assert res.metrics["rewards/judge/mean"] == pytest.approx(0.75)
    assert res.summary["judge_calls"] == _Judge.calls > 0
    from llmops_jupyter.core.errors import ConfigError

    with pytest.raises(ConfigError, match="is the model being trained"):
        run_rl(registry, tiny_model, tiny_dataset, ["judge"], judge=str(tiny_model), max_steps=1)


def scripted_check(scores):
    """A reward that returns 0 while training and, for the greedy held-out check (no trainer state), the next of
    ``scores`` for every prompt (0 once they run out)."""
    left = list(scores)

    def scripted(completions, trainer_state=None, **kw):
        if trainer_state is not None:
            return [0.0] * len(completions)
        return [left.pop(0) if left else 0.0] * len(completions)

    return scripted


def test_keep_best_check_stores_the_best_checked_adapter_and_resume_carries_it(registry, tiny_model, tiny_dataset):
    from safetensors.torch import load_file

    def has_digit(completions, **kw):
        return [float(any(ch.isdigit() for ch in c)) for c in completions]

    checked = scripted_check([0.1, 0.9, 0.2, 0.3])  # checks at steps 0, 1, 2, 3: step 1 is the best
    res = run_rl(registry, tiny_model, tiny_dataset, [has_digit, checked], reward_weights=[1.0, 0.0], max_steps=3,
                 check_every=1, check_reward="scripted", check_examples=2, keep="best-check", checkpoint_every=1,
                 keep_checkpoints=5, dominance_max=1.0, zero_std_max=1.0, clipped_max=1.0)
    assert str(res.status) == "finished"
    assert res.summary["kept"] == "best-check" and res.summary["kept_step"] == 1
    assert res.metrics["check_kept"] == 0.9 and res.metrics["check_end"] == 0.3
    kept = load_file(res.artifact.path / "adapter_model.safetensors")
    ckpts = registry.home / "runs" / res.run_id / "checkpoints"
    at_1 = load_file(ckpts / "checkpoint-1" / "adapter_model.safetensors")
    at_3 = load_file(ckpts / "checkpoint-3" / "adapter_model.safetensors")
    assert kept.keys() == at_1.keys()
    assert all((kept[k] == at_1[k]).all() for k in kept)  # step 1's weights, not the last step's
    assert any(not (kept[k] == at_3[k]).all() for k in kept)

    # resumed: the interrupted run's best (step 1, at or before the checkpoint resumed from) stays the one to beat
    more = run_rl(registry, tiny_model, tiny_dataset, [has_digit, scripted_check([0.5, 0.5])],
                  reward_weights=[1.0, 0.0], resume=res.run_id, max_steps=5, check_every=1, clipped_max=1.0)
    assert more.summary["resumed_at_step"] == 3 and more.summary["steps"] == 5
    assert more.summary["kept_step"] == 1 and more.metrics["check_kept"] == 0.9
    assert all((load_file(more.artifact.path / "adapter_model.safetensors")[k] == at_1[k]).all() for k in kept)


def test_keep_best_check_without_the_held_out_check_is_refused_in_one_line(registry, tiny_model, tiny_dataset):
    from llmops_jupyter.core.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        run_rl(registry, tiny_model, tiny_dataset, ["format"], keep="best-check")
    assert "keep" in str(info.value) and "--check-every" in str(info.value)
    assert len(str(info.value).splitlines()) <= 2
    last = run_rl(registry, tiny_model, tiny_dataset, ["format"], max_steps=1, clipped_max=1.0, zero_std_max=1.0)
    assert last.summary["kept"] == "last" and last.summary["kept_step"] == 1

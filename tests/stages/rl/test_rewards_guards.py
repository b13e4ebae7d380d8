"""Reward built-ins, name resolution, the contract check, advantages and the guards: pure logic, no training."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest

from llmops_jupyter.core.errors import ConfigError, StageError
from llmops_jupyter.stages.rl import rewards as R
from llmops_jupyter.stages.rl.config import RLConfig
from llmops_jupyter.stages.rl.guards import Guards


def cfg(**kw):
    return RLConfig.from_dict({"reward": ["format"], **kw})


def test_builtin_rewards():
    comps = ["The sum is <answer>7</answer>", "<answer> 8 </answer>", "seven", "it is 7"]
    assert R.exact(comps, answer=["7"] * 4) == [1.0, 0.0, 0.0, 0.0]
    assert R.numeric(comps, answer=["3 plus 4 is 7."] * 4) == [1.0, 0.0, 0.0, 1.0]
    assert R.make_format()(comps) == [1.0, 1.0, 0.0, 0.0]
    assert R.make_format(r"^\d")(["7 apples", "x7"]) == [1.0, 0.0]
    over = R.make_overlong(16, soft=4)
    assert over(["a"] * 3, completion_ids=[[1] * 10, [1] * 14, [1] * 16]) == [0.0, -0.5, -1.0]
    rep = R.repetition(["x", "y"], completion_ids=[[1, 2, 3, 4, 5], [1, 2, 3, 1, 2, 3, 1, 2, 3]])
    assert rep[0] == 0.0 and -1 < rep[1] < -0.5


def test_names_resolve_from_the_notebook_namespace_then_builtins():
    def fmt(completions, **kw):
        return [1.0] * len(completions)

    ns = {"fmt": fmt, "limit": 3}
    assert R.resolve("fmt", cfg(), namespace=ns) == ("fmt", fmt)
    assert R.resolve(fmt, cfg(), namespace={})[0] == "fmt"  # $fn / rl(rewards=[fn])
    assert R.resolve("format", cfg(), namespace={})[1](["<answer>3</answer>", "3"]) == [1.0, 0.0]  # the default
    name, fn = R.resolve("format", cfg(format_pattern="x"), namespace=ns)
    assert name == "format" and fn(["axb", "b"]) == [1.0, 0.0]
    with pytest.raises(ConfigError, match="--reward limit names a int, not a function"):
        R.resolve("limit", cfg(), namespace=ns)
    with pytest.raises(ConfigError, match="did you mean 'fmt'"):
        R.resolve("fmtt", cfg(), namespace=ns)


def test_config_lines_name_the_field():
    with pytest.raises(ConfigError, match="--reward needs at least one reward function"):
        RLConfig.from_dict({})
    with pytest.raises(ConfigError, match="--reward-weights has 1 weight"):
        RLConfig.from_dict({"reward": "a,b", "reward_weights": [1.0]})
    with pytest.raises(ConfigError, match="--batch-size must be a multiple of --num-generations"):
        RLConfig.from_dict({"reward": "a", "batch_size": 6, "num_generations": 4})
    with pytest.raises(ConfigError, match="--judge is needed with --reward judge"):
        RLConfig.from_dict({"reward": "judge"})
    c = RLConfig.from_dict({"reward": ["a,b", R.exact]})
    assert c.reward[:2] == ["a", "b"] and c.to_params()["reward"] == ["a", "b", "exact"]


def test_contract_check_one_line_per_broken_function():
    def good(completions, **kw):
        return [0.5] * len(completions)

    def raises(completions, **kw):
        raise KeyError("answer_text")

    def short(completions, **kw):
        return [1.0]

    def words(completions, **kw):
        return ["high"] * len(completions)

    def nan(completions, **kw):
        return [math.nan] * len(completions)

    def scalar(completions, **kw):
        return 1.0

    def slow(completions, **kw):
        time.sleep(0.3)  # a slow reward, not synchronisation
        return [0.0] * len(completions)

    funcs = [(f.__name__, f) for f in (good, raises, short, words, nan, scalar, slow)]
    problems = R.contract_check(funcs, ["p"] * 4, ["a", "b", "c", "d"], [[1]] * 4, {"answer": ["x"] * 4},
                                timeout_s=0.1)
    assert len(problems) == 6 and all("\n" not in p for p in problems)
    by = {p.split("'")[1]: p for p in problems}
    assert set(by) == {"raises", "short", "words", "nan", "scalar", "slow"}
    assert "raised KeyError" in by["raises"] and "answer_text" in by["raises"]
    assert "returned 1 value(s) for 4 completions" in by["short"]
    assert "'high' (str) at index 0, not a number" in by["words"]
    assert "returned nan at index 0" in by["nan"]
    assert "returned float, not a list" in by["scalar"]
    assert "over --reward-timeout-s 0.1" in by["slow"]


def test_reward_set_records_components_total_and_advantage():
    def a(completions, **kw):
        return [1.0, 0.0, 1.0, 1.0]

    def b(completions, **kw):
        return [0.0, 0.0, None, 2.0]

    rs = R.RewardSet([("a", a), ("b", b)], [1.0, 0.5], num_generations=2)
    wa, wb = rs.wrapped()
    assert wa.__name__ == "a"
    state = SimpleNamespace(global_step=4)
    kw = {"prompts": ["p"] * 4, "completions": ["w", "x", "y", "z"], "answer": ["r"] * 4, "trainer_state": state}
    wa(**kw)
    assert math.isnan(wb(**kw)[2])  # None → NaN, as TRL does
    rows = rs.drain()
    assert [r["total"] for r in rows] == [1.0, 0.0, 1.0, 2.0]  # NaN components left out of the total
    assert rows[0]["step"] == 5 and rows[2]["rewards"]["a"] == 1.0
    adv = [r["advantage"] for r in rows]
    assert adv[0] == pytest.approx(-adv[1]) and adv[0] > 0 and adv[3] > 0 > adv[2]
    assert R.advantages([1.0, 0.0, 3.0], 1, "rloo", "group") == [-0.5, -2.0, 2.5]

    def bad(completions, **kw):
        return [1.0]

    with pytest.raises(StageError, match="reward 'bad' returned 1 value"):
        R.RewardSet([("bad", bad)], [], num_generations=2).wrapped()[0](**kw)


def test_guards():
    g = Guards(cfg())
    logs = {"frac_reward_zero_std": 1.0, "completions/mean_length": 10, "completions/clipped_ratio": 0.0}
    assert g.observe(1, logs) == [] and g.observe(2, logs) == []
    (zero,) = g.observe(3, logs)
    assert zero.guard == "zero-variance" and "--num-generations" in zero.message and "3 logs" in zero.message
    assert g.observe(4, logs) == []  # once per run
    g = Guards(cfg())
    g.observe(1, {"completions/mean_length": 10})
    assert g.observe(2, {"completions/mean_length": 19}) == []
    (length,) = g.observe(3, {"completions/mean_length": 21})
    assert length.guard == "length" and "2×" in length.message and "overlong" in length.message
    assert Guards(cfg()).observe(1, {"completions/clipped_ratio": 0.6})[0].guard == "length"
    (kl,) = Guards(cfg(beta=0.1, kl_max=0.5)).observe(1, {"kl": 0.7})
    assert kl.guard == "kl" and "--beta" in kl.message
    g = Guards(cfg(reward=["a", "b"]))
    samples = [{"rewards": {"a": float(i % 2) * 10, "b": 0.1 * (i % 3)}} for i in range(8)]
    assert g.observe(1, {}, samples) == [] and g.observe(2, {}, samples) == []
    (dom,) = g.observe(3, {}, samples)
    assert dom.guard == "dominance" and "'a'" in dom.message
    g = Guards(cfg(check_reward="exact"))
    for step, r in enumerate([0.1, 0.1, 0.2, 0.4, 0.5, 0.6]):
        g.observe(step, {"reward": r})
    assert g.observe_check(0, 0.2) == [] and g.observe_check(5, 0.2) == []
    (gamed,) = g.observe_check(10, 0.21)
    assert gamed.guard == "reward-vs-check" and "exact" in gamed.message


def test_dashboard_draws_components_samples_and_alerts_from_events():
    from llmops_jupyter.core.runner import Event, EventType
    from llmops_jupyter.stages.rl.dashboard import RLDashboard

    shown = []
    dash = RLDashboard(cfg(reward=["fmt"]), front_end="magic", display=shown.append)
    dash(Event(EventType.STARTED, "r", "rl", {}))
    dash(Event(EventType.METRIC, "r", "rl", {"step": 1, "values": {"reward": 0.5, "rewards/fmt/mean": 0.5,
                                                                     "rewards/extra/mean": 0.1, "kl": 0.01}}))
    sample = {"step": 1, "group": 0, "prompt": "p", "completion": "c", "rewards": {"fmt": 1.0}, "total": 1.0,
              "advantage": 0.7}
    dash(Event(EventType.LOG, "r", "rl", {"message": "s", "samples": [sample]}))
    dash(Event(EventType.LOG, "r", "rl", {"message": "rl guard 'kl' at step 1: drift", "alert": {"guard": "kl"}}))
    dash(Event(EventType.PROGRESS, "r", "rl", {"done": 1, "total": 4, "desc": "rl"}))
    dash(Event(EventType.INTERRUPTED, "r", "rl", {}))
    names = {t.name for t in dash._fig.data}
    assert {"reward", "rewards/fmt/mean", "rewards/extra/mean", "kl", "frac_reward_zero_std"} <= names
    assert dict(zip([t.name for t in dash._fig.data], [list(t.y) for t in dash._fig.data]))["reward"] == [0.5]
    assert "0.7" in dash._table.value and "guard &#x27;kl&#x27;" in dash._alerts.value
    assert "1 alert(s)" in dash.status_text() and "interrupted" in dash.status_text()
    assert shown[-1].layout.title.text == "rl (interrupted)"  # a static figure stays in the saved notebook

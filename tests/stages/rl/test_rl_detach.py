"""``rl --detach``: the run continues in fine-tuning's supervised worker process, so its rewards must be importable
there (built-ins, judge, reward-model@<ref>, module:function); a function only the notebook defines is refused in
one line naming it and the fix, before any run is recorded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from IPython.core.error import UsageError

from llmops_jupyter.core.errors import ConfigError
from llmops_jupyter.stages.rl.config import RLConfig

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[3]
REWARDS = '''
def has_digit(completions, **kw):
    return [float(any(ch.isdigit() for ch in c)) for c in completions]
'''


@pytest.fixture()
def reward_module(tmp_path, monkeypatch):
    """``my_rewards.py`` beside the "notebook" (the working directory), importable here and in the worker."""
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    import importlib

    return importlib.import_module("my_rewards")


def test_detach_keeps_importable_rewards_and_refuses_notebook_functions(shell, reward_module):
    fn = reward_module.has_digit
    cfg = RLConfig.from_dict({"reward": [fn, "format", "my_rewards:has_digit"], "detach": True,
                              "reward_weights": [1, 1, 1]})
    assert cfg.reward == ["my_rewards:has_digit", "format", "my_rewards:has_digit"]  # $fn → its import path
    shell.run_cell("def mine(completions, **kw):\n    return [0.0] * len(completions)")
    with pytest.raises(UsageError) as info:
        shell.run_line_magic("llmops", "rl --reward mine,format --detach --max-steps 2")
    assert str(info.value) == (  # one line: the function, why, and the fix
        "rl: --reward mine is defined in the notebook (__main__), and a --detach worker process cannot import it. "
        "Fix: move `mine` to a module beside the notebook (e.g. my_rewards.py) and pass --reward my_rewards:mine, "
        "or drop --detach")
    with pytest.raises(ConfigError, match="--check-reward mine is defined in the notebook"):
        RLConfig.from_dict({"reward": ["format"], "detach": True, "check_every": 5, "check_reward": "mine"})
    with pytest.raises(ConfigError, match="cannot import module 'no_such_rewards'"):
        RLConfig.from_dict({"reward": ["no_such_rewards:f"], "detach": True})
    with pytest.raises(ConfigError, match="module 'my_rewards' has no 'nope'"):
        RLConfig.from_dict({"reward": ["my_rewards:nope"], "detach": True})
    from llmops_jupyter.stages.rl.rewards import resolve

    assert resolve("my_rewards:has_digit", cfg, namespace={}) == ("has_digit", fn)  # in the kernel and the worker
    from llmops_jupyter.registry import Registry

    assert Registry.open(Path(os.environ["LLMOPS_HOME"])).list_runs(stage="rl") == []  # refused before a run


@pytest.mark.slow  # a worker process importing torch/trl and training 2 steps: ~25 s on 2 loaded cores
def test_detached_grpo_run_finishes_with_its_metrics_in_the_registry(registry, tiny_model, tiny_dataset,
                                                                      reward_module):
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.stages.finetune.launch import RunWatcher
    from llmops_jupyter.stages.rl.dashboard import RLDashboard

    res = Runner(registry).run("rl", {
        "model": str(tiny_model), "data": tiny_dataset.hash, "reward": "my_rewards:has_digit,overlong",
        "max_steps": 2, "batch_size": 4, "num_generations": 2, "max_completion_length": 8, "lr": 1e-2,
        "checkpoint_every": 0, "detach": True})
    handle = res.outputs["run"]
    assert str(res.status) == "running" and handle.run_id == res.run_id and "detached rl run" in repr(handle)
    run = handle.wait(timeout=600)
    assert run["status"] == "finished", handle.log.read_text()[-2000:]
    assert [r["id"] for r in registry.list_runs(stage="rl", limit=None)] == [res.run_id]  # one training, one run
    assert run["pid"] == handle.pid and run["params"]["reward"] == ["my_rewards:has_digit", "overlong"]
    metrics = registry.metrics(res.run_id)
    for key in ("reward", "rewards/has_digit/mean", "rewards/overlong/mean", "frac_reward_zero_std", "reward_end"):
        assert key in metrics, key
    assert run["summary"]["rewards"] == ["has_digit", "overlong"] and run["summary"]["steps"] == 2
    (adapter,) = registry.run_artifacts(res.run_id, "output")
    assert adapter.kind == "adapter" and (adapter.path / "samples.jsonl").exists()
    watcher = RunWatcher(registry, res.run_id)  # what `%llmops attach` polls: the rl view, the rl figure
    fig = watcher.follow(timeout=30)
    assert isinstance(watcher.view, RLDashboard) and watcher.status == "finished"
    assert "rewards/has_digit/mean" in {t.name for t in fig.data} and fig.layout.title.text.startswith("rl ")

"""A listener can stop a fine-tune early and cleanly (what a search's pruner does): the run is 'pruned', not failed,
with what it logged kept and the reason recorded."""

from __future__ import annotations

import pytest


def test_listener_stops_training_early_and_the_run_is_pruned(registry, tiny_model, tiny_dataset):
    from llmops_jupyter.core.runner import EventType, Runner, request_stop

    def pruner(event):
        if event.type is EventType.METRIC and "loss" in event.data["values"] and event.data["step"] >= 3:
            request_stop(event.run_id, "pruned by the search at step 3 (median rule)")

    res = Runner(registry, listeners=[pruner]).run(
        "finetune", {"model": str(tiny_model), "data": tiny_dataset.hash, "max_steps": 50, "batch_size": 4,
                     "log_every": 1, "checkpoint_every": 0})
    run = registry.get_run(res.run_id)
    assert res.status == "pruned" and run["status"] == "pruned"
    assert run["error"] == "pruned by the search at step 3 (median rule)"
    assert res.summary["steps"] == 3  # stopped at the step it was asked to, not at 50
    assert len(registry.metric_history(res.run_id, "loss")) == 3


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_accelerate_launched_training_honours_a_stop_request(registry, tiny_model, tiny_dataset, monkeypatch,
                                                             processes):
    """`--launcher accelerate`: the request reaches the parent's run (rank 0's relayed metrics → the listener); the
    ranks must end early together and the run be 'pruned' with what it trained (not trained to the end)."""
    import os
    from pathlib import Path

    from llmops_jupyter.core.runner import EventType, Runner, request_stop

    root = Path(__file__).resolve().parents[3]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    max_steps = 400

    def pruner(event):
        if event.type is EventType.METRIC and "loss" in event.data["values"] and event.data["step"] >= 2:
            request_stop(event.run_id, "pruned by the search at step 2")

    res = Runner(registry, listeners=[pruner]).run(
        "finetune", {"model": str(tiny_model), "data": tiny_dataset.hash, "max_steps": max_steps, "batch_size": 2,
                     "log_every": 1, "checkpoint_every": 0, "launcher": "accelerate",
                     "num_processes": processes})
    run = registry.get_run(res.run_id)
    assert res.status == "pruned" and run["status"] == "pruned", run
    assert run["error"] == "pruned by the search at step 2"
    steps = res.summary["steps"]
    assert 2 <= steps < max_steps, steps
    assert len(registry.metric_history(res.run_id, "loss")) == steps  # what it trained is kept
    assert res.artifact.kind == "adapter"

"""A papermill sweep over the KL penalty and the learning rate on ``templates/rl.ipynb`` (the tiny model): every
variant is a recorded pipeline run whose rl run trained with that variant's ``--beta``/``--lr`` and the notebook's
own reward function, and the comparison sees each variant."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("papermill")

TEMPLATE = Path(__file__).resolve().parents[3] / "templates" / "rl.ipynb"


@pytest.mark.slow  # four real kernels, each importing torch/trl and training 2 steps: ~1.5 min on 2 cores
def test_sweep_over_beta_and_lr_on_the_rl_template(registry, tiny_model, tiny_dataset, shell):
    from llmops_jupyter.pipelines import run_sweep

    sweep = run_sweep(TEMPLATE, ["beta=0,0.1", "lr=1e-5,1e-3"],
                      {"model": str(tiny_model), "data": tiny_dataset.hash, "max_steps": 2, "num_generations": 2,
                       "max_completion_length": 8}, parallel=1, gpus=[], cache=False)
    assert str(sweep.status) == "finished"
    pipelines = [r for r in registry.list_runs(stage="pipeline", limit=None) if r["parent_id"] == sweep.run_id]
    assert len(pipelines) == 4 and {r["status"] for r in pipelines} == {"finished"}
    seen = set()
    for pipe in pipelines:
        want = pipe["params"]["parameters"]
        (rl,) = [r for r in registry.list_runs(stage="rl", limit=None) if r["parent_id"] == pipe["id"]]
        assert rl["status"] == "finished" and rl["params"]["reward"] == ["correct", "overlong"]  # the notebook's own
        assert (rl["params"]["beta"], rl["params"]["lr"]) == (want["beta"], want["lr"])
        metrics = registry.metrics(rl["id"])
        assert ("kl" in metrics) == (want["beta"] > 0), metrics  # a reference model only when beta > 0
        assert "rewards/correct/mean" in metrics
        assert "reward_end" in registry.metrics(pipe["id"])  # copied onto the variant for the comparison
        seen.add((want["beta"], want["lr"]))
    assert seen == {(0.0, 1e-5), (0.0, 1e-3), (0.1, 1e-5), (0.1, 1e-3)}
    cmp = shell.run_line_magic("llmops", f"compare {sweep.run_id} --metric reward_end")
    assert len(cmp.rows) == 4 and {(r["params"]["beta"], r["params"]["lr"]) for r in cmp.rows} == seen

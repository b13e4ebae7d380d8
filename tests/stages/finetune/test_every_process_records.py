"""Every process that runs a stage records the same things: audit rows, resource samples and a model card.

Before the redesign these listeners were registered by importing the front door, so a detached fine-tune worker and
a sweep variant's kernel (neither imports it) left no audit row, no samples and no card.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmops_jupyter.governance import audit

pytestmark = pytest.mark.slow  # real kernels, servers or killed processes: over ~20 s on 2 cores

ROOT = Path(__file__).resolve().parents[3]


def _recorded(registry, run_id: str, adapter_hash: str) -> None:
    events = [r["event"] for r in audit.entries(registry, run=run_id, limit=None)]
    assert "started" in events and "finished" in events, events
    assert "artifact" in events
    assert "cpu_rss_mb" in registry.metrics(run_id), "no resource samples"
    cards = [a for a in registry.list_artifacts("model-card") if a.meta.get("model") == adapter_hash]
    assert cards, "no model card for the adapter"


@pytest.fixture()
def sampling(monkeypatch):
    monkeypatch.setenv("LLMOPS_RESOURCE_SAMPLING", "on")
    monkeypatch.setenv("LLMOPS_SAMPLE_S", "0.2")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def test_detached_finetune_worker_records_audit_samples_and_card(registry, tiny_model, tiny_dataset, sampling):
    from llmops_jupyter.core.runner import Runner

    res = Runner(registry, defaults=False).run(
        "finetune", {"model": str(tiny_model), "data": tiny_dataset.hash, "max_steps": 30, "batch_size": 4,
                     "log_every": 5, "checkpoint_every": 0, "detach": True})
    handle = res.outputs["run"]
    run = handle.wait(timeout=300)
    assert run["status"] == "finished", handle.log.read_text()[-2000:]
    (adapter,) = registry.run_artifacts(handle.run_id, "output")
    _recorded(registry, handle.run_id, adapter.hash)


SAMPLED_TOY = '''
import dataclasses
from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.runner import Runner
from llmops_jupyter.core.stage import Stage, register_stage
from llmops_jupyter.testing import wait_until

@dataclasses.dataclass
class ToyConfig(StageConfig):
    rank: int = option(8, "rank", min=1)

@register_stage
class Toy(Stage):
    name = "toy-train"
    config_cls = ToyConfig
    resource_sampling = True

    def run(self, ctx):
        # a sample taken while the stage runs (the sampler thread's first), not only the one at stop
        wait_until(lambda: "cpu_rss_mb" in ctx.registry.metrics(ctx.run_id), 120, what="a resource sample")
        out = ctx.staging_dir()
        (out / "adapter.txt").write_text(str(ctx.config.rank))
        ctx.save_artifact(out, "adapter", name="toy")

res = Runner().run("toy-train", {"rank": rank})
'''


def test_sweep_variant_records_audit_samples_and_card(home, tmp_path, sampling):
    nbformat = pytest.importorskip("nbformat")
    from llmops_jupyter.pipelines import run_sweep
    from llmops_jupyter.registry import Registry

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("rank = 8")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(SAMPLED_TOY)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "toy.ipynb"
    nbformat.write(nb, path)
    sweep = run_sweep(path, ["rank=4"], parallel=1, gpus=[], cache=False)
    reg = Registry(home)
    (pipeline,) = [r for r in reg.list_runs(stage="pipeline", limit=None) if r["parent_id"] == sweep.run_id]
    (toy,) = [r for r in reg.list_runs(stage="toy-train", limit=None) if r["parent_id"] == pipeline["id"]]
    (adapter,) = reg.run_artifacts(toy["id"], "output")
    _recorded(reg, toy["id"], adapter.hash)

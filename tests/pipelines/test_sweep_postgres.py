"""A Dask ``LocalCluster`` sweep whose workers are separate processes records every variant in the PostgreSQL
registry the driver names (``LLMOPS_REGISTRY``, inherited by the workers and their kernels)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmops_jupyter.frontends.cli import main as cli
from llmops_jupyter.registry import Registry
from llmops_jupyter.testing import toy_train_cell

pytestmark = pytest.mark.slow  # worker processes and one kernel per variant: over ~30 s on 2 cores
nbformat = pytest.importorskip("nbformat")
ROOT = Path(__file__).resolve().parents[2]

TOY = toy_train_cell(10)


def test_dask_sweep_with_worker_processes_records_every_variant_in_postgresql(pg_url, home, tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("rank = 1")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(TOY)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "toy.ipynb")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc:
        with distributed.Client(lc) as client:
            workers = set(client.run(os.getpid).values())
        assert os.getpid() not in workers and len(workers) == 2
        argv = ["sweep", str(tmp_path / "toy.ipynb"), "--grid", "rank=1,2,3", "--parallel", "2",
                "--cluster", lc.scheduler_address, "--no-cache"]
        assert cli(argv) == 0
    reg = Registry(home)
    assert reg.backend.name == "postgresql" and not (home / "registry.db").exists()
    (sw,) = reg.list_runs(stage="sweep")
    assert sw["status"] == "finished" and sw["summary"]["backend"] == "dask"
    variants = reg.child_runs(sw["id"], "pipeline")
    assert len(variants) == 3 and {r["status"] for r in variants} == {"finished"}
    assert {r["pid"] for r in variants} <= workers  # each variant recorded by a worker process
    toys = reg.list_runs(stage="toy-train", limit=None)
    assert sorted(r["params"]["rank"] for r in toys) == [1, 2, 3]
    assert all(len(reg.metric_history(r["id"], "loss")) == 10 for r in toys)
    assert reg.verify_artifacts() == []

"""How ``v1-registry.db`` was made: real stages of the release before schema versions (commit a00449d).

    git worktree add /tmp/llmops-a00449d a00449d
    cd /tmp/llmops-a00449d && PYTHONPATH=$PWD python <this file> /tmp/v1-home/.llmops
    cp /tmp/v1-home/.llmops/registry.db tests/registry/data/v1-registry.db   (checkpointed, journal_mode=DELETE)

A data run and a fine-tune (4 steps) on the tiny offline model, with the default listeners (audit rows, resource
samples, a model card): runs, metrics, artifacts, lineage edges, path hashes and audit rows. Only the database is
kept (VACUUMed, 160 KB), not the artifact files.
"""

import sqlite3
import sys
from pathlib import Path

from llmops_jupyter.core.runner import Runner
from llmops_jupyter.registry import Registry
from llmops_jupyter.testing import build_tiny_model, write_tiny_dataset

home = Path(sys.argv[1])
model = build_tiny_model(home.parent / "tiny-llama")
reg = Registry(home)
dataset = write_tiny_dataset(reg, model)
ft = Runner(reg).run("finetune", {"model": str(model), "data": dataset.hash, "max_steps": 4, "batch_size": 4,
                                  "lr": 1e-2, "log_every": 1, "checkpoint_every": 0, "seq_len": 64})
print("finetune", ft.run_id, ft.artifact.hash)
reg.close()
con = sqlite3.connect(home / "registry.db")
con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
con.execute("PRAGMA journal_mode=DELETE")
con.close()

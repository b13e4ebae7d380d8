"""Test helpers for tests, CI notebooks and quick tries: tiny records and datasets, out-of-process file reads.

The tiny model itself lives in :mod:`llmops_jupyter.models.tiny` (production code uses it as the ``tiny-llama``
provider); it is re-exported here because notebooks and docs import it from this module.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmops_jupyter.models.tiny import CHAT_TEMPLATE, TINY_NAME, build_tiny_model, build_tokenizer

__all__ = ["CHAT_TEMPLATE", "TINY_NAME", "build_tiny_model", "build_tokenizer", "read_bytes_elsewhere",
           "tiny_model_path", "tiny_records", "write_tiny_dataset"]


def tiny_model_path(cache: str | os.PathLike | None = None) -> Path:
    """Build (once) and return the tiny model in the local model cache."""
    from llmops_jupyter.models.refs import model_cache_dir

    target = Path(cache) if cache else model_cache_dir() / TINY_NAME
    if not (target / "config.json").exists():
        build_tiny_model(target)
    return target


def tiny_records(n: int = 48, seed: int = 0) -> list[dict[str, str]]:
    """Small, deterministic instruction/response pairs with variable lengths (arithmetic, colours, echo)."""
    import random

    rng = random.Random(seed)
    colours = ["red", "green", "blue", "yellow", "black", "white"]
    rows = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            rows.append({"instruction": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."})
        elif kind == 1:
            c = rng.choice(colours)
            rows.append({"instruction": f"Repeat the colour {c}.", "response": f"The colour is {c}."})
        else:
            words = " ".join(rng.choice(colours) for _ in range(rng.randint(1, 12)))
            rows.append({"instruction": f"Echo: {words}", "response": words})
    return rows


def write_tiny_dataset(registry, tokenizer_path, n: int = 48, eval_fraction: float = 0.25, seed: int = 0):
    """Register a dataset artifact in the standard format without running the data stage (fixtures only)."""
    from transformers import AutoTokenizer

    from llmops_jupyter.registry import RunStatus
    from llmops_jupyter.stages.data.format import render, write_dataset_dir

    tok = AutoTokenizer.from_pretrained(str(tokenizer_path))
    examples = [render([{"role": "user", "content": r["instruction"]},
                        {"role": "assistant", "content": r["response"]}], tok) for r in tiny_records(n, seed)]
    n_eval = max(1, int(len(examples) * eval_fraction))
    run_id = registry.create_run("data", {"source": "tiny_records", "n": n})
    folder = registry.staging_dir("data")
    write_dataset_dir(folder, examples[n_eval:], examples[:n_eval],
                      {"tokenizer": str(tokenizer_path), "chat_template": tok.chat_template, "seed": seed})
    art = registry.add_artifact(folder, "dataset", name="tiny", run_id=run_id, move=True)
    registry.finish_run(run_id, RunStatus.FINISHED)
    return art


def read_bytes_elsewhere(paths: list[str | os.PathLike]) -> dict[str, bytes]:
    """Raw bytes of files read by a child process: the way to grep a *live* SQLite registry for leaked secrets.

    Opening and closing a database file in the process that holds SQLite connections to it drops every POSIX lock
    those connections hold (locks are per process, released by any ``close``). Another process then believes it is
    the last user, checkpoints and removes the WAL under the open connections, and the next query fails with
    "database disk image is malformed".
    """
    import pickle
    import subprocess
    import sys

    code = ("import pickle, sys\nfrom pathlib import Path\n"
            "sys.stdout.buffer.write(pickle.dumps({p: Path(p).read_bytes() for p in sys.argv[1:] if Path(p).is_file()}))")
    out = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, check=True)
    return pickle.loads(out.stdout)

"""Test helpers for tests, CI notebooks and quick tries: tiny records and datasets, out-of-process file reads.

The tiny model itself lives in :mod:`llmops_jupyter.models.tiny` (production code uses it as the ``tiny-llama``
provider); it is re-exported here because notebooks and docs import it from this module.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmops_jupyter.models.tiny import CHAT_TEMPLATE, TINY_NAME, build_tiny_model, build_tokenizer

__all__ = ["CHAT_TEMPLATE", "TINY_NAME", "build_tiny_model", "build_tokenizer", "read_bytes_elsewhere",
           "run_logged", "tiny_model_path", "tiny_records", "write_tiny_dataset"]


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
    """The tiny records as a dataset version, made by the real data stage (templated with the tiny tokenizer; the
    records repeat a few short examples on purpose, so exact-duplicate removal is off)."""
    from llmops_jupyter.core.runner import Runner

    records = tiny_records(n, seed)
    res = Runner(registry, defaults=False).run(
        "data", {"source": records, "tokenizer": str(tokenizer_path), "eval_size": max(1, int(n * eval_fraction)),
                 "seed": seed, "scrub_pii": False, "dedup": False, "name": "tiny"})
    return res.artifact


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


def run_logged(argv: list[str], budget_s: float, log: str | os.PathLike, tail_lines: int = 40,
               **popen_kw) -> tuple[int, str]:
    """Run ``argv`` with its stdout and stderr written to ``log`` as they come; return (exit status, output).

    For slow tests that start a long child (the demo): within ``budget_s`` seconds, or the child's whole process
    group (its kernel, its servers) is stopped and a ``TimeoutError`` says where it was, with the last
    ``tail_lines`` lines of its progress, instead of only a thread dump from pytest-timeout. Set the test's
    ``@pytest.mark.timeout`` from the same budget plus a margin, so this fires first.
    """
    import signal
    import subprocess

    log = Path(log)
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                **popen_kw)
        def stop() -> None:
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue

        try:
            code = proc.wait(timeout=budget_s)
        except BaseException as exc:  # past the budget, or interrupted (Ctrl-C, pytest-timeout): stop the group
            stop()
            if not isinstance(exc, subprocess.TimeoutExpired):
                raise
            raise TimeoutError(f"{Path(argv[0]).name} {' '.join(argv[1:3])} ... outlived its {budget_s:.0f} s budget; "
                               f"its last output ({log}):\n{output_tail(log, tail_lines)}") from None
    return code, log.read_text(errors="replace")


def output_tail(log: str | os.PathLike, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file (what a failing or timed-out test prints)."""
    text = Path(log).read_text(errors="replace") if Path(log).exists() else ""
    return "\n".join(text.splitlines()[-lines:])

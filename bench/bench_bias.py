"""Benchmark: the bias suites (``%llmops eval --suite crows-pairs|stereoset``) on SmolLM2-135M-Instruct and the tiny
model, through the real eval stage on a temporary registry.

Figures (deterministic: float32, no sampling) come from one run of each full suite (CrowS-Pairs 1,018 pairs,
StereoSet 4,229 items) per model, with their 95 % bootstrap intervals; timings of the CI subset (``--subset``
items, what the quick test suite runs) are measured ``--repeats`` times (median, min–max). There is no offline
alternative to compare against in the same run: lm-eval's ``crows_pairs`` task downloads its data from the model
hub, which these machines cannot reach; the published reference is BERT-base's 60.5 % stereotyped (CrowS-Pairs).
One thread (``torch.set_num_threads(1)``): the CPU figures are for a shared 2-core machine.

    PYTHONPATH=. python bench/bench_bias.py [--models smollm2-135m,tiny-llama] [--repeats 3] [--subset 500] [--no-full]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, spread, versions  # noqa: E402

KEYS = {"crows-pairs": ("crows_pairs_stereotype",), "stereoset": ("stereoset_ss", "stereoset_lms", "stereoset_icat")}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="smollm2-135m,tiny-llama")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--subset", type=int, default=500)
    p.add_argument("--no-full", action="store_true", help="only the timed subset runs")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.registry import Registry

    out: dict[str, object] = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(),
                              "threads": 1, "load": os.getloadavg(),
                              "versions": versions(("torch", "transformers", "gguf", "numpy")), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(Registry(Path(tmp) / ".llmops"))
        for model in a.models.split(","):
            res_m: dict[str, object] = {}
            for suite in ("crows-pairs", "stereoset"):
                times = []
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    r = runner.run("eval", model=[model], suite=suite, limit=a.subset, batch_size=a.batch_size,
                                   bootstrap=1000)
                    times.append(time.perf_counter() - t0)
                    if r.status != "finished":
                        raise RuntimeError(f"{model} {suite}: {r.status}")
                entry: dict[str, object] = {"subset": a.subset, "subset_seconds": spread(times),
                                            "subset_figures": {k: v for k, v in runner.registry.metrics(r.run_id).items()
                                                               if "." not in k}}
                if not a.no_full:
                    t0 = time.perf_counter()
                    r = runner.run("eval", model=[model], suite=suite, batch_size=a.batch_size, bootstrap=1000)
                    entry["full_seconds"] = time.perf_counter() - t0
                    entry["full_figures"] = runner.registry.metrics(r.run_id)
                res_m[suite] = entry
                print(model, suite, json.dumps({k: entry.get("full_figures", entry["subset_figures"]).get(k)
                                                for k in KEYS[suite]}), flush=True)
            out["models"][model] = res_m
    out["load_after"] = os.getloadavg()
    out["machine_info"] = machine(torch_threads=True)
    dest = Path(a.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"bias-cpu-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()

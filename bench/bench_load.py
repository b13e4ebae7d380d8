"""How long `%load_ext llmops_jupyter` takes in a fresh interpreter (goal < 150 ms), and what `%llmops?`
(command discovery) adds. Baseline in the same run: starting the IPython shell itself."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

SCRIPT = r"""
import json, time
t0 = time.perf_counter()
from IPython.testing.globalipapp import start_ipython
ip = start_ipython()
t1 = time.perf_counter()
ip.run_line_magic("load_ext", "llmops_jupyter")
t2 = time.perf_counter()
from llmops_jupyter.frontends.magics import overview
overview()
t3 = time.perf_counter()
print(json.dumps({"shell_ms": (t1 - t0) * 1e3, "load_ext_ms": (t2 - t1) * 1e3, "discovery_ms": (t3 - t2) * 1e3}))
"""


def main(repeats: int = 7) -> dict:
    samples = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
        samples.append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    result = {
        "load_ext_ms": round(med["load_ext_ms"], 1),
        "discovery_ms": round(med["discovery_ms"], 1),
        "shell_start_ms": round(med["shell_ms"], 1),
        "load_ext_vs_shell_start": round(med["load_ext_ms"] / med["shell_ms"], 3),
        "goal_load_ext_ms": 150,
    }
    print(f"%load_ext llmops_jupyter: {result['load_ext_ms']} ms median of {repeats} (goal < 150 ms); "
          f"command discovery for %llmops?: {result['discovery_ms']} ms; "
          f"ratio to IPython shell start in the same run: {result['load_ext_vs_shell_start']}")
    return result


if __name__ == "__main__":
    main()

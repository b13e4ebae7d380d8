"""What the benchmarks share: median and spread of repeats, library versions, the machine, the raw-JSON file.

Not a benchmark itself (``bench/run.py`` runs ``bench_*.py`` only); the benchmarks import it from their folder.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any


def spread(xs: list[float]) -> dict[str, Any]:
    """Median, min and max of repeated measurements, and the measurements themselves."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def versions(packages: tuple[str, ...]) -> dict[str, str | None]:
    """Python and the installed version of each package (None when it is not installed)."""
    import importlib.metadata as md

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def machine(*, torch_threads: bool = False) -> dict[str, Any]:
    """Platform, CPUs, the load average when the benchmark ended (shared machines: say the load), the GPU if any."""
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                            "processor": platform.processor()}
    if torch_threads:
        info["torch_threads"] = torch.get_num_threads()
    info["load_avg_1_5_15min_at_end"] = os.getloadavg()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_result(result: dict[str, Any], out: str | Path, name: str) -> Path:
    """``<out>/<name>-<cpu|gpu>-<timestamp>.json`` (the raw results committed under ``bench/results/``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kind = "gpu" if "gpu" in result.get("machine", {}) else "cpu"
    stamp = time.strftime('%Y%m%d-%H%M%S')
    for n in range(1000):  # benchmarks started in the same second (parallel seeds) each keep their own file
        path = out / f"{name}-{kind}-{stamp}{f'-{n}' if n else ''}.json"
        try:
            with path.open("x", encoding="utf-8") as f:
                f.write(json.dumps(result, indent=2, default=str))
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{out}: 1000 results named {name}-{kind}-{stamp}*.json already")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def history_of(registry: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    """A run's logged values of one metric, as (step, value)."""
    return [(int(r["step"] or 0), float(r["value"])) for r in registry.metric_history(run_id, key)]

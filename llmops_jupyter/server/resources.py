"""Accelerator and memory status for the Lab sidebar.

Order of sources: ``nvidia-smi`` (works without importing anything heavy and sees every process's usage), then
torch *only if the server process already imported it* (importing torch in the server would cost seconds and
hundreds of MB), then host RAM via psutil or ``/proc/meminfo``. The sidebar polls this, so each call is cheap.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Any

from llmops_jupyter.core.env import pid_alive

_SMI_QUERY = "index,name,memory.used,memory.total,utilization.gpu"


def _num(text: str) -> float | None:
    try:
        return float(text.strip())
    except ValueError:  # "[N/A]" on some boards
        return None


def parse_nvidia_smi(csv_text: str) -> list[dict[str, Any]]:
    """Parse ``nvidia-smi --query-gpu=index,name,memory.used,memory.total,utilization.gpu --format=csv,noheader,
    nounits`` output (MiB and percent) into one dict per GPU."""
    gpus = []
    for line in csv_text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 5:
            continue
        used, total, util = _num(parts[2]), _num(parts[3]), _num(parts[4])
        gpus.append({
            "index": int(parts[0]) if parts[0].isdigit() else len(gpus),
            "name": parts[1],
            "memory_used_mb": used,
            "memory_total_mb": total,
            "utilization_pct": util,
            "source": "nvidia-smi",
        })
    return gpus


def _gpus_from_smi() -> list[dict[str, Any]] | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, f"--query-gpu={_SMI_QUERY}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return parse_nvidia_smi(out.stdout)


def _gpus_from_torch() -> list[dict[str, Any]] | None:
    torch = sys.modules.get("torch")  # never import torch here (see module docstring)
    if torch is None:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        gpus = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            util = None
            try:
                util = float(torch.cuda.utilization(i))
            except Exception:  # noqa: BLE001 - needs pynvml; optional
                pass
            gpus.append({"index": i, "name": torch.cuda.get_device_name(i),
                         "memory_used_mb": (total - free) / 2**20, "memory_total_mb": total / 2**20,
                         "utilization_pct": util, "source": "torch"})
        return gpus
    except Exception:  # noqa: BLE001 - a broken CUDA setup must not break the sidebar
        return None


def host_memory() -> dict[str, Any]:
    """Host RAM in MiB (psutil when installed, else ``/proc/meminfo``) and the CPU load."""
    info: dict[str, Any] = {"cpu_count": os.cpu_count()}
    try:
        info["load_avg"] = list(os.getloadavg())
    except OSError:  # pragma: no cover - not on Linux
        pass
    try:
        import psutil

        vm = psutil.virtual_memory()
        info.update(memory_total_mb=vm.total / 2**20, memory_used_mb=(vm.total - vm.available) / 2**20,
                    cpu_pct=psutil.cpu_percent(interval=None), source="psutil")
        return info
    except ImportError:
        pass
    try:
        fields = {}
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                fields[key] = float(rest.split()[0]) / 1024  # kB → MiB
        total = fields["MemTotal"]
        avail = fields.get("MemAvailable", fields.get("MemFree", 0.0))
        info.update(memory_total_mb=total, memory_used_mb=total - avail, source="/proc/meminfo")
    except (OSError, KeyError, ValueError, IndexError):
        info["source"] = "unavailable"
    return info


def gpu_status() -> list[dict[str, Any]]:
    """One dict per visible GPU, or ``[]`` on a CPU-only machine."""
    for probe in (_gpus_from_smi, _gpus_from_torch):
        gpus = probe()
        if gpus:
            return gpus
    return []




def running_runs(registry, limit: int = 20) -> list[dict[str, Any]]:
    """Runs marked running, with their latest metrics and step; ``stale`` when the recorded process on this host is
    gone (a killed kernel leaves its run 'running' forever)."""
    host = os.uname().nodename
    out = []
    for run in registry.list_runs(status="running", limit=limit):
        rows = registry.metric_history(run["id"])
        latest = {r["key"]: r["value"] for r in rows}
        step = max((r["step"] for r in rows if r["step"] is not None), default=None)
        out.append({
            "id": run["id"], "stage": run["stage"], "name": run["name"], "started_at": run["started_at"],
            "metrics": latest, "step": step, "total_steps": _total_steps(run["params"]),
            "stale": run["host"] == host and not pid_alive(run["pid"]),
        })
    return out


def _total_steps(params: dict[str, Any]) -> int | None:
    for key in ("max_steps", "steps", "total_steps"):
        value = params.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None

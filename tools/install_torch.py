"""Install torch into the current environment first, without a multi-GB surprise.

pip installs whatever build the index serves: on a standard PyPI setup that is the CUDA build (torch plus ~3 GB of
``nvidia-*`` wheels), even on a machine without a GPU. Before downloading anything this resolves the install
(``pip install --dry-run --report``) and refuses a CUDA build on a machine without an NVIDIA GPU, with the line that
picks the CPU build. Settings (environment, or ``make VAR=...``):

- ``TORCH_SPEC``        what to install (default ``torch==2.13.0``, the version the project is tested with)
- ``TORCH_INDEX_URL``   index serving the wanted build, e.g. ``https://download.pytorch.org/whl/cpu`` or ``.../cu130``
- ``TORCH_ALLOW_CUDA=1`` install a CUDA build even though no GPU is visible
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/version").exists()


def cuda_packages(report: dict) -> list[str]:
    """What in a ``pip --report`` makes it a CUDA build: ``nvidia-*`` wheels, or torch itself tagged ``+cuXXX``."""
    names = []
    for item in report.get("install", []):
        meta = item.get("metadata", {})
        name, version = meta.get("name", ""), meta.get("version", "")
        if name.lower().startswith("nvidia-") or (name.lower() == "torch" and "+cu" in version):
            names.append(f"{name}=={version}")
    return names


def main() -> int:
    spec = os.environ.get("TORCH_SPEC") or "torch==2.13.0"
    index = os.environ.get("TORCH_INDEX_URL") or ""
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", spec]
    if index:
        pip += ["--index-url", index]
    probe = subprocess.run([*pip, "--dry-run", "--quiet", "--report", "-"], capture_output=True, text=True)
    if probe.returncode != 0:
        sys.stderr.write(probe.stderr[-2000:])
        print(f"install_torch: cannot resolve {spec}" + (f" from {index}" if index else ""), file=sys.stderr)
        return probe.returncode
    cuda = cuda_packages(json.loads(probe.stdout))
    if cuda and not has_nvidia_gpu() and os.environ.get("TORCH_ALLOW_CUDA", "") not in ("1", "true", "yes"):
        print(f"install_torch: the index serves a CUDA build of {spec} ({len(cuda)} packages, e.g. {cuda[0]}; several "
              "GB) but this machine has no NVIDIA GPU. Fix: TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu "
              "for the CPU build, or TORCH_ALLOW_CUDA=1 to install it anyway.", file=sys.stderr)
        return 3
    return subprocess.run([*pip, "--quiet"]).returncode


if __name__ == "__main__":
    sys.exit(main())

"""Where a run happens: package versions, git commit, notebook path, hardware. All cheap; no heavy imports."""

from __future__ import annotations

import functools
import getpass
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any


def os_user() -> str:
    """The operating-system account (``getpass``), or the numeric uid where it has no name (containers without a
    passwd entry), else ``unknown``."""
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - getpass raises OSError/KeyError without a passwd entry
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def who() -> str:
    """The person a run, a rating or an audit entry is recorded for: the JupyterHub user when the kernel runs under
    a hub, else ``LLMOPS_USER``, else the OS account (:func:`os_user`). The one definition every record uses."""
    return os.environ.get("JUPYTERHUB_USER") or os.environ.get("LLMOPS_USER") or os_user()


TRACKED = (
    "llmops-jupyter", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes",
    "gptqmodel", "tokenizers", "papermill", "ipykernel",
)


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    out = {}
    for name in TRACKED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "packages": package_versions(),
    }
    torch = sys.modules.get("torch")  # only describe CUDA if torch is already loaded: never import it here
    if torch is not None:
        try:
            env["cuda"] = torch.version.cuda
            if torch.cuda.is_available():
                env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        except Exception:  # noqa: BLE001 - best effort
            pass
    return env


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def current_notebook() -> str | None:
    """Path of the notebook driving this kernel, when it can be known.

    ``LLMOPS_NOTEBOOK`` is set by our papermill glue; ``JPY_SESSION_NAME`` by jupyter-server for kernels it starts.
    """
    for var in ("LLMOPS_NOTEBOOK", "JPY_SESSION_NAME"):
        value = os.environ.get(var)
        if value:
            return value
    main = sys.modules.get("__main__")
    for attr in ("__vsc_ipynb_file__", "__session__"):
        value = getattr(main, attr, None)
        if isinstance(value, str) and value.endswith(".ipynb"):
            return value
    return None


def project_root() -> Path:
    return Path.cwd()


def process_start(pid: int | None = None) -> float | None:
    """When process ``pid`` (default: this one) started, in clock ticks since boot (Linux ``/proc``), else None.

    Stored with a run's pid so a reader never mistakes a recycled pid for the run's process."""
    try:
        fields = Path(f"/proc/{pid or os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
        return float(fields[19])  # field 22 of stat: starttime
    except (OSError, IndexError, ValueError):
        return None


def process_gone(pid: int | None, host: str | None, started: float | None) -> bool:
    """Whether the process that owns a run on *this* host is gone (dead, a zombie, or its pid now another
    process). A run from another host is never judged from here."""
    if host != os.uname().nodename:
        return False
    if not pid_alive(pid):
        return True
    return started is not None and process_start(pid) not in (None, started)


def pid_alive(pid: int | None) -> bool:
    """Whether a local process is running (a zombie — dead, not yet reaped — is not)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (dead, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True

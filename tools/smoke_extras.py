"""Clean-venv smoke of every install line the README promises (part of ``make test``).

Builds the wheel, installs it into a fresh virtual environment per install line — core only, ``[finetune]``,
``[batch]``, ``[serve]``, ``[lab]`` — and runs ``tools/smoke_extra_check.py`` in each: the commands that install
enables work, the others answer with the one-line install hint. pip's cache is reused, so after the first run this
costs about the time to unpack the wheels. torch goes in first through ``tools/install_torch.py`` (never a surprise
CUDA build). Usage: ``python tools/smoke_extras.py [core finetune ...]``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "smoke"
LINES = ("core", "finetune", "batch", "serve", "lab")
NEEDS_TORCH = {"finetune", "serve"}


def run(cmd: list[str], **kw) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"smoke: failed: {' '.join(cmd)}")


def main(argv: list[str]) -> int:
    lines = argv or list(LINES)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HATCH_JUPYTER_BUILDER_SKIP_NPM": "1"}
    env.pop("PYTHONPATH", None)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(OUT / "wheel"), str(ROOT)], env=env)
    (wheel,) = (OUT / "wheel").glob("llmops_jupyter-*.whl")
    failed = []
    for line in lines:
        start = time.monotonic()
        venv = OUT / f"venv-{line}"
        run([sys.executable, "-m", "venv", str(venv)], env=env)
        py = str(venv / "bin" / "python")
        if line in NEEDS_TORCH:
            run([py, str(ROOT / "tools" / "install_torch.py")], env=env)
        target = f"{wheel}" if line == "core" else f"{wheel}[{line}]"
        run([py, "-m", "pip", "install", "-q", "--constraint", str(ROOT / "constraints.txt"), target], env=env)
        work = OUT / f"work-{line}"
        work.mkdir()
        proc = subprocess.run([py, str(ROOT / "tools" / "smoke_extra_check.py"), line, str(ROOT / "README.md")],
                              cwd=work, env={**env, "LLMOPS_HOME": str(work / ".llmops"), "HF_HUB_OFFLINE": "1",
                                             "LLMOPS_MODEL_CACHE": str(work / "models"),
                                             "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"},
                              capture_output=True, text=True)
        took = time.monotonic() - start
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            failed.append(line)
        print(f"smoke [{line}]: {'ok' if proc.returncode == 0 else 'FAILED'} in {took:.0f}s", flush=True)
    if failed:
        print(f"smoke: install lines failing: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

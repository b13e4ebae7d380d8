"""`make` installs torch first and refuses a multi-GB CUDA build on a machine without a GPU, before downloading."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("install_torch", ROOT / "tools" / "install_torch.py")
install_torch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install_torch)


def report(*items: tuple[str, str]) -> dict:
    """The shape of `pip install --dry-run --report` (pip's documented installation report)."""
    return {"version": "1", "install": [{"metadata": {"name": n, "version": v}} for n, v in items]}


def test_cuda_builds_are_recognised():
    assert install_torch.cuda_packages(report(("torch", "2.13.0"), ("nvidia-cublas-cu13", "13.0.1"))) == [
        "nvidia-cublas-cu13==13.0.1"]
    assert install_torch.cuda_packages(report(("torch", "2.13.0+cu130"))) == ["torch==2.13.0+cu130"]
    assert install_torch.cuda_packages(report(("torch", "2.13.0+cpu"), ("numpy", "2.3.0"))) == []


def test_this_index_serves_a_cpu_build():
    """What `make` resolves here: no CUDA packages, so it installs (the dry run downloads no wheel)."""
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-",
                          "--ignore-installed", "--no-deps", "torch==2.13.0"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert install_torch.cuda_packages(json.loads(out.stdout)) == []


def test_refuses_a_cuda_build_without_a_gpu(tmp_path, monkeypatch):
    """A fake pip that resolves to the CUDA build: the guard stops before installing, with the fix."""
    fake = tmp_path / "fakepip"
    fake.mkdir()
    (fake / "pip").mkdir()
    (fake / "pip" / "__init__.py").write_text("")
    (fake / "pip" / "__main__.py").write_text(
        "import json, sys\n"
        "if '--dry-run' in sys.argv:\n"
        "    print(json.dumps({'install': [{'metadata': {'name': 'torch', 'version': '2.13.0'}},"
        " {'metadata': {'name': 'nvidia-cudnn-cu13', 'version': '9.1'}}]}))\n"
        "else:\n"
        "    open('INSTALLED', 'w').write('x')\n")
    env = {**os.environ, "PYTHONPATH": str(fake), "PATH": "/usr/bin:/bin"}
    env.pop("TORCH_ALLOW_CUDA", None)
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "install_torch.py")], capture_output=True, text=True,
                         env=env, cwd=tmp_path)
    if install_torch.has_nvidia_gpu():  # a GPU machine may install it
        return
    assert out.returncode == 3 and "no NVIDIA GPU" in out.stderr and "TORCH_INDEX_URL=" in out.stderr
    assert not (tmp_path / "INSTALLED").exists()
    allowed = subprocess.run([sys.executable, str(ROOT / "tools" / "install_torch.py")], capture_output=True,
                             text=True, env={**env, "TORCH_ALLOW_CUDA": "1"}, cwd=tmp_path)
    assert allowed.returncode == 0 and (tmp_path / "INSTALLED").exists()

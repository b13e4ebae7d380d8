"""``%llmops doctor``: is this environment able to run the lifecycle, and if not, what exactly to do about it.

Versions come from :mod:`importlib.metadata` (no imports), so the check is fast and safe even when a package is
broken. torch is imported only for the CUDA check, and that check runs last.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

OK, WARN, FAIL, MISSING, INFO = "ok", "warn", "FAIL", "missing", "info"

#: Package → tested version range and the extra that brings it (keep in step with pyproject.toml; a test checks).
TESTED: dict[str, tuple[str, str]] = {
    "torch": (">=2.4", "finetune"),
    "transformers": (">=5,<6", "finetune"),
    "tokenizers": (">=0.21", "finetune"),
    "peft": (">=0.21", "finetune"),
    "trl": (">=1.0", "finetune"),
    "accelerate": (">=1.15", "finetune"),
    "datasets": (">=4", "finetune"),
    "bitsandbytes": (">=0.50", "finetune"),
    "safetensors": (">=0.5", "finetune"),
    "sacrebleu": (">=2.4", "eval"),
    "rouge-score": (">=0.1.2", "eval"),
    "sentence-transformers": (">=3", "eval"),
    "gptqmodel": (">=7.6,<8", "quantize"),
    "optimum": (">=2.3", "quantize"),
    "fastapi": (">=0.110", "serve"),
    "uvicorn": (">=0.29", "serve"),
    "httpx": (">=0.27", "serve"),
    "papermill": (">=2.6", "batch"),
    "nbclient": (">=0.10", "batch"),
    "ipykernel": (">=6.29", "batch"),
    "dask": (">=2024.1", "batch"),
    "jupyterlab": (">=4.2,<5", "lab"),
    "jupyter-server": (">=2.10", "lab"),
    "mlflow-skinny|mlflow": (">=2.10", "mlflow"),
    "nvidia-ml-py": (">=12", "gpu"),
}
#: Extras whose absence is fine on a machine that does not need them (reported as "missing", not failures).
OPTIONAL_EXTRAS = ("eval", "quantize", "serve", "batch", "lab", "mlflow", "gpu")
KERNEL_NAME = "llmops-jupyter"
LABEXT_NAME = "llmops-jupyter"


@dataclasses.dataclass
class Check:
    check: str
    status: str
    detail: str = ""
    fix: str = ""


def _version(dists: str) -> tuple[str | None, str | None]:
    """(installed distribution name, version) for ``a|b`` alternatives, or (None, None)."""
    for name in dists.split("|"):
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None, None


def _in_range(version: str, spec: str) -> bool | None:
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        return Version(version) in SpecifierSet(spec, prereleases=True)
    except Exception:  # noqa: BLE001 - packaging missing or a non-PEP 440 version: cannot tell
        return None


def install_command(extra: str) -> str:
    return f"pip install 'llmops-jupyter[{extra}]'"


def check_python() -> list[Check]:
    v = sys.version_info
    ok = v >= (3, 10)
    try:
        own = metadata.version("llmops-jupyter")
    except metadata.PackageNotFoundError:
        own = "not installed (running from a source tree)"
    return [
        Check("python", OK if ok else FAIL, f"{platform.python_version()} ({sys.executable})",
              "" if ok else "use Python 3.10 or newer"),
        Check("llmops-jupyter", INFO, own),
    ]


def check_packages() -> list[Check]:
    out = []
    for dists, (spec, extra) in TESTED.items():
        name, version = _version(dists)
        label = dists.split("|")[0]
        if version is None:
            if extra == "finetune":
                out.append(Check(label, MISSING, f"not installed (tested {spec})", install_command(extra)))
            continue  # optional extras are summarised per extra below
        fits = _in_range(version, spec)
        if fits is False:
            out.append(Check(name or label, WARN, f"{version} is outside the tested range {spec}",
                             f"pip install '{name}{spec}'"))
        else:
            out.append(Check(name or label, OK, f"{version} (tested {spec})"))
    return out


def check_extras() -> list[Check]:
    extras: dict[str, list[str]] = {}
    for dists, (_, extra) in TESTED.items():
        extras.setdefault(extra, []).append(dists)
    out = []
    for extra, members in extras.items():
        missing = [d.split("|")[0] for d in members if _version(d)[1] is None]
        if not missing:
            out.append(Check(f"extra [{extra}]", OK, "all present: " + ", ".join(d.split("|")[0] for d in members)))
        else:
            status = MISSING if extra in OPTIONAL_EXTRAS else FAIL
            out.append(Check(f"extra [{extra}]", status, "missing: " + ", ".join(missing), install_command(extra)))
    return out


def check_kernelspec() -> list[Check]:
    where = "--sys-prefix" if sys.prefix != sys.base_prefix else "--user"  # a venv's own kernels live in it
    fix = f"python -m ipykernel install {where} --name {KERNEL_NAME} --display-name 'Python (llmops-jupyter)'"
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        specs = KernelSpecManager().find_kernel_specs()
    except Exception as exc:  # noqa: BLE001 - jupyter_client missing or broken
        return [Check("kernel spec", MISSING, f"cannot list kernel specs ({type(exc).__name__})",
                      install_command("batch"))]
    if KERNEL_NAME in specs:
        spec_dir = Path(specs[KERNEL_NAME])
        argv = []
        try:
            argv = json.loads((spec_dir / "kernel.json").read_text()).get("argv", [])
        except (OSError, ValueError):
            pass
        python = argv[0] if argv else "?"
        # jupyter_client runs a bare "python"/"python3" as the server's own interpreter
        same = bool(argv) and (python in ("python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}")
                               or Path(python).resolve() == Path(sys.executable).resolve())
        return [Check("kernel spec", OK if same else WARN, f"'{KERNEL_NAME}' at {spec_dir} runs {python}",
                      "" if same else f"re-install it from this environment: {fix}")]
    return [Check("kernel spec", WARN, f"no '{KERNEL_NAME}' kernel (found: {', '.join(sorted(specs)) or 'none'})",
                  fix)]


def check_labextension() -> list[Check]:
    try:
        from jupyter_core.paths import jupyter_config_path, jupyter_path
    except ImportError:
        return [Check("lab extension", MISSING, "jupyter_core not installed", install_command("lab"))]
    found = [Path(p) / LABEXT_NAME for p in jupyter_path("labextensions") if (Path(p) / LABEXT_NAME
                                                                               / "package.json").exists()]
    if not found:
        return [Check("lab extension", MISSING, f"'{LABEXT_NAME}' not in any labextensions path",
                      "pip install 'llmops-jupyter[lab]' (the wheel ships the prebuilt extension)")]
    disabled = False
    for cfg in jupyter_config_path():
        page = Path(cfg) / "labconfig" / "page_config.json"
        try:
            data = json.loads(page.read_text())
        except (OSError, ValueError):
            continue
        dis = data.get("disabledExtensions") or {}
        if (isinstance(dis, dict) and any(k.startswith(LABEXT_NAME) and v for k, v in dis.items())) or (
                isinstance(dis, list) and any(str(k).startswith(LABEXT_NAME) for k in dis)):
            disabled = True
    if disabled:
        return [Check("lab extension", WARN, f"installed at {found[0]} but disabled",
                      f"jupyter labextension enable {LABEXT_NAME}")]
    version = json.loads((found[0] / "package.json").read_text()).get("version", "?")
    return [Check("lab extension", OK, f"{LABEXT_NAME} {version} enabled ({found[0]})")]


def check_torch_cuda() -> list[Check]:
    """Imports torch (slow): run last. Reports the build, CUDA availability, each GPU's free memory, bnb backend."""
    if _version("torch")[1] is None:
        return [Check("cuda", MISSING, "torch not installed", install_command("finetune"))]
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - a broken install is exactly what doctor is for
        return [Check("torch import", FAIL, f"{type(exc).__name__}: {exc}",
                      "reinstall torch for your platform (https://pytorch.org/get-started/locally/)")]
    out = []
    build = torch.version.cuda
    out.append(Check("torch build", OK if build else INFO,
                     f"torch {torch.__version__}, " + (f"CUDA {build} build" if build else "CPU-only build"),
                     "" if build else "for GPU training install a CUDA build of torch"))
    if build and torch.cuda.is_available():
        n = torch.cuda.device_count()
        out.append(Check("cuda available", OK, f"{n} GPU(s)"))
        for i in range(n):
            try:
                free, total = torch.cuda.mem_get_info(i)
                name = torch.cuda.get_device_name(i)
                cap = ".".join(map(str, torch.cuda.get_device_capability(i)))
                low = free < 0.1 * total
                out.append(Check(f"gpu {i}", WARN if low else OK,
                                 f"{name} (sm {cap}): {free / 2**30:.1f} / {total / 2**30:.1f} GiB free",
                                 "free GPU memory: restart other kernels or `%llmops plan` a smaller setup"
                                 if low else ""))
            except Exception as exc:  # noqa: BLE001
                out.append(Check(f"gpu {i}", WARN, f"cannot query: {exc}"))
    elif build:
        out.append(Check("cuda available", WARN, "CUDA build but no usable GPU (driver missing or no device)",
                         "check `nvidia-smi` and CUDA_VISIBLE_DEVICES"))
    else:
        out.append(Check("cuda available", INFO, "no (CPU-only): tiny models and tests run; real training is slow"))
    if _version("bitsandbytes")[1] is not None:
        try:
            import bitsandbytes  # noqa: F401
            from bitsandbytes import cextension

            backend = getattr(cextension, "BNB_BACKEND", "?")
            out.append(Check("bitsandbytes backend", OK, f"{backend} native library loaded"
                             if getattr(cextension, "lib", None) is not None else str(backend)))
        except Exception as exc:  # noqa: BLE001
            out.append(Check("bitsandbytes backend", FAIL, f"{type(exc).__name__}: {exc}",
                             "pip install -U 'bitsandbytes>=0.50'"))
    return out


def run_checks(cuda: bool = True) -> list[Check]:
    """All checks in a stable order; the torch/CUDA ones last (they are the only ones that import anything big)."""
    checks = [*check_python(), *check_packages(), *check_extras(), *check_kernelspec(), *check_labextension()]
    if cuda:
        checks += check_torch_cuda()
    return checks


def report(checks: list[Check]) -> Any:
    from llmops_jupyter.core.display import Table

    bad = [c for c in checks if c.status in (FAIL, WARN, MISSING)]
    note = (f"{len(bad)} item(s) need attention; run the fix column's command." if bad
            else "Everything checked is in order.")
    return Table(["check", "status", "detail", "fix"], [[c.check, c.status, c.detail, c.fix] for c in checks],
                 title="llmops doctor", note=note)

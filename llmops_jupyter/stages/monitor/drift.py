"""Drift between a reference window (training/eval prompts, or earlier traffic) and recent traffic.

* **Embedding drift** (the ``drift`` score, 0..1): how much farther recent prompts are from their nearest
  reference prompt than reference prompts are from each other — ``median NN cosine distance(recent → ref)``
  minus the same for held-out reference prompts, clipped to [0, 1]. Paraphrases of the training distribution
  score near 0; another language, code or a new task scores high. Nearest-neighbour rather than centroid
  distance, because a reference mixing several tasks has a meaningless centroid.
* **Length drift**: population stability index (PSI, quantile bins of the reference) and the two-sample
  Kolmogorov–Smirnov statistic of prompt lengths in words (tokenizer-independent, so a dataset and logged
  traffic compare directly). Rule of thumb: PSI < 0.1 stable, > 0.25 shifted.
"""

from __future__ import annotations

from typing import Any


def _nn_dist(a, b):
    import numpy as np

    if len(a) == 0 or len(b) == 0:
        return np.zeros(0)
    return 1.0 - (a @ b.T).max(axis=1)


def embedding_drift(ref, cur, *, seed: int = 0, holdout: float = 0.2) -> dict[str, float]:
    """``ref``, ``cur``: L2-normalised embedding matrices."""
    import numpy as np

    if len(ref) < 2 or len(cur) == 0:
        return {"drift": float("nan"), "drift_nn_recent": float("nan"), "drift_nn_baseline": float("nan")}
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(ref))
    n_hold = max(1, int(len(ref) * holdout))
    hold, rest = ref[idx[:n_hold]], ref[idx[n_hold:]]
    baseline = float(np.median(_nn_dist(hold, rest)))
    recent = float(np.median(_nn_dist(cur, ref)))
    return {"drift": float(min(1.0, max(0.0, recent - baseline))), "drift_nn_recent": recent,
            "drift_nn_baseline": baseline}


def psi(ref: list[float], cur: list[float], bins: int = 10) -> float:
    """Population stability index with quantile bins of the reference (eps-smoothed)."""
    import numpy as np

    ref_a, cur_a = np.asarray(ref, dtype=float), np.asarray(cur, dtype=float)
    if len(ref_a) == 0 or len(cur_a) == 0:
        return float("nan")
    edges = np.unique(np.quantile(ref_a, np.linspace(0, 1, bins + 1)[1:-1]))
    r = np.bincount(np.searchsorted(edges, ref_a, side="right"), minlength=len(edges) + 1) / len(ref_a)
    c = np.bincount(np.searchsorted(edges, cur_a, side="right"), minlength=len(edges) + 1) / len(cur_a)
    eps = 1e-4
    r, c = np.clip(r, eps, None), np.clip(c, eps, None)
    return float(np.sum((c - r) * np.log(c / r)))


def ks(ref: list[float], cur: list[float]) -> float:
    """Two-sample Kolmogorov–Smirnov statistic (max distance between the empirical CDFs)."""
    import numpy as np

    a, b = np.sort(np.asarray(ref, dtype=float)), np.sort(np.asarray(cur, dtype=float))
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def length(text: str) -> int:
    return len((text or "").split())


def drift_report(ref_texts: list[str], cur_texts: list[str], *, embed_fn: Any = None) -> dict[str, float]:
    """All drift scores for two lists of prompts."""
    if embed_fn is None:
        from functools import partial

        from llmops_jupyter.models.embeddings import embed

        embed_fn = partial(embed, extra="monitor")
    out = embedding_drift(embed_fn(ref_texts), embed_fn(cur_texts))
    ref_len, cur_len = [length(t) for t in ref_texts], [length(t) for t in cur_texts]
    out["length_psi"] = psi(ref_len, cur_len)
    out["length_ks"] = ks(ref_len, cur_len)
    return out

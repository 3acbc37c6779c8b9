"""Diversity samplers over embeddings: pure functions of (embeddings in visiting order, budget)."""

from __future__ import annotations

import numpy as np


def repr_filter(emb: np.ndarray, budget: int, threshold: float = 0.9, chunk: int = 4096) -> list[int]:
    """DEITA's representation filter: visit rows in order (the current ranking); keep a row unless its
    cosine similarity to some already kept row exceeds `threshold`; stop at `budget`.

    `emb` rows must be L2-normalised (then a dot product is the cosine).
    """
    kept: list[int] = []
    kept_vecs = np.empty((max(budget, 0), emb.shape[1]), dtype=emb.dtype)  # preallocated: no copying per keep
    for i in range(emb.shape[0]):
        if len(kept) >= budget:
            break
        k = len(kept)
        # in chunks, so memory stays bounded however many rows are kept
        if k and any(np.max(kept_vecs[s:min(s + chunk, k)] @ emb[i]) > threshold for s in range(0, k, chunk)):
            continue
        kept_vecs[k] = emb[i]
        kept.append(i)
    return kept


def kcenter(emb: np.ndarray, budget: int) -> list[int]:
    """Greedy k-center (farthest-first traversal), starting from the first row in visiting order."""
    n = emb.shape[0]
    if n == 0 or budget <= 0:
        return []
    chosen = [0]
    dist = np.linalg.norm(emb - emb[0], axis=1)
    while len(chosen) < min(budget, n):
        nxt = int(np.argmax(dist))
        if dist[nxt] == 0:  # every remaining row duplicates a chosen one
            break
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(emb - emb[nxt], axis=1))
    return chosen

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


def similarity_kernel(emb: np.ndarray, metric: str = "euclidean") -> np.ndarray:
    """Dense pairwise similarities as submodlib's `create_kernel(X, "dense", metric)` builds them:
    euclidean → exp(-distance / dimension); cosine → cosine similarity."""
    x = emb.astype(np.float64)
    if metric == "cosine":
        unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return (unit @ unit.T).astype(np.float32)
    sq = np.sum(x * x, axis=1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0))
    return np.exp(-dist / x.shape[1]).astype(np.float32)  # float32: 10k rows need 400 MB, not 800


def facility_location(emb: np.ndarray, budget: int, metric: str = "euclidean") -> list[int]:
    """Lazy-greedy maximisation of f(S) = Σ_i max_{j∈S} s_ij (Superfiltering-D's selection).

    Lazy greedy returns what plain greedy returns (gains only shrink as S grows); ties go to
    the lower index. The kernel is dense: n² similarities.
    """
    import heapq

    n = emb.shape[0]
    if n == 0 or budget <= 0:
        return []
    sims = similarity_kernel(emb, metric)
    covered = np.zeros(n, dtype=np.float32)  # max similarity of each row to the chosen set so far
    heap = [(-float(np.maximum(sims[:, j], 0.0).sum()), j) for j in range(n)]  # upper bounds on each gain
    heapq.heapify(heap)
    chosen: list[int] = []
    while heap and len(chosen) < min(budget, n):
        neg_bound, j = heapq.heappop(heap)
        gain = float(np.maximum(sims[:, j] - covered, 0.0).sum())
        if heap and gain < -heap[0][0] - 1e-12:  # stale bound: re-insert with the fresh gain
            heapq.heappush(heap, (-gain, j))
            continue
        chosen.append(j)
        covered = np.maximum(covered, sims[:, j])
    return chosen

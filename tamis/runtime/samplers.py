"""Diversity samplers over embeddings: pure functions of (embeddings in visiting order, budget).

All three scale to pools of a million rows: no N×N matrix is ever held (facility location keeps its exact
dense kernel only up to `DENSE_LIMIT` rows), and temporaries are bounded blocks of rows. `kcenter` and the
neighbour search of `facility_location` run on a CUDA device through torch when one is present and the pool
is large (`device="auto"`); everything else is numpy.
"""

from __future__ import annotations

import heapq
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

DENSE_LIMIT = 4096  # facility location: exact dense kernel up to this many rows (4096² float32 = 64 MiB)
DEFAULT_NEIGHBORS = 64  # facility location above DENSE_LIMIT: similarities kept per row (besides its own)

_BLOCK = 2048  # rows per side of a similarity block in the neighbour search (2048² float32 = 16 MiB)
_ROUNDS = 16  # neighbour search: rows with up to this many new candidates in a block merge them one by one
_CANDIDATES = 256  # repr_filter: most candidates screened per matrix product
_GATHER = 1 << 23  # elements gathered at once (32 MiB of float32): bounds every row-gathering temporary
_GPU_MIN_ELEMENTS = 1 << 22  # "auto" uses CUDA from n·dim ≥ 4M (≈11k rows of 384): below, launches cost more


# --------------------------------------------------------------------------- repr_filter (DEITA)


def repr_filter(emb: np.ndarray, budget: int, threshold: float = 0.9, chunk: int = 4096) -> list[int]:
    """DEITA's representation filter: visit rows in order (the current ranking); keep a row unless its
    cosine similarity to some already kept row exceeds `threshold`; stop at `budget`.

    `emb` rows must be L2-normalised (then a dot product is the cosine). Candidates are screened in blocks:
    one matrix product compares a block with every row kept before it (`chunk` kept rows at a time, so
    memory stays bounded), then the block is walked in order against the rows kept inside it. The decisions
    are the per-candidate loop's; as with any BLAS, a similarity within float rounding (~1e-7) of the
    threshold may round either way.
    """
    n, dim = emb.shape
    if n == 0 or budget <= 0:
        return []
    kept: list[int] = []
    kept_vecs = np.empty((min(budget, n), dim), dtype=emb.dtype)  # preallocated: no copying per keep
    start = 0
    while start < n:
        # a block no larger than the kept set: walking it (block² products) costs at most its screening
        step = max(1, min(chunk, _CANDIDATES, max(16, len(kept))))
        block = emb[start:start + step]
        fresh = np.flatnonzero(~_too_similar(block, kept_vecs[:len(kept)], threshold, chunk))
        for i in _walk(block[fresh], threshold, room=len(kept_vecs) - len(kept)):
            kept_vecs[len(kept)] = block[fresh[i]]
            kept.append(start + int(fresh[i]))
        if len(kept) >= budget:
            break
        start += step
    return kept


def _too_similar(block: np.ndarray, kept: np.ndarray, threshold: float, chunk: int) -> np.ndarray:
    """For each row of `block`: does its largest similarity to a kept row exceed `threshold`?"""
    out = np.zeros(len(block), dtype=bool)
    step = max(chunk, 1)
    for s in range(0, len(kept), step):
        out |= np.max(block @ kept[s:s + step].T, axis=1) > threshold
    return out


def _walk(vecs: np.ndarray, threshold: float, room: int) -> list[int]:
    """Positions of `vecs` kept, in order, when each is compared with those of `vecs` kept before it."""
    if room <= 0 or len(vecs) == 0:
        return []
    too_close = np.tril(vecs @ vecs.T, -1) > threshold  # [a, b]: a comes after b and is too similar to it
    if not too_close.any():  # the usual case: nothing in the block conflicts
        return list(range(min(len(vecs), room)))
    kept: list[int] = []
    for a in range(len(vecs)):
        if kept and too_close[a, kept].any():
            continue
        kept.append(a)
        if len(kept) == room:
            break
    return kept


# --------------------------------------------------------------------------- kcenter


def kcenter(emb: np.ndarray, budget: int, *, device: str = "auto") -> list[int]:
    """Greedy k-center (farthest-first traversal), starting from the first row in visiting order.

    The selection is exactly the plain loop's (`dist = minimum(dist, norm(emb - emb[c], axis=1))`, next
    center `argmax(dist)`, lowest index on ties, stop early when that is 0). Per pick, one matrix-vector
    product updates every row's squared distance to its nearest center from dot products, which is within
    a proven rounding bound of the plain loop's; only the few rows within that bound of the largest (the
    possible argmax) get the plain loop's exact distances, once per (row, center) pair. Memory: the
    centers' rows (budget × dim) and a few vectors of N; no N×dim temporary. `device`: "auto" runs the
    products on a CUDA device through torch when one is present and the pool is large, "cpu" never,
    "cuda" always.
    """
    x = _float_rows(emb)
    n = len(x)
    if n == 0 or budget <= 0:
        return []
    sq = np.einsum("ij,ij->i", x, x)
    if not np.isfinite(sq).all():
        raise ValueError("kcenter needs finite embeddings")
    chosen = np.zeros(min(budget, n), dtype=np.int64)  # centers, in order
    screen = _Screen.make(x, sq, len(chosen), device)
    exact = np.full(n, np.inf, dtype=x.dtype)  # min of the plain loop's distances over the centers folded in
    folded = np.zeros(n, dtype=np.int64)  # how many centers (in order) are folded into `exact`
    t = 1
    while t < len(chosen):
        rows, approx, margin = screen.add_center(int(chosen[t - 1]))
        if len(rows) == 1 and approx[0] > 4 * margin:  # one possible farthest row, surely not a duplicate:
            j = int(rows[0])  # it is the plain loop's pick, whatever its exact distance (no fold needed)
        else:
            _fold(x, sq, screen, rows, approx + 2 * margin, chosen[:t], exact, folded)
            j = int(rows[np.argmax(exact[rows])])  # rows ascend: ties go to the lower index
            if exact[j] == 0:  # every remaining row duplicates a chosen one
                break
        chosen[t] = j
        t += 1
    return chosen[:t].tolist()


def _float_rows(emb: np.ndarray) -> np.ndarray:
    """C-contiguous floating rows (float32/64 kept as given; integers as np.linalg.norm would: float64)."""
    a = np.asarray(emb)
    return np.ascontiguousarray(a if a.dtype in (np.float32, np.float64) else a.astype(np.float64))


def _fold(x: np.ndarray, sq: np.ndarray, screen: "_Screen", rows: np.ndarray, reach: np.ndarray,
          centers: np.ndarray, exact: np.ndarray, folded: np.ndarray) -> None:
    """Bring exact[rows] up to date with every center (row indices, in order). A center whose squared
    distance from dot products exceeds a row's `reach` (its smallest plus twice the rounding bound) cannot
    be its nearest: only the others get the exact distance. Rows missing only the newest center (the usual
    case) are done apart from the rest, which may need many."""
    behind = folded[rows] < len(centers) - 1
    for group in (np.flatnonzero(~behind), np.flatnonzero(behind)):
        step = max(1, _GATHER // max(len(centers), x.shape[1]))
        for s in range(0, len(group), step):
            part = group[s:s + step]
            _fold_since(x, sq, screen, rows[part], reach[part], centers, exact, folded)


def _fold_since(x: np.ndarray, sq: np.ndarray, screen: "_Screen", rows: np.ndarray, reach: np.ndarray,
                centers: np.ndarray, exact: np.ndarray, folded: np.ndarray) -> None:
    lo = int(folded[rows].min())
    pending = centers[lo:]
    approx = sq[rows, None] + sq[None, pending] - 2 * screen.dots(rows, lo, len(centers))
    approx[np.arange(lo, len(centers))[None, :] < folded[rows, None]] = np.inf  # folded before
    r, c = np.nonzero(approx <= reach[:, None])
    step = max(1, _GATHER // x.shape[1])
    for p in range(0, len(r), step):
        rr = rows[r[p:p + step]]
        diff = x[rr] - x[pending[c[p:p + step]]]  # the plain loop's arithmetic: difference, square,
        diff *= diff  # pairwise sum along the row, square root
        np.minimum.at(exact, rr, np.sqrt(np.add.reduce(diff, axis=1)))
    folded[rows] = len(centers)


class _Screen:
    """Each row's squared distance to its nearest center, from dot products: h_i = min_c |x_i|² + |c|² -
    2·x_i·c. It is within tol·(2·max|x|² + h) of the plain loop's squared distance (worst-case rounding of
    dim-long float sums, with a 4× margin), so the plain loop's farthest row is among the rows within
    twice that of max h. Keeps the centers' rows, in order, for `dots`. numpy version."""

    def __init__(self, x: np.ndarray, sq: np.ndarray, capacity: int):
        self.set_bound(x, sq)
        self.x, self.sq, self.t = x, sq, 0
        self.centers = np.empty((capacity, x.shape[1]), dtype=x.dtype)
        self.h, self.g = np.full(len(x), np.inf, dtype=x.dtype), np.empty(len(x), dtype=x.dtype)

    def set_bound(self, x: np.ndarray, sq: np.ndarray) -> None:
        self.tol = 8 * (x.shape[1] + 8) * float(np.finfo(x.dtype).eps) / 2
        self.spread = 2 * float(sq.max())

    @staticmethod
    def make(x: np.ndarray, sq: np.ndarray, capacity: int, device: str) -> "_Screen":
        torch = _cuda_torch(device, x.size, x.nbytes)
        return _TorchScreen(torch, x, sq, capacity) if torch is not None else _Screen(x, sq, capacity)

    def margin(self, top: float) -> float:
        return self.tol * (self.spread + top)

    def add_center(self, j: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Fold center j into h; return the rows that may be farthest, their h, and the rounding bound."""
        self.centers[self.t] = self.x[j]
        self.t += 1
        np.matmul(self.x, self.x[j] * -2, out=self.g)
        self.g += self.sq
        self.g += self.sq[j]
        np.minimum(self.h, self.g, out=self.h)
        top = float(self.h.max())
        rows = np.flatnonzero(self.h >= top - 2 * self.margin(top))
        return rows, self.h[rows], self.margin(top)

    def dots(self, rows: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """x[rows] · (centers lo…hi-1)."""
        return self.x[rows] @ self.centers[lo:hi].T


class _TorchScreen(_Screen):
    """The same screen on a CUDA device: the rows are uploaded once, in chunks; each pick, only the few
    rows that may be farthest come back."""

    def __init__(self, torch: Any, x: np.ndarray, sq: np.ndarray, capacity: int):
        self.set_bound(x, sq)
        self.torch, self.x, self.t = torch, _upload(torch, x), 0
        self.sq = torch.from_numpy(sq).cuda()
        self.centers = torch.empty((capacity, x.shape[1]), dtype=self.x.dtype, device="cuda")
        self.h = torch.full((len(x),), float("inf"), dtype=self.x.dtype, device="cuda")

    def add_center(self, j: int) -> tuple[np.ndarray, np.ndarray, float]:
        self.centers[self.t] = self.x[j]
        self.t += 1
        g = self.torch.mv(self.x, self.x[j] * -2)
        g += self.sq
        g += self.sq[j]
        self.torch.minimum(self.h, g, out=self.h)
        top = self.h.max()
        rows = (self.h >= top - 2 * self.tol * (self.spread + top)).nonzero().squeeze(1)
        approx = self.h[rows].cpu().numpy()
        return rows.cpu().numpy(), approx, self.margin(float(approx.max()))

    def dots(self, rows: np.ndarray, lo: int, hi: int) -> np.ndarray:
        return (self.x[self.torch.from_numpy(rows).cuda()] @ self.centers[lo:hi].T).cpu().numpy()


def _cuda_torch(device: str, elements: int, nbytes: int) -> Any:
    """torch when the work should run on CUDA: `device` "cuda", or "auto" with a CUDA device present, a
    large enough problem and room for the rows on the device; else None (numpy)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', not {device!r}")
    if device == "cpu" or (device == "auto" and elements < _GPU_MIN_ELEMENTS):
        return None
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        if device == "cuda":
            raise RuntimeError("device='cuda' but torch sees no CUDA device")
        return None
    if device == "auto" and torch.cuda.mem_get_info()[0] < 2 * nbytes + (1 << 30):
        return None  # would not fit beside its working blocks: stay on the CPU
    return torch


def _upload(torch: Any, x: np.ndarray) -> Any:
    """`x` as a CUDA tensor, copied in chunks so no second host-side copy of the pool is made."""
    out = torch.empty(x.shape, dtype=torch.float32 if x.dtype == np.float32 else torch.float64, device="cuda")
    step = max(1, _GATHER // max(x.shape[1], 1))
    for s in range(0, len(x), step):
        out[s:s + step].copy_(torch.from_numpy(x[s:s + step]))
    return out


# --------------------------------------------------------------------------- facility location (Superfiltering-D)


def facility_location(emb: np.ndarray, budget: int, metric: str = "euclidean", *, k: int = DEFAULT_NEIGHBORS,
                      dense_limit: int = DENSE_LIMIT, device: str = "auto") -> list[int]:
    """Lazy-greedy maximisation of f(S) = Σ_i max_{j∈S} s_ij (Superfiltering-D's selection).

    s is submodlib's kernel (`similarity_kernel`). Lazy greedy returns what plain greedy returns (gains only
    shrink as S grows); ties go to the lower index.

    Up to `dense_limit` rows the kernel is dense and exact (submodlib's "dense" mode). Above, it is sparse,
    as in submodlib's "sparse" mode: row i keeps s_ii and its similarities to its `k` most similar other
    rows (found by blocked matrix products, never an N×N matrix; on CUDA through torch when `device`
    allows), and every other s_ij counts as 0. That is an approximation: a row is credited only to chosen
    rows among its k nearest, so coverage by a pick farther away is not counted; with k ≥ N-1 it is the
    dense kernel and the selection is the dense one. The kept s_ij use the dense kernel's float64 formula.
    Memory is O(N·k): 1M rows of 384 with k = 64 took 2.2 GB besides the embeddings.
    """
    n = emb.shape[0]
    if k < 1:
        raise ValueError(f"k (neighbours kept per row) must be at least 1, not {k}")
    if n == 0 or budget <= 0:
        return []
    if n <= dense_limit:
        cols = np.ascontiguousarray(similarity_kernel(emb, metric).T)  # column j (s_·j) contiguous
        kernel = _Columns(np.arange(0, n * n + 1, n, dtype=np.int64), None, cols.reshape(-1))
    else:
        kernel = _sparse_kernel(emb, metric, k, device)
    return _lazy_greedy(kernel, budget)


def similarity_kernel(emb: np.ndarray, metric: str = "euclidean") -> np.ndarray:
    """Dense pairwise similarities as submodlib's `create_kernel(X, "dense", metric)` builds them:
    euclidean → exp(-distance / dimension); cosine → cosine similarity."""
    scale, sq = _kernel_terms(emb, metric)
    x = _kernel_rows(emb, scale)
    return _similarities(x @ x.T, sq[:, None], sq[None, :], emb.shape[1], metric)


def _kernel_terms(emb: np.ndarray, metric: str) -> tuple[np.ndarray | None, np.ndarray]:
    """Per-row float64 terms of the kernel: (cosine: the norm each row is divided by, else None; the squared
    norm of the row as used, for euclidean). Computed in row chunks with the same per-row arithmetic."""
    n, dim = emb.shape
    scale = np.empty(n) if metric == "cosine" else None
    sq = np.empty(n)
    step = max(1, _GATHER // max(dim, 1))
    for s in range(0, n, step):
        x = emb[s:s + step].astype(np.float64)
        if scale is not None:
            scale[s:s + step] = np.maximum(np.linalg.norm(x, axis=1), 1e-12)
            x = x / scale[s:s + step, None]
        sq[s:s + step] = np.sum(x * x, axis=1)
    return scale, sq


def _kernel_rows(rows: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """Rows as the kernel uses them: float64, unit length for cosine (`scale` holds their norms)."""
    x = rows.astype(np.float64)
    return x if scale is None else x / scale[..., None]


def _similarities(dots: np.ndarray, sq_i: np.ndarray, sq_j: np.ndarray, dim: int, metric: str) -> np.ndarray:
    """s_ij from float64 dot products (overwritten), in submodlib's dense-kernel arithmetic, as float32."""
    if metric == "cosine":
        return dots.astype(np.float32)
    dots *= 2  # exact; (|x_i|² + |x_j|²) - 2·x_i·x_j in this order, as the dense kernel always computed it
    d = sq_i + sq_j
    d -= dots
    np.maximum(d, 0.0, out=d)
    np.sqrt(d, out=d)
    np.negative(d, out=d)
    d /= dim
    np.exp(d, out=d)
    return d.astype(np.float32)  # float32: 10k rows need 400 MB, not 800


@dataclass
class _Columns:
    """A similarity kernel by columns (CSC): column j holds s_ij for rows `rows[ptr[j]:ptr[j+1]]`, ascending
    (`rows` None: every row, dense), values in `vals`."""

    ptr: np.ndarray
    rows: np.ndarray | None
    vals: np.ndarray

    def column(self, j: int) -> tuple[Any, np.ndarray]:
        a, b = self.ptr[j], self.ptr[j + 1]
        return (slice(None) if self.rows is None else self.rows[a:b]), self.vals[a:b]

    def first_gains(self) -> np.ndarray:
        """Σ_i max(s_ij, 0) of every column, summed exactly as `_lazy_greedy` sums a gain (numpy's pairwise
        sum over the column): columns of equal length are summed together, `_GATHER` values at a time."""
        pos = np.maximum(self.vals, 0.0)
        lens = np.diff(self.ptr)
        if self.rows is None:  # dense: every column has every row
            return pos.reshape(len(lens), -1).sum(axis=1)
        out = np.zeros(len(lens), dtype=np.float32)
        for length in np.unique(lens[lens > 0]):
            cols = np.flatnonzero(lens == length)
            step = max(1, _GATHER // int(length))
            for s in range(0, len(cols), step):
                part = cols[s:s + step]
                out[part] = pos[self.ptr[part, None] + np.arange(length)].sum(axis=1)
        return out


def _lazy_greedy(kernel: _Columns, budget: int) -> list[int]:
    """Lazy greedy on f(S) = Σ_i max_{j∈S} s_ij: a max-heap of stale upper bounds on each gain."""
    n = len(kernel.ptr) - 1
    covered = np.zeros(n, dtype=np.float32)  # max similarity of each row to the chosen set so far
    heap = list(zip((-kernel.first_gains()).tolist(), range(n)))
    heapq.heapify(heap)
    chosen: list[int] = []
    while heap and len(chosen) < min(budget, n):
        _, j = heapq.heappop(heap)
        rows, vals = kernel.column(j)
        gain = float(np.maximum(vals - covered[rows], 0.0).sum())
        if heap and gain < -heap[0][0] - 1e-12:  # stale bound: re-insert with the fresh gain
            heapq.heappush(heap, (-gain, j))
            continue
        chosen.append(j)
        covered[rows] = np.maximum(covered[rows], vals)
    return chosen


def _sparse_kernel(emb: np.ndarray, metric: str, k: int, device: str) -> _Columns:
    """submodlib's sparse kernel: each row's own similarity and those of its k most similar other rows."""
    n, dim = emb.shape
    if k >= n - 1:  # every pair is kept: the dense kernel, by columns
        nbr = np.broadcast_to(np.arange(n, dtype=np.int32), (n, n))
    else:
        x = np.ascontiguousarray(emb, dtype=np.float32)  # the search ranks in float32; values are float64
        torch = _cuda_torch(device, x.size, x.nbytes)
        found = _neighbours_torch(torch, x, k, metric) if torch is not None else _neighbours(x, k, metric)
        nbr = np.concatenate([np.arange(n, dtype=np.int32)[:, None], found], axis=1)
    return _by_columns(nbr, _neighbour_similarities(emb, nbr, metric))


def _rank_terms(x: np.ndarray, metric: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(scale, shift) with score_ij = x_i·x_j·scale_j + shift_j ordering row i's neighbours as s_ij does:
    cosine → x_i·x_j/|x_j|; euclidean → x_i·x_j - |x_j|²/2 (= (|x_i|² - |x_i - x_j|²)/2)."""
    sq = np.einsum("ij,ij->i", x, x)
    if metric == "cosine":
        return (1 / np.sqrt(np.maximum(sq, np.finfo(np.float32).tiny))).astype(np.float32), None
    return None, (-sq / 2).astype(np.float32)


def _ranked(dots: np.ndarray, scale: np.ndarray | None, shift: np.ndarray | None, out: np.ndarray) -> np.ndarray:
    """Scores from a block of dot products, with the scale/shift terms already shaped to broadcast."""
    return np.multiply(dots, scale, out=out) if scale is not None else np.add(dots, shift, out=out)


def _neighbours(x: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Each row's k most similar other rows (n×k int32, unordered), numpy: the upper triangle of the
    similarity matrix in `_BLOCK`² blocks, each used for its rows and, read transposed, for its columns."""
    n = len(x)
    scale, shift = _rank_terms(x, metric)
    best = np.full((n, k), -np.inf, dtype=np.float32)
    idx = np.full((n, k), -1, dtype=np.int32)
    bar = np.full(n, -np.inf, dtype=np.float32)  # each row's k-th best score so far: only better ones enter

    def terms(a: int, b: int, axis: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        return tuple(None if t is None else np.expand_dims(t[a:b], axis) for t in (scale, shift))

    for r0 in range(0, n, _BLOCK):
        r1 = min(r0 + _BLOCK, n)
        for c0 in range(r0, n, _BLOCK):
            c1 = min(c0 + _BLOCK, n)
            dots = x[r0:r1] @ x[c0:c1].T
            if c0 != r0:  # the same products rank the columns' neighbours among these rows
                _offer(best, idx, bar, c0, r0, _ranked(dots, *terms(r0, r1, 1), out=np.empty_like(dots)).T)
            scores = _ranked(dots, *terms(c0, c1, 0), out=dots)
            if c0 == r0:
                np.fill_diagonal(scores, -np.inf)  # a row's own similarity is added apart
            _offer(best, idx, bar, r0, c0, scores)
    return idx


def _offer(best: np.ndarray, idx: np.ndarray, bar: np.ndarray, r0: int, c0: int, scores: np.ndarray) -> None:
    """Merge a block of scores (rows r0…, columns c0…; C-ordered, or a transposed view) into those rows'
    running top-k."""
    h, w = scores.shape
    hit = scores > bar[r0:r0 + h, None]
    count = int(np.count_nonzero(hit))
    if count == 0:
        return
    if count * 8 > hit.size:  # a row's first blocks: most scores compete, merge the whole block
        cols = np.broadcast_to(np.arange(c0, c0 + w, dtype=np.int32), (h, w))
        _keep_best(best, idx, slice(r0, r0 + h), np.concatenate([best[r0:r0 + h], scores], axis=1),
                   np.concatenate([idx[r0:r0 + h], cols], axis=1))
        rows = np.arange(r0, r0 + h)
    else:  # later blocks: a few scores per row beat its bar; merge only those
        r, c = _hits(hit)
        v, c = scores[r, c], (c + c0).astype(np.int32)
        per_row = np.bincount(r, minlength=h)
        many = per_row[r] > _ROUNDS
        if many.any():
            _merge_padded(best, idx, r0 + r[many], c[many], v[many])
        _merge_rounds(best, idx, r0 + r[~many], c[~many], v[~many])
        rows = r0 + np.flatnonzero(per_row)
    bar[rows] = best[rows].min(axis=1)


def _keep_best(best: np.ndarray, idx: np.ndarray, rows: Any, vals: np.ndarray, cols: np.ndarray) -> None:
    """best/idx[rows] = the k largest of each row of vals (with their columns)."""
    k = best.shape[1]
    top = np.argpartition(vals, vals.shape[1] - k, axis=1)[:, -k:]
    best[rows] = np.take_along_axis(vals, top, axis=1)
    idx[rows] = np.take_along_axis(cols, top, axis=1)


def _merge_padded(best: np.ndarray, idx: np.ndarray, r: np.ndarray, c: np.ndarray, v: np.ndarray) -> None:
    """Candidates (row r ascending, column c, score v) into the top-k: one padded selection per row."""
    k = best.shape[1]
    rows, start, per_row = np.unique(r, return_index=True, return_counts=True)
    slot = np.repeat(np.arange(len(rows)), per_row)
    pos = k + np.arange(len(r)) - np.repeat(start, per_row)
    vals = np.full((len(rows), k + int(per_row.max())), -np.inf, dtype=np.float32)
    cols = np.full(vals.shape, -1, dtype=np.int32)
    vals[:, :k], cols[:, :k] = best[rows], idx[rows]
    vals[slot, pos], cols[slot, pos] = v, c
    _keep_best(best, idx, rows, vals, cols)


def _merge_rounds(best: np.ndarray, idx: np.ndarray, r: np.ndarray, c: np.ndarray, v: np.ndarray) -> None:
    """Candidates (row r ascending, column c, score v), a few per row, into the top-k: round t offers each
    row its t-th candidate, which replaces the row's smallest kept score if larger (exact top-k, and much
    cheaper than re-selecting k among k + few per row)."""
    if len(r) == 0:
        return
    first = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
    rank = np.arange(len(r)) - np.repeat(first, np.diff(np.r_[first, len(r)]))
    for t in range(int(rank.max()) + 1):
        at = np.flatnonzero(rank == t)
        rows = r[at]
        low = np.argmin(best[rows], axis=1)
        better = v[at] > best[rows, low]
        rows, low, at = rows[better], low[better], at[better]
        best[rows, low], idx[rows, low] = v[at], c[at]


def _hits(hit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of the True entries, rows ascending; via 1-D nonzero, which is ~20× faster than 2-D."""
    h, w = hit.shape
    if hit.flags.c_contiguous:
        r, c = np.divmod(hit.reshape(-1).nonzero()[0], w)
        return r, c
    c, r = np.divmod(hit.T.reshape(-1).nonzero()[0], h)  # a transposed view: walk it in memory order
    order = np.argsort(r.astype(np.int16) if h <= 1 << 15 else r, kind="stable")  # int16: a radix sort
    return r[order], c[order]


def _neighbours_torch(torch: Any, x: np.ndarray, k: int, metric: str) -> np.ndarray:
    """`_neighbours` on a CUDA device: blocks of rows against blocks of columns, top-k merged on the device."""
    n = len(x)
    xg = _upload(torch, x)
    scale, shift = (None if t is None else torch.from_numpy(t).cuda() for t in _rank_terms(x, metric))
    out = np.empty((n, k), dtype=np.int32)
    rows_per, cols_per = 2048, 1 << 17  # a 2048 × 131072 float32 block: 1 GiB
    for r0 in range(0, n, rows_per):
        r1 = min(r0 + rows_per, n)
        best_v = torch.full((r1 - r0, 0), -float("inf"), device="cuda")
        best_i = torch.empty((r1 - r0, 0), dtype=torch.int64, device="cuda")
        for c0 in range(0, n, cols_per):
            c1 = min(c0 + cols_per, n)
            s = xg[r0:r1] @ xg[c0:c1].T
            s = s.mul_(scale[c0:c1]) if scale is not None else s.add_(shift[c0:c1])
            if max(r0, c0) < min(r1, c1):  # a row's own similarity is added apart
                own = torch.arange(max(r0, c0), min(r1, c1), device="cuda")
                s[own - r0, own - c0] = -float("inf")
            v, i = torch.topk(s, min(k, c1 - c0), dim=1, sorted=False)
            width = min(k, best_v.shape[1] + v.shape[1])
            best_v, keep = torch.topk(torch.cat([best_v, v], dim=1), width, dim=1, sorted=False)
            best_i = torch.gather(torch.cat([best_i, i + c0], dim=1), 1, keep)
        out[r0:r1] = best_i.cpu().numpy()
    return out


def _neighbour_similarities(emb: np.ndarray, nbr: np.ndarray, metric: str) -> np.ndarray:
    """s_ij for each row i and j in nbr[i] (n×L), in the dense kernel's float64 arithmetic, as float32."""
    n, width = nbr.shape
    dim = emb.shape[1]
    scale, sq = _kernel_terms(emb, metric)
    out = np.empty((n, width), dtype=np.float32)
    step = max(1, (_GATHER // 8) // max(width * dim, 1))  # per thread: a few MiB gathered at a time

    def fill(r0: int) -> None:
        r1 = min(r0 + step, n)
        j = np.maximum(nbr[r0:r1], 0)  # -1 (no neighbour: non-finite rows) is dropped by `_by_columns`
        xi = _kernel_rows(emb[r0:r1], None if scale is None else scale[r0:r1])
        dots = np.einsum("bld,bd->bl", emb[j], xi)  # neighbours gathered as stored, products in float64
        if scale is not None:
            dots /= scale[j]  # cosine: x_j·(x_i/|x_i|)/|x_j|
        out[r0:r1] = _similarities(dots, sq[r0:r1, None], sq[j], dim, metric)

    _in_threads(fill, range(0, n, step))
    return out


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _in_threads(fn: Callable[[int], None], items: range) -> None:
    """fn over items on up to 8 threads: numpy releases the GIL in its gathers, casts and products."""
    if len(items) <= 1:
        for i in items:
            fn(i)
        return
    with ThreadPoolExecutor(max_workers=min(_threads(), len(items))) as pool:
        for _ in pool.map(fn, items):  # consumed, so a worker's exception is raised here
            pass


def _by_columns(nbr: np.ndarray, vals: np.ndarray) -> _Columns:
    """Row-wise neighbour lists (row i: columns nbr[i], values vals[i]) regrouped by column, rows ascending."""
    n, width = nbr.shape
    cols = np.where(nbr >= 0, nbr, n).reshape(-1)  # missing neighbours sort last and are dropped
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(cols, minlength=n + 1)[:n], out=ptr[1:])
    order = np.argsort(cols, kind="stable")[:ptr[-1]]  # stable: within a column, rows stay ascending
    del cols
    sorted_vals = vals.reshape(-1)[order]
    order //= width  # in place: flat position → row
    return _Columns(ptr, order.astype(np.int32), sorted_vals)

"""Deduplication and decontamination: exact, MinHash-LSH and embedding-cosine near-duplicates.

Pure functions on texts (a Polars Series) or embeddings (a NumPy matrix); the recipe stages
`dedup exact | minhash(...) | semantic(...)` and `dedup … against load(...)` are wired onto them.

Conventions shared by every method:

* Rows arrive in the pipeline's order (best-ranked first). Duplicates form groups: the connected
  components of the "is a near-duplicate of" graph (so similarity is made transitive: if a~b and
  b~c then a, b, c are one group even when a and c are not similar). The row kept from a group
  is its lowest position, i.e. the best-ranked one; every other row is removed and points at it.
* Text is compared after `normalise` (lower-case, ASCII punctuation dropped, whitespace
  collapsed). A text that is empty after normalisation is never a duplicate of anything (it is
  always kept, and never matches an evaluation row): it carries no content to compare, and
  letting all empty rows collapse into one would make every method disagree on them.
* Decontamination (`against_*`) removes each pool row that is a near-duplicate of ANY evaluation
  row, directly (no transitivity through other pool rows); it points at the most similar
  evaluation row (the lowest position among ties).

Nothing is quadratic in memory: exact dedup is a Polars window over the text, MinHash uses an
LSH index (datasketch) and only scores its candidate pairs, and semantic dedup multiplies
`chunk`×`chunk` blocks of the embedding matrix, keeping only the pairs above the threshold.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import polars as pl

FIELDS = ("instruction", "input", "output", "all")

# ASCII punctuation (!"#$%&'()*+,-./:;<=>?@[\]^_`{|}~), as a Rust-regex class for Polars.
_ASCII_PUNCT = r"[!-/:-@\[-`{-~]"
# Pairs gathered before they are folded into the running components; bounds the edge memory
# (16 bytes a pair) when a huge cluster of near-duplicates produces very many pairs.
_EDGE_BUDGET = 4_000_000
# Chance that the MinHash LSH proposes a pair whose Jaccard is exactly the threshold (see lsh_params).
LSH_RECALL = 0.97


# --------------------------------------------------------------------------- texts

def dedup_text(frame: pl.DataFrame, field: str = "all") -> pl.Series:
    """The text each row is compared by: one of the columns "instruction" | "input" | "output",
    or "all" — "instruction\\n[input\\n]output" (the input line only when there is one, the text
    the embedding scorers use). A missing column or a null counts as ""."""
    if field not in FIELDS:
        raise ValueError(f"dedup field must be one of {', '.join(FIELDS)}, not {field!r}")

    def col(name: str) -> pl.Expr:
        if name in frame.columns:
            return pl.col(name).cast(pl.Utf8).fill_null("")
        return pl.repeat(pl.lit("", dtype=pl.Utf8), pl.len())  # a bare literal would be one row

    if field != "all":
        text = col(field)
    else:
        text = (pl.when(col("input") != "")
                .then(pl.concat_str([col("instruction"), col("input"), col("output")], separator="\n"))
                .otherwise(pl.concat_str([col("instruction"), col("output")], separator="\n")))
    return frame.select(text.alias("text"))["text"]


def normalise(texts: pl.Series) -> pl.Series:
    """Lower-case, drop ASCII punctuation, collapse whitespace runs to one space, strip.
    (Unicode NFKC is not available in Polars; this catches case, spacing and punctuation
    variants, the common near-identical copies.) Nulls become ""."""
    return (texts.cast(pl.Utf8).fill_null("").to_frame("t")
            .select(pl.col("t").str.to_lowercase()
                    .str.replace_all(_ASCII_PUNCT, "")  # before collapsing: "a - b" -> "a  b" -> "a b"
                    .str.replace_all(r"\s+", " ")
                    .str.strip_chars(" "))["t"])


# --------------------------------------------------------------------------- result

@dataclass
class DedupResult:
    """What a dedup (or decontamination) pass decided, row by row, in the input order.

    keep: bool[N] — the row survives.
    representative: int64[N] — for a removed row, the position of the kept row of its group
        (decontamination: the position in the evaluation set of the matched row); -1 if kept.
    similarity: float64[N] — for a removed row, its similarity to `representative` (exact 1.0;
        minhash the estimated Jaccard; semantic the cosine); NaN if kept. With transitive
        groups it can be below the threshold (a~b~c: c is compared with a).
    method: "exact" | "minhash" | "semantic".
    against: True for decontamination (representative indexes the evaluation set).
    """

    keep: np.ndarray
    representative: np.ndarray
    similarity: np.ndarray
    method: str
    against: bool = False

    @property
    def removed(self) -> int:
        return int(len(self.keep) - np.count_nonzero(self.keep))

    @property
    def groups(self) -> int:
        """Distinct representatives of removed rows: for dedup, the number of groups with ≥ 2
        rows; for decontamination, the number of evaluation rows that matched something."""
        return int(np.unique(self.representative[~self.keep]).size)

    def __len__(self) -> int:
        return len(self.keep)


def _result(rep: np.ndarray, sim: np.ndarray, method: str, against: bool = False) -> DedupResult:
    rep = np.asarray(rep, dtype=np.int64)
    keep = rep < 0
    sim = np.where(keep, np.nan, np.asarray(sim, dtype=np.float64))
    return DedupResult(keep=keep, representative=rep, similarity=sim, method=method, against=against)


def _check(threshold: float, ngram: int = 1, num_perm: int = 2, chunk: int = 1) -> None:
    if isinstance(threshold, bool) or not (isinstance(threshold, numbers.Real) and 0.0 < threshold <= 1.0):
        raise ValueError(f"dedup threshold must be in (0, 1], got {threshold!r}")
    if isinstance(ngram, bool) or not isinstance(ngram, numbers.Integral) or ngram < 1:
        raise ValueError(f"dedup ngram must be an integer ≥ 1, got {ngram!r}")
    if not isinstance(num_perm, int) or num_perm < 2:
        raise ValueError(f"dedup num_perm must be an integer ≥ 2, got {num_perm!r}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"dedup chunk must be an integer ≥ 1, got {chunk!r}")


# --------------------------------------------------------------------------- grouping

class _Components:
    """Connected components over N positions, fed pairs in batches. `root[i]` is the lowest
    position of i's component (so the kept row is the root). Pairs are buffered and folded in
    with scipy's connected_components once `_EDGE_BUDGET` accumulate, so memory stays O(N +
    budget) however many pairs a large near-duplicate cluster yields."""

    def __init__(self, n: int):
        self.root = np.arange(n, dtype=np.int64)
        self._a: list[np.ndarray] = []
        self._b: list[np.ndarray] = []
        self._pending = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        if len(a):
            self._a.append(np.asarray(a, dtype=np.int64))
            self._b.append(np.asarray(b, dtype=np.int64))
            self._pending += len(a)
            if self._pending >= _EDGE_BUDGET:
                self._fold()

    def _fold(self) -> None:
        if not self._pending:
            return
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        n = len(self.root)
        # Join the current partition (via its roots) with the new pairs.
        a, b = self.root[np.concatenate(self._a)], self.root[np.concatenate(self._b)]
        self._a, self._b, self._pending = [], [], 0
        graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n)).tocsr()
        _, label = connected_components(graph, directed=False)
        label = label[self.root]
        # Lowest position of each label: np.unique's first index over positions in order.
        _, first, inverse = np.unique(label, return_index=True, return_inverse=True)
        self.root = first[inverse].astype(np.int64)

    def representatives(self) -> np.ndarray:
        """-1 for a kept row (a root), else its root."""
        self._fold()
        return np.where(self.root == np.arange(len(self.root)), -1, self.root)


# --------------------------------------------------------------------------- exact

def _first_of_same(norm: pl.Series) -> np.ndarray:
    """Position of the first row with the same (normalised) text; -1 for the first itself and
    for empty texts. Grouped by the text itself, not a hash, so collisions cannot merge rows."""
    first = (norm.to_frame("t").with_row_index("pos")
             .select(pl.when(pl.col("t") != "")
                     .then(pl.col("pos").min().over("t"))
                     .otherwise(pl.col("pos"))
                     .cast(pl.Int64).alias("first"))["first"].to_numpy())
    return np.where(first == np.arange(len(first)), -1, first)


def exact(texts: pl.Series) -> DedupResult:
    """Rows whose normalised texts are identical: the first keeps, the others point at it."""
    rep = _first_of_same(normalise(texts))
    return _result(rep, np.ones(len(rep)), "exact")


def against_exact(pool: pl.Series, bench: pl.Series) -> DedupResult:
    """Pool rows whose normalised text equals an evaluation row's (the first such row)."""
    b = (normalise(bench).to_frame("t").with_row_index("bench_pos")
         .filter(pl.col("t") != "").group_by("t").agg(pl.col("bench_pos").min()))
    rep = (normalise(pool).to_frame("t").join(b, on="t", how="left", maintain_order="left")
           ["bench_pos"].cast(pl.Int64).fill_null(-1).to_numpy())
    return _result(rep, np.ones(len(rep)), "exact", against=True)


# --------------------------------------------------------------------------- minhash

def _unique_texts(norm: pl.Series) -> tuple[pl.Series, np.ndarray, np.ndarray]:
    """The distinct non-empty texts in order of first appearance, the position of each one's
    first row, and for every row the index of its text among them (-1 for empty texts)."""
    frame = norm.to_frame("t").with_row_index("pos")
    uniq = (frame.filter(pl.col("t") != "").group_by("t", maintain_order=True)
            .agg(pl.col("pos").first()).with_row_index("u"))
    code = (frame.join(uniq.select("t", "u"), on="t", how="left", maintain_order="left")
            ["u"].cast(pl.Int64).fill_null(-1).to_numpy())
    return uniq["t"], uniq["pos"].cast(pl.Int64).to_numpy(), code


def _shingles(norm: pl.Series, ngram: int) -> list[list[bytes]]:
    """Word `ngram`-grams of each (non-empty, normalised) text, as UTF-8 bytes, built by Polars:
    the k-th word of every gram is the word list sliced from k, so the n slices explode together.
    A text of fewer than `ngram` words is one shingle: the whole text."""
    frame = norm.to_frame("t").with_row_index("row").with_columns(w=pl.col("t").str.split(" "))
    frame = frame.with_columns(nw=pl.col("w").list.len())
    width = pl.col("nw") - ngram + 1
    long = (frame.filter(pl.col("nw") >= ngram)
            .select("row", *[pl.col("w").list.slice(k, width).alias(f"w{k}") for k in range(ngram)])
            .explode([f"w{k}" for k in range(ngram)])
            .select("row", pl.concat_str([f"w{k}" for k in range(ngram)], separator=" ").alias("s")))
    short = frame.filter(pl.col("nw") < ngram).select("row", pl.col("t").alias("s"))
    grouped = (pl.concat([long, short]).group_by("row").agg(pl.col("s").cast(pl.Binary))
               .sort("row"))
    return grouped["s"].to_list()


def _signatures(texts: pl.Series, ngram: int, num_perm: int, seed: int) -> tuple[list[Any], np.ndarray]:
    """datasketch MinHashes of the texts' shingles (SHA-1 32-bit hashes, the default, so the
    result is stable across processes and Polars versions) and their (n, num_perm) matrix."""
    from datasketch import MinHash

    if len(texts) == 0:
        return [], np.zeros((0, num_perm), dtype=np.uint32)
    mhs = MinHash.bulk(_shingles(texts, ngram), num_perm=num_perm, seed=seed)
    return mhs, np.stack([m.hashvalues for m in mhs])


def lsh_params(threshold: float, num_perm: int, recall: float = LSH_RECALL) -> tuple[int, int]:
    """(bands, rows per band) for the LSH index: the longest bands (fewest spurious candidates)
    whose chance of proposing a pair of Jaccard exactly `threshold`, 1 - (1 - t^r)^b, is still
    ≥ `recall`. datasketch's own optimiser weighs misses and false alarms equally and proposes
    only ~40% of the pairs at the threshold (b=9, r=13 for 0.8/128); here every candidate is
    verified with the estimated Jaccard, so a false alarm costs a comparison, a miss a duplicate."""
    for r in range(num_perm // 2, 0, -1):
        b = num_perm // r
        if 1.0 - (1.0 - threshold ** r) ** b >= recall:
            return b, r
    return num_perm, 1


def _lsh(mhs: list[Any], threshold: float, num_perm: int) -> Any:
    from datasketch import MinHashLSH

    lsh = MinHashLSH(num_perm=num_perm, params=lsh_params(threshold, num_perm))
    with lsh.insertion_session() as session:
        for i, m in enumerate(mhs):
            session.insert(i, m, check_duplication=False)
    return lsh


def _jaccard(sig: np.ndarray, i: np.ndarray | int, cand: np.ndarray) -> np.ndarray:
    """MinHash.jaccard (share of equal hash values), vectorised over candidate rows."""
    return np.mean(sig[cand] == sig[i], axis=-1)


def minhash(texts: pl.Series, threshold: float = 0.8, ngram: int = 5, num_perm: int = 128,
            seed: int = 1) -> DedupResult:
    """Near-duplicates by estimated Jaccard similarity of word `ngram`-gram shingle sets.

    Exact copies (after normalisation) are folded first, so each distinct text gets one
    MinHash (datasketch, `num_perm` permutations, `seed`). A MinHashLSH index tuned for
    `threshold` for recall (`lsh_params`) proposes candidate pairs; a pair is kept only if its
    estimated Jaccard (`MinHash.jaccard`, computed vectorised) is ≥ `threshold`. Groups are the connected
    components of those pairs (plus the exact copies); the lowest position keeps. LSH can miss
    a few pairs whose Jaccard is close to the threshold, as any LSH does. Empty texts are kept.
    """
    _check(threshold, ngram, num_perm)
    uniq, first_pos, code = _unique_texts(normalise(texts))
    mhs, sig = _signatures(uniq, ngram, num_perm, seed)
    comps = _Components(len(uniq))
    if mhs:
        lsh = _lsh(mhs, threshold, num_perm)
        a, b = [], []
        # Each distinct text in order against the ones before it (pairs are symmetric).
        for i, m in enumerate(mhs):
            cand = np.fromiter((c for c in lsh.query(m) if c < i), dtype=np.int64)
            if len(cand):
                cand = cand[_jaccard(sig, i, cand) >= threshold]
                a.append(np.full(len(cand), i, dtype=np.int64))
                b.append(cand)
        if a:
            comps.add(np.concatenate(a), np.concatenate(b))
    comps._fold()
    # Distinct texts are in order of first row, so a component's lowest text index holds its
    # lowest position; map each row to that text's first row.
    root_u = comps.root
    n = len(code)
    has = code >= 0
    rep = np.full(n, -1, dtype=np.int64)
    rep[has] = first_pos[root_u[code[has]]]
    rep[rep == np.arange(n)] = -1
    sim = np.full(n, np.nan)
    gone = np.flatnonzero(rep >= 0)
    if len(gone):
        u, r = code[gone], root_u[code[gone]]
        sim[gone] = np.mean(sig[u] == sig[r], axis=1)  # 1.0 for exact copies (u == r)
    return _result(rep, sim, "minhash")


def against_minhash(pool: pl.Series, bench: pl.Series, threshold: float = 0.8, ngram: int = 5,
                    num_perm: int = 128, seed: int = 1) -> DedupResult:
    """Pool rows whose estimated Jaccard to some evaluation row is ≥ `threshold` (LSH candidates
    from an index of the evaluation set, filtered by `MinHash.jaccard`); each points at its most
    similar evaluation row."""
    _check(threshold, ngram, num_perm)
    b_uniq, b_first, _ = _unique_texts(normalise(bench))
    p_uniq, _, p_code = _unique_texts(normalise(pool))
    rep = np.full(len(p_code), -1, dtype=np.int64)
    sim = np.full(len(p_code), np.nan)
    if len(b_uniq) == 0 or len(p_uniq) == 0:
        return _result(rep, sim, "minhash", against=True)
    b_mhs, b_sig = _signatures(b_uniq, ngram, num_perm, seed)
    p_mhs, p_sig = _signatures(p_uniq, ngram, num_perm, seed)
    lsh = _lsh(b_mhs, threshold, num_perm)
    u_rep = np.full(len(p_uniq), -1, dtype=np.int64)
    u_sim = np.full(len(p_uniq), np.nan)
    for i, m in enumerate(p_mhs):
        cand = np.sort(np.fromiter(lsh.query(m), dtype=np.int64))
        if len(cand):
            j = np.mean(b_sig[cand] == p_sig[i], axis=1)
            best = int(np.argmax(j))  # first maximum: the earliest evaluation row
            if j[best] >= threshold:
                u_rep[i], u_sim[i] = b_first[cand[best]], j[best]
    has = p_code >= 0
    rep[has], sim[has] = u_rep[p_code[has]], u_sim[p_code[has]]
    return _result(rep, sim, "minhash", against=True)


# --------------------------------------------------------------------------- semantic

def _unit_rows(emb: np.ndarray, name: str) -> np.ndarray:
    """float32 rows scaled to unit length (zero rows stay zero: similar to nothing)."""
    x = np.asarray(emb, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (rows, dim) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def _blocks(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, n, chunk):
        yield lo, min(lo + chunk, n)


def _row_dots(x: np.ndarray, y: np.ndarray, i: np.ndarray, j: np.ndarray, step: int = 65536) -> np.ndarray:
    """x[i]·y[j] for each pair, a slice at a time (no (pairs, dim) copy of everything)."""
    out = np.empty(len(i), dtype=np.float64)
    for lo, hi in _blocks(len(i), step):
        out[lo:hi] = np.einsum("nd,nd->n", x[i[lo:hi]], y[j[lo:hi]], dtype=np.float64)
    return out


def semantic(embeddings: np.ndarray, threshold: float = 0.95, chunk: int = 4096,
             device: str = "cpu") -> DedupResult:
    """Near-duplicates by cosine similarity of embeddings (N, d), L2-normalised here.

    All pairs with cosine ≥ `threshold` are found by `chunk`×`chunk` block products (torch, on
    `device`), only blocks on or above the diagonal and only j > i inside them; groups are the
    connected components of those pairs, the lowest position keeps; `similarity` is the cosine
    of a removed row to its kept row (which, through a chain, can be below the threshold).
    """
    import torch

    _check(threshold, chunk=chunk)
    x = _unit_rows(embeddings, "embeddings")
    n = len(x)
    comps = _Components(n)
    xt = torch.from_numpy(x).to(device)
    with torch.no_grad():
        for i0, i1 in _blocks(n, chunk):
            rows = xt[i0:i1]
            for j0, j1 in _blocks(n, chunk):
                if j1 <= i0:
                    continue  # wholly below the diagonal: seen from the other side
                hit = rows @ xt[j0:j1].T >= threshold
                if j0 == i0:
                    hit = torch.triu(hit, diagonal=1)  # j > i only; skips self-pairs
                a, b = torch.nonzero(hit, as_tuple=True)
                if len(a):
                    comps.add(a.cpu().numpy() + i0, b.cpu().numpy() + j0)
    rep = comps.representatives()
    sim = np.full(n, np.nan)
    gone = np.flatnonzero(rep >= 0)
    sim[gone] = np.clip(_row_dots(x, x, gone, rep[gone]), -1.0, 1.0)  # float32 rounding can pass 1
    return _result(rep, sim, "semantic")


def against_semantic(pool_emb: np.ndarray, bench_emb: np.ndarray, threshold: float = 0.95,
                     chunk: int = 4096, device: str = "cpu") -> DedupResult:
    """Pool rows whose cosine to some evaluation row is ≥ `threshold`, each pointing at its most
    similar evaluation row (best over `chunk`×`chunk` blocks; ties go to the earliest row)."""
    import torch

    _check(threshold, chunk=chunk)
    p = _unit_rows(pool_emb, "pool embeddings")
    b = _unit_rows(bench_emb, "evaluation embeddings")
    if len(b) and p.shape[1] != b.shape[1]:
        raise ValueError(f"pool embeddings have dimension {p.shape[1]}, evaluation ones {b.shape[1]}")
    n = len(p)
    best = torch.full((n,), -float("inf"), dtype=torch.float32)
    arg = torch.full((n,), -1, dtype=torch.int64)
    pt, bt = torch.from_numpy(p).to(device), torch.from_numpy(b).to(device)
    with torch.no_grad():
        for i0, i1 in _blocks(n, chunk):
            rows = pt[i0:i1]
            top = torch.full((i1 - i0,), -float("inf"), device=device)
            at = torch.full((i1 - i0,), -1, dtype=torch.int64, device=device)
            for j0, j1 in _blocks(len(b), chunk):
                val, idx = (rows @ bt[j0:j1].T).max(dim=1)
                better = val > top  # strict: an earlier block wins ties
                top = torch.where(better, val, top)
                at = torch.where(better, idx + j0, at)
            best[i0:i1], arg[i0:i1] = top.cpu(), at.cpu()
    hit = (best >= threshold).numpy()
    rep = np.where(hit, arg.numpy(), -1)
    sim = np.full(n, np.nan)
    gone = np.flatnonzero(hit)
    sim[gone] = np.clip(_row_dots(p, b, gone, rep[gone]), -1.0, 1.0)
    return _result(rep, sim, "semantic", against=True)


# --------------------------------------------------------------------------- report

def summary(result: DedupResult, ids: pl.Series, bench_ids: pl.Series | None = None,
            limit: int | None = 20) -> pl.DataFrame:
    """The removed rows (first `limit` in pipeline order; None for all): `id`, `duplicate_of`
    (the kept row's id, or for decontamination the evaluation row's id), `similarity`, `method`."""
    if len(ids) != len(result):
        raise ValueError(f"summary: {len(ids)} ids for a result of {len(result)} rows")
    if result.against and bench_ids is None:
        raise ValueError("summary of a decontamination result needs bench_ids (the evaluation set's ids)")
    gone = np.flatnonzero(~result.keep)
    if limit is not None:
        gone = gone[:limit]
    target = bench_ids if result.against else ids
    return pl.DataFrame({
        "id": ids.gather(gone),
        "duplicate_of": target.gather(result.representative[gone]),
        "similarity": result.similarity[gone],
        "method": [result.method] * len(gone),
    }, schema_overrides={"method": pl.Utf8, "similarity": pl.Float64})

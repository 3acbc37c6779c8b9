"""Functions for `let`, `where` and `rank by` expressions: Polars expressions in, one out.

Aggregates (`pct`, `zscore`, `minmax`) normalise over the current rows, so they are global:
a filter may never move across them.
"""

from __future__ import annotations

import polars as pl

from tamis.errors import TamisError
from tamis.ops.kernel import kernel


@kernel("function", "pct", mode="global")
def pct(x: pl.Expr) -> pl.Expr:
    # percentile rank in [0, 1]: ties share their average rank; nulls stay null
    return ((x.rank("average") - 1) / (x.count() - 1).clip(lower_bound=1)).cast(pl.Float64)


@kernel("function", "zscore", mode="global")
def zscore(x: pl.Expr) -> pl.Expr:
    return (x - x.mean()) / x.std()


@kernel("function", "minmax", mode="global")
def minmax(x: pl.Expr) -> pl.Expr:
    return (x - x.min()) / (x.max() - x.min())


@kernel("function", "log")
def log(x: pl.Expr) -> pl.Expr:
    return x.log()


@kernel("function", "exp")
def exp(x: pl.Expr) -> pl.Expr:
    return x.exp()


@kernel("function", "abs")
def abs_(x: pl.Expr) -> pl.Expr:
    return x.abs()


@kernel("function", "min")
def min_(a: pl.Expr, b: pl.Expr) -> pl.Expr:
    return pl.min_horizontal(a, b)


@kernel("function", "max")
def max_(a: pl.Expr, b: pl.Expr) -> pl.Expr:
    return pl.max_horizontal(a, b)


@kernel("function", "coalesce")
def coalesce(a: pl.Expr, b: pl.Expr) -> pl.Expr:
    return pl.coalesce(a, b)


@kernel("function", "is_null")
def is_null(x: pl.Expr) -> pl.Expr:
    return x.is_null()


@kernel("function", "count")
def count(tags: pl.Expr) -> pl.Expr:
    return tags.list.len().cast(pl.Float64)


@kernel("function", "win_rate")
def win_rate(one_shot: pl.Expr, zero_shot: pl.Expr) -> pl.Expr:
    """Nuggets' golden score: the share of anchors whose loss the row, as a one-shot prompt,
    lowers below the zero-shot loss (instruction_main.py: log p(one-shot) > log p(zero-shot),
    over all anchors; an anchor with nothing scored never counts as a win)."""
    import numpy as np

    def rate(cols: list[pl.Series]) -> pl.Series:
        vectors, zero = cols
        # the zero-shot losses: one per anchor (a foreign column, as one list); null where unscored
        z = zero.explode().cast(pl.Float64).fill_null(float("nan")).to_numpy()

        def wins(m):
            if m.shape[1] != z.shape[0]:
                raise TamisError(f"win_rate: {m.shape[1]} one-shot losses per row but {z.shape[0]} zero-shot "
                                 "losses: both must be over the same anchors")
            with np.errstate(invalid="ignore"):
                return (m < z).sum(axis=1) / z.shape[0]  # NaN compares false: no win

        return _per_vector(vectors.cast(pl.List(pl.Float64)), wins, "win_rate")

    return pl.map_batches([one_shot, zero_shot], rate, return_dtype=pl.Float64)


@kernel("function", "influence")
def influence(train: pl.Expr, target: pl.Expr, subtask: pl.Expr | None = None) -> pl.Expr:
    """LESS: the mean over the target rows of Σ_c w_c ⟨train_c, target_c⟩. The `grads` vectors hold
    each checkpoint's L2-normalised features scaled by √w_c, so this is the mean dot product — and,
    being linear, the dot product with the target rows' mean vector (matching.py computes the whole
    train × target matrix, then its mean over a subtask's columns: the same number). With `subtask`
    (a field of the target set, one label per target row: any number of subtasks, any sizes), the mean
    over each subtask's rows, then the max over subtasks, as matching.py. Target rows without features
    are left out of their subtask."""
    import numpy as np

    def dot_mean(cols: list[pl.Series]) -> pl.Series:
        vectors, targets = cols[0], cols[1]
        t = targets[0]  # the target set's vectors (a foreign column, as one list)
        labels = cols[2][0] if len(cols) > 2 else pl.Series([0] * len(t))
        if len(labels) != len(t):
            raise TamisError(f"influence: {len(labels)} subtask labels for {len(t)} target rows")
        scored = t.is_not_null()
        t, labels = t.filter(scored), labels.filter(scored)
        if len(t) == 0:
            raise TamisError("influence: the target set has no gradient features (every target row was skipped)")
        m = _matrix(t, "influence").astype(np.float64)
        codes = labels.cast(pl.String).fill_null("")  # a row without a label: a subtask of its own
        groups = codes.unique(maintain_order=True).to_list()
        centres = np.stack([m[(codes == g).to_numpy()].mean(axis=0) for g in groups])  # [subtasks, dim]

        def dots(x):
            if x.shape[1] != centres.shape[1]:
                raise TamisError(f"influence: training vectors have {x.shape[1]} values, target vectors "
                                 f"{centres.shape[1]}: score both with the same model, dim and checkpoints")
            return (x.astype(np.float64) @ centres.T).max(axis=1)

        return _per_vector(vectors, dots, "influence")

    inputs = [train, target] + ([subtask] if subtask is not None else [])
    return pl.map_batches(inputs, dot_mean, return_dtype=pl.Float64)


def _per_vector(vectors: pl.Series, fn, what: str) -> pl.Series:
    """`fn(matrix of the non-null rows)` (one value per row) as a Float64 column; null rows and
    NaN results stay null."""
    import numpy as np

    out = np.full(len(vectors), np.nan)
    valid = vectors.is_not_null().to_numpy()
    if valid.any():
        out[valid] = fn(_matrix(vectors.filter(vectors.is_not_null()), what))
    return pl.Series(out).fill_nan(None)


def _matrix(vectors: pl.Series, what: str):
    """Rows of a vector column (fixed-size or list) as one 2-D numpy array, without Python lists."""
    if isinstance(vectors.dtype, pl.List):
        width = vectors.list.len()
        if width.n_unique() != 1:
            raise TamisError(f"{what}: vectors of different lengths in one column")
        vectors = vectors.list.to_array(int(width[0]))
    return vectors.to_numpy()

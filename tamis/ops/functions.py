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
        out = np.full(len(vectors), np.nan)
        valid = vectors.is_not_null().to_numpy()
        if valid.any():
            kept = vectors.filter(vectors.is_not_null())
            widths = kept.list.len().unique()
            if widths.len() != 1 or widths[0] != z.shape[0]:
                raise TamisError(f"win_rate: {sorted(widths.to_list())} one-shot losses per row but "
                                 f"{z.shape[0]} zero-shot losses: both must be over the same anchors")
            m = kept.cast(pl.List(pl.Float64)).list.to_array(z.shape[0]).to_numpy()
            with np.errstate(invalid="ignore"):
                out[valid] = (m < z).sum(axis=1) / z.shape[0]  # NaN compares false: no win
        return pl.Series(out).fill_nan(None)

    return pl.map_batches([one_shot, zero_shot], rate, return_dtype=pl.Float64)

"""Functions for `let`, `where` and `rank by` expressions: Polars expressions in, one out.

Aggregates (`pct`, `zscore`, `minmax`) normalise over the current rows, so they are global:
a filter may never move across them.
"""

from __future__ import annotations

import polars as pl

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

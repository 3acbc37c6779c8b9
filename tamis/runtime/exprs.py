"""Recipe expressions (typed AST, already checked) → Polars expressions."""

from __future__ import annotations

import polars as pl

from tamis.dsl import ast
from tamis.errors import TamisError

_BIN = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
_CMP = {"<": "lt", "<=": "le", ">": "gt", ">=": "ge", "==": "eq", "!=": "ne"}


def _pct(x: pl.Expr) -> pl.Expr:
    # percentile rank in [0, 1]: ties share their average rank; nulls stay null
    return ((x.rank("average") - 1) / (x.count() - 1).clip(lower_bound=1)).cast(pl.Float64)


_FUNCS = {
    "pct": lambda a: _pct(a[0]),
    "zscore": lambda a: (a[0] - a[0].mean()) / a[0].std(),
    "minmax": lambda a: (a[0] - a[0].min()) / (a[0].max() - a[0].min()),
    "log": lambda a: a[0].log(),
    "exp": lambda a: a[0].exp(),
    "abs": lambda a: a[0].abs(),
    "min": lambda a: pl.min_horizontal(a[0], a[1]),
    "max": lambda a: pl.max_horizontal(a[0], a[1]),
    "coalesce": lambda a: pl.coalesce(a[0], a[1]),
    "is_null": lambda a: a[0].is_null(),
    "count": lambda a: a[0].list.len().cast(pl.Float64),
}


def to_polars(e: ast.Expr) -> pl.Expr:
    if isinstance(e, ast.Number):
        return pl.lit(e.value, dtype=pl.Float64)
    if isinstance(e, ast.Bool):
        return pl.lit(e.value)
    if isinstance(e, ast.String):
        return pl.lit(e.value)
    if isinstance(e, ast.Name):
        return pl.col(e.id)
    if isinstance(e, ast.BinOp):
        return _BIN[e.op](to_polars(e.left), to_polars(e.right))
    if isinstance(e, ast.Compare):
        return getattr(to_polars(e.left), _CMP[e.op])(to_polars(e.right))
    if isinstance(e, ast.BoolOp):
        left, right = to_polars(e.left), to_polars(e.right)
        return left & right if e.op == "and" else left | right
    if isinstance(e, ast.Not):
        return ~to_polars(e.operand)
    if isinstance(e, ast.Neg):
        return -to_polars(e.operand)
    if isinstance(e, ast.Call):
        fn = _FUNCS.get(e.func)
        if fn is None:
            raise TamisError(f"function {e.func}(...) has no local runtime implementation yet")
        return fn([to_polars(a) for a in e.args])
    raise TamisError(f"cannot evaluate {e.unparse()}")

"""Recipe expressions (typed AST, already checked) → Polars expressions."""

from __future__ import annotations

from typing import Mapping

import polars as pl

from tamis.dsl import ast
from tamis.errors import TamisError
from tamis.ops.kernel import kernel_for

_BIN = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
_CMP = {"<": "lt", "<=": "le", ">": "gt", ">=": "ge", "==": "eq", "!=": "ne"}


def calls_in(e: ast.Expr | None) -> list[str]:
    """The names of the functions an expression calls (to check each has a kernel before running)."""
    if e is None:
        return []
    out: list[str] = []
    stack = [e]
    while stack:  # iterative: a deeply nested expression must not hit Python's recursion limit
        x = stack.pop()
        if isinstance(x, ast.Call):
            out.append(x.func)
            stack.extend(x.args)
        for child in ("left", "right", "operand"):
            if isinstance(getattr(x, child, None), ast.Expr):
                stack.append(getattr(x, child))
    return out


def to_polars(e: ast.Expr, foreign: Mapping[str, pl.Series] | None = None) -> pl.Expr:
    """A checked expression as a Polars expression. `foreign`: scores of another dataset
    (`score … on DATA as NAME`) by column name; a function taking one (`win_rate`,
    `influence`) gets all its values as one list."""
    foreign = foreign or {}

    def conv(x: ast.Expr) -> pl.Expr:
        if isinstance(x, ast.Number):
            return pl.lit(x.value, dtype=pl.Float64)
        if isinstance(x, (ast.Bool, ast.String)):
            return pl.lit(x.value)
        if isinstance(x, ast.Name):
            if x.id in foreign:
                values = foreign[x.id]
                return pl.lit(pl.Series(x.id, [values], dtype=pl.List(values.dtype)))
            return pl.col(x.id)
        if isinstance(x, ast.BinOp):
            return _BIN[x.op](conv(x.left), conv(x.right))
        if isinstance(x, ast.Compare):
            return getattr(conv(x.left), _CMP[x.op])(conv(x.right))
        if isinstance(x, ast.BoolOp):
            left, right = conv(x.left), conv(x.right)
            return left & right if x.op == "and" else left | right
        if isinstance(x, ast.Not):
            return ~conv(x.operand)
        if isinstance(x, ast.Neg):
            return -conv(x.operand)
        if isinstance(x, ast.Call):
            k = kernel_for("function", x.func)
            if k is None:
                raise TamisError(f"function {x.func}(...) has no local runtime implementation yet")
            out = k.fn(*[conv(a) for a in x.args])
            return out.over(x.per) if x.per else out  # `pct(ifd) per language`: within each group
        raise TamisError(f"cannot evaluate {x.unparse()}")

    return conv(e)

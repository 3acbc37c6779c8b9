"""Recipe expressions (typed AST, already checked) → Polars expressions."""

from __future__ import annotations

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
        k = kernel_for("function", e.func)
        if k is None:
            raise TamisError(f"function {e.func}(...) has no local runtime implementation yet")
        return k.fn(*[to_polars(a) for a in e.args])
    raise TamisError(f"cannot evaluate {e.unparse()}")

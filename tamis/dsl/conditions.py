"""Conditions that can never be true (`where ifd < 1 and ifd > 2`): a warning, not an error.

A small interval analysis over a `where`'s conjunction: each comparison of a column (or of a
normalising function such as `pct`, whose values lie in [0, 1]) with a constant narrows that
column's interval; equalities with strings narrow its set of possible values. An empty interval,
two different required strings, or a constant condition that is false means no row can pass.
Anything it cannot read (or-ed conditions, arithmetic over columns) it leaves alone: it warns only
when sure.
"""

from __future__ import annotations

import math

from tamis.dsl import ast

_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
_BOUNDED = {"pct": (0.0, 1.0), "minmax": (0.0, 1.0)}  # functions whose values lie in a known range


def _conjuncts(e: ast.Expr) -> list[ast.Expr]:
    if isinstance(e, ast.BoolOp) and e.op == "and":
        return _conjuncts(e.left) + _conjuncts(e.right)
    return [e]


def _constant(e: ast.Expr):
    """The value of an expression without columns or calls, or None."""
    if isinstance(e, (ast.Number, ast.Bool, ast.String)):
        return e.value
    if isinstance(e, ast.Neg):
        v = _constant(e.operand)
        return -v if isinstance(v, float) else None
    if isinstance(e, ast.BinOp):
        a, b = _constant(e.left), _constant(e.right)
        if not isinstance(a, float) or not isinstance(b, float) or (e.op == "/" and b == 0):
            return None
        return {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[e.op]
    if isinstance(e, ast.Compare):
        a, b = _constant(e.left), _constant(e.right)
        if a is None or b is None or type(a) is not type(b):
            return None
        return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b, "!=": a != b}[e.op]
    if isinstance(e, ast.Not):
        v = _constant(e.operand)
        return (not v) if isinstance(v, bool) else None
    return None


def _subject(e: ast.Expr) -> str | None:
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.Call) and e.func in _BOUNDED and not e.kwargs:
        return e.unparse()
    return None


def never_passes(cond: ast.Expr) -> str | None:
    """Why no row can satisfy `cond`, or None when some row may."""
    whole = _constant(cond)
    if whole is False:
        return f"`{cond.unparse()}` is always false"
    lo: dict[str, tuple[float, bool]] = {}  # subject -> (bound, inclusive)
    hi: dict[str, tuple[float, bool]] = {}
    equal: dict[str, str] = {}
    for c in _conjuncts(cond):
        if _constant(c) is False:
            return f"`{c.unparse()}` is always false"
        if not isinstance(c, ast.Compare):
            continue
        op, subject, value = c.op, _subject(c.left), _constant(c.right)
        if subject is None:
            op, subject, value = _FLIP[c.op], _subject(c.right), _constant(c.left)
        if subject is None or value is None:
            continue
        if isinstance(value, str):
            if op == "==":
                if subject in equal and equal[subject] != value:
                    return f"{subject} cannot equal both {equal[subject]!r} and {value!r}"
                equal[subject] = value
            continue
        if not isinstance(value, float) or math.isnan(value):
            continue
        for bound in ((lo, hi) if op == "==" else (lo,) if op in (">", ">=") else (hi,) if op in ("<", "<=") else ()):
            inclusive = op in ("==", ">=", "<=")
            old = bound.get(subject)
            tighter = old is None or (value > old[0] if bound is lo else value < old[0]) or (value == old[0] and not inclusive)
            if tighter:
                bound[subject] = (value, inclusive)
    for subject in set(lo) | set(hi):
        func = subject.split("(", 1)[0] if "(" in subject else None
        rng = _BOUNDED.get(func or "", (-math.inf, math.inf))
        low = max(lo.get(subject, (rng[0], True)), (rng[0], True), key=lambda b: (b[0], not b[1]))
        high = min(hi.get(subject, (rng[1], True)), (rng[1], True), key=lambda b: (b[0], b[1]))
        if low[0] > high[0] or (low[0] == high[0] and not (low[1] and high[1])):
            return f"no value of {subject} satisfies every comparison"
    return None

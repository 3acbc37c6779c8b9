"""Typed recipe AST. Every node declares its fields and carries the span it came from."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tamis.errors import Span


class Node(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    span: Span = Field(default_factory=Span, repr=False, exclude=True)


# ---- expressions -----------------------------------------------------------


class Expr(Node):
    def unparse(self) -> str:  # pragma: no cover - every subclass overrides
        raise NotImplementedError


class Number(Expr):
    value: float
    is_int: bool = False

    def unparse(self) -> str:
        return str(int(self.value)) if self.is_int else repr(self.value)


class Percent(Expr):
    value: float  # 5% is 5.0

    def unparse(self) -> str:
        v = self.value
        return f"{int(v) if v == int(v) else v}%"


class String(Expr):
    value: str

    def unparse(self) -> str:
        return '"' + self.value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Bool(Expr):
    value: bool

    def unparse(self) -> str:
        return "true" if self.value else "false"


class Name(Expr):
    id: str

    def unparse(self) -> str:
        return self.id


class Kwarg(Node):
    name: str
    value: Expr

    def unparse(self) -> str:
        return f"{self.name}={self.value.unparse()}"


class Call(Expr):
    func: str
    args: tuple[Expr, ...] = ()
    kwargs: tuple[Kwarg, ...] = ()
    per: str | None = None  # `pct(ifd) per language`: an aggregate computed within each group
    func_span: Span = Field(default_factory=Span, repr=False, exclude=True)

    def unparse(self) -> str:
        parts = [a.unparse() for a in self.args] + [k.unparse() for k in self.kwargs]
        return f"{self.func}({', '.join(parts)})" + (f" per {self.per}" if self.per else "")


class DictExpr(Expr):
    """`{"sharegpt": 0.7, "dolly": 0.3}`: string keys (group values) to values."""

    keys: tuple[str, ...] = ()
    values: tuple[Expr, ...] = ()

    def unparse(self) -> str:
        return "{" + ", ".join(f"{String(value=k).unparse()}: {v.unparse()}" for k, v in zip(self.keys, self.values)) + "}"


class ListExpr(Expr):
    items: tuple[Expr, ...] = ()

    def unparse(self) -> str:
        return "[" + ", ".join(i.unparse() for i in self.items) + "]"


class _Infix(Expr):
    """A parenthesised binary operation: arithmetic or boolean."""

    op: str
    left: Expr
    right: Expr

    def unparse(self) -> str:
        return f"({self.left.unparse()} {self.op} {self.right.unparse()})"


class BinOp(_Infix):
    op: Literal["+", "-", "*", "/"]


class Compare(Expr):
    op: Literal["<", "<=", ">", ">=", "==", "!="]
    left: Expr
    right: Expr

    def unparse(self) -> str:
        return f"{self.left.unparse()} {self.op} {self.right.unparse()}"


class BoolOp(_Infix):
    op: Literal["and", "or"]


class Not(Expr):
    operand: Expr

    def unparse(self) -> str:
        return f"not {self.operand.unparse()}"


class Neg(Expr):
    operand: Expr

    def unparse(self) -> str:
        return f"-{self.operand.unparse()}"


# ---- stages ----------------------------------------------------------------


class Stage(Node):
    pass


class ScoreItem(Node):
    scorer: str
    scorer_span: Span = Field(default_factory=Span, repr=False, exclude=True)
    args: tuple[Expr, ...] = ()
    kwargs: tuple[Kwarg, ...] = ()
    using: Expr | None = None
    on: Expr | None = None
    alias: str | None = None

    @property
    def column(self) -> str:
        return self.alias or self.scorer


class Score(Stage):
    items: tuple[ScoreItem, ...]


class Let(Stage):
    name: str
    expr: Expr


class Where(Stage):
    cond: Expr


class Rank(Stage):
    by: Expr | None = None
    order: Literal["asc", "desc"] | None = None
    per: str | None = None  # rank within each group, groups interleaved (best of each first)


class Top(Stage):
    amount: Expr
    per: str | None = None  # the amount from each group (a percentage: of each group's size)
    kwargs: tuple[Kwarg, ...] = ()  # weights={...}: the amount split over the groups (a mixture)


class Sample(Stage):
    amount: Expr
    per: str | None = None
    kwargs: tuple[Kwarg, ...] = ()


class Dedup(Stage):
    """`dedup exact | minhash(…) | semantic(…) using M [against DATA]`: keep the best-ranked
    row of each duplicate group, or drop rows near-duplicate to another dataset."""

    method: str
    method_span: Span = Field(default_factory=Span, repr=False, exclude=True)
    args: tuple[Expr, ...] = ()
    kwargs: tuple[Kwarg, ...] = ()
    using: Expr | None = None
    against: Expr | None = None


class Diverse(Stage):
    method: str
    method_span: Span = Field(default_factory=Span, repr=False, exclude=True)
    args: tuple[Expr, ...] = ()
    kwargs: tuple[Kwarg, ...] = ()
    using: Expr | None = None


class Normalize(Stage):
    column: str
    kwargs: tuple[Kwarg, ...] = ()


class Use(Stage):
    recipe: str
    is_path: bool = False
    args: tuple[Expr, ...] = ()  # `use ifd(5%)`
    kwargs: tuple[Kwarg, ...] = ()  # `use ifd(size=5%)`: the spliced recipe's parameters
    alias: str | None = None  # `use ifd as cherry`: its columns become cherry.ifd, …


class Combine(Stage):
    op: Literal["intersect", "union"]
    selection: str


# ---- declarations and the recipe ---------------------------------------------


class ModelDecl(Node):
    name: str
    expr: Expr


class DataDecl(Node):
    name: str
    expr: Expr


class SelectDecl(Node):
    name: str
    pipeline: tuple[Stage, ...]


class Recipe(Node):
    name: str | None = None
    params: tuple[Kwarg, ...] = ()  # `recipe ifd(size = 10%)`: parameters and their defaults
    title: str | None = None
    cites: tuple[str, ...] = ()
    code: tuple[str, ...] = ()
    decls: tuple[ModelDecl | DataDecl | SelectDecl, ...] = ()  # in source order
    pipeline: tuple[Stage, ...] = ()
    path: str | None = None
    source: str = Field(default="", repr=False)

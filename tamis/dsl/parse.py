"""Text → AST: the lark LALR parser (strict, with positions) and an explicit Transformer."""

from __future__ import annotations

import ast as pyast
import math
import warnings
from functools import lru_cache
from importlib import resources
from pathlib import Path

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from tamis.dsl import ast
from tamis.errors import ParamSpan, RecipeError, Span


@lru_cache(maxsize=1)
def parser() -> Lark:
    grammar = resources.files("tamis.grammar").joinpath("recipe.lark").read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", strict=True, propagate_positions=True, maybe_placeholders=True)


def span_of(meta_or_token) -> Span:
    m = meta_or_token
    if getattr(m, "empty", False):
        return Span()
    return Span(m.line, m.column, m.end_line, m.end_column, m.start_pos, m.end_pos)


def _str(tok: Token) -> str:
    # Recipe strings use Python's escapes; literal_eval is exact and safe on a STRING token.
    # A bad escape ("\x", "\u12", "\N{nope}") or a lone surrogate is the recipe's error, located.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "\q" is kept as backslash-q, as in Python
            value = pyast.literal_eval(tok)
    except (SyntaxError, ValueError) as err:
        why = getattr(err, "msg", None) or str(err)
        raise RecipeError(f"bad escape in string: {why.split(': ', 1)[-1]}", span_of(tok),
                          hint='write a backslash as "\\\\"; escapes: \\n \\t \\" \\xHH \\uHHHH') from None
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):
        raise RecipeError("string holds a lone surrogate escape (not a character)", span_of(tok))
    return value


MAX_NESTING = 100  # expressions nested deeper than this are refused (Python's stack would not hold them)


def _check_depth(tree: Tree) -> None:
    """Refuse a parse tree nested deeper than MAX_NESTING, at its deepest node, before any
    recursive pass (the transformer, the checker) meets it."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING * 2:  # a call or a unary operator is up to two tree levels
            raise RecipeError(f"expression nested too deeply (more than {MAX_NESTING} levels)", span_of(node.meta),
                              hint="split it with `let` stages")
        stack.extend((c, depth + 1) for c in node.children if isinstance(c, Tree))


@v_args(meta=True)
class ToAst(Transformer):
    """Parse tree → typed AST. Any rule not handled here is a bug, so `__default__` raises."""

    def __default__(self, data, children, meta):
        raise NotImplementedError(f"no AST mapping for grammar rule {data!r}")

    # ---- expressions ---------------------------------------------------
    def number(self, meta, c):
        text = str(c[0]).replace("_", "")
        is_int = text.isdigit()
        if is_int and int(text) > 2**53:  # a float cannot hold it exactly: refuse rather than round
            raise RecipeError(f"whole number {text} is too large (over 2^53 = 9007199254740992)", span_of(meta))
        value = float(text)
        if not math.isfinite(value):
            raise RecipeError(f"number {text} is too large", span_of(meta))
        return ast.Number(value=value, is_int=is_int, span=span_of(meta))

    def percent(self, meta, c):
        return ast.Percent(value=float(str(c[0])[:-1]), span=span_of(meta))

    def string(self, meta, c):
        return ast.String(value=_str(c[0]), span=span_of(meta))

    def boolean(self, meta, c):
        return ast.Bool(value=str(c[0]) == "true", span=span_of(meta))

    def name(self, meta, c):
        return ast.Name(id=str(c[0]), span=span_of(meta))

    def call(self, meta, c):
        func, arglist, per = c
        args, kwargs = arglist if arglist is not None else ((), ())
        return ast.Call(func=str(func), args=args, kwargs=kwargs, per=per, span=span_of(meta), func_span=span_of(func))

    def dict(self, meta, c):
        keys, values = [], []
        for item in c:
            if item is None:
                continue
            key, value = item
            if key in keys:
                raise RecipeError(f"key {key!r} given twice", value.span)
            keys.append(key)
            values.append(value)
        return ast.DictExpr(keys=tuple(keys), values=tuple(values), span=span_of(meta))

    def pair(self, meta, c):
        return (_str(c[0]), c[1])

    def per(self, meta, c):
        return str(c[0])

    def against(self, meta, c):
        return ("against", c[0])

    def params(self, meta, c):
        return tuple(x for x in c if x is not None)

    def list(self, meta, c):
        return ast.ListExpr(items=tuple(x for x in c if x is not None), span=span_of(meta))

    def arglist(self, meta, c):
        args, kwargs = [], []
        for item in c:
            if isinstance(item, ast.Kwarg):
                kwargs.append(item)
            elif kwargs:
                raise RecipeError("a positional argument cannot follow a keyword argument", item.span)
            else:
                args.append(item)
        return tuple(args), tuple(kwargs)

    def kwarg(self, meta, c):
        return ast.Kwarg(name=str(c[0]), value=c[1], span=span_of(meta))

    def binop(self, meta, c):
        return ast.BinOp(op=str(c[1]), left=c[0], right=c[2], span=span_of(meta))

    def compare(self, meta, c):
        return ast.Compare(op=str(c[1]), left=c[0], right=c[2], span=span_of(meta))

    def and_op(self, meta, c):
        return ast.BoolOp(op="and", left=c[0], right=c[1], span=span_of(meta))

    def or_op(self, meta, c):
        return ast.BoolOp(op="or", left=c[0], right=c[1], span=span_of(meta))

    def not_op(self, meta, c):
        return ast.Not(operand=c[0], span=span_of(meta))

    def neg(self, meta, c):
        return ast.Neg(operand=c[0], span=span_of(meta))

    # ---- stage pieces --------------------------------------------------
    def call_args(self, meta, c):
        return c[0] if c[0] is not None else ((), ())

    def using(self, meta, c):
        return ("using", c[0])

    def on(self, meta, c):
        return ("on", c[0])

    def with_clause(self, meta, c):
        return ("with", (c[0],))

    def with_args(self, meta, c):
        return tuple(c)

    def alias(self, meta, c):
        return ("as", str(c[0]))

    def score_item(self, meta, c):
        name, call_args, using, on, with_clause, alias = c
        args, kwargs = call_args if call_args is not None else ((), ())
        return ast.ScoreItem(
            scorer=str(name),
            scorer_span=span_of(name),
            args=args,
            kwargs=kwargs + (with_clause[1] if with_clause else ()),
            using=using[1] if using else None,
            on=on[1] if on else None,
            alias=alias[1] if alias else None,
            span=span_of(meta),
        )

    def score_kwarg(self, meta, c):
        return (c[0], c[1])

    def score_stage(self, meta, c):
        items: list[ast.ScoreItem] = []
        for child in c:
            if isinstance(child, tuple):
                # a keyword argument continues the `with` list of the item before it
                kw, alias = child
                last = items[-1]
                if not last.kwargs:
                    raise RecipeError(
                        f"keyword argument {kw.name!r} needs a `with` before it",
                        kw.span,
                        hint=f"write `score {last.scorer} with {kw.name}=…`",
                    )
                if alias and last.alias:
                    raise RecipeError(f"score {last.scorer} is named twice (`as {last.alias}`, `as {alias[1]}`)", kw.span)
                update = {"kwargs": last.kwargs + (kw,)}
                if alias:
                    update["alias"] = alias[1]
                items[-1] = last.model_copy(update=update)
            else:
                items.append(child)
        return ast.Score(items=tuple(items), span=span_of(meta))

    # ---- stages ----------------------------------------------------------
    def let_stage(self, meta, c):
        return ast.Let(name=str(c[0]), expr=c[1], span=span_of(meta))

    def where_stage(self, meta, c):
        return ast.Where(cond=c[0], span=span_of(meta))

    def rank_stage(self, meta, c):
        by, order, per = c
        return ast.Rank(by=by, order=str(order) if order is not None else None, per=per, span=span_of(meta))

    def top_stage(self, meta, c):
        return ast.Top(amount=c[0], per=c[1], kwargs=c[2] or (), span=span_of(meta))

    def sample_stage(self, meta, c):
        return ast.Sample(amount=c[0], per=c[1], kwargs=c[2] or (), span=span_of(meta))

    def dedup_stage(self, meta, c):
        name, call_args, using, against = c
        args, kwargs = call_args if call_args is not None else ((), ())
        return ast.Dedup(method=str(name), method_span=span_of(name), args=args, kwargs=kwargs,
                         using=using[1] if using else None, against=against[1] if against else None,
                         span=span_of(meta))

    def diverse_stage(self, meta, c):
        name, arglist, using = c
        args, kwargs = arglist if arglist is not None else ((), ())
        return ast.Diverse(
            method=str(name), method_span=span_of(name), args=args, kwargs=kwargs,
            using=using[1] if using else None, span=span_of(meta),
        )

    def normalize_stage(self, meta, c):
        return ast.Normalize(column=str(c[0]), kwargs=c[1] or (), span=span_of(meta))

    def use_stage(self, meta, c):
        tok, call_args, alias = c
        args, kwargs = call_args if call_args is not None else ((), ())
        common = {"args": args, "kwargs": kwargs, "alias": alias[1] if alias else None, "span": span_of(meta)}
        if tok.type == "STRING":
            return ast.Use(recipe=_str(tok), is_path=True, **common)
        return ast.Use(recipe=str(tok), **common)

    def combine_stage(self, meta, c):
        return ast.Combine(op=str(c[0]), selection=str(c[1]), span=span_of(meta))

    def pipeline(self, meta, c):
        return tuple(c)

    # ---- header and declarations -------------------------------------------
    def recipe_header(self, meta, c):
        return ("recipe", str(c[0]), _str(c[2]) if c[2] is not None else None, span_of(meta), c[1] or ())

    def cite(self, meta, c):
        return ("cite", _str(c[0]))

    def code(self, meta, c):
        return ("code", _str(c[0]))

    def model_decl(self, meta, c):
        return ast.ModelDecl(name=str(c[0]), expr=c[1], span=span_of(meta))

    def data_decl(self, meta, c):
        return ast.DataDecl(name=str(c[0]), expr=c[1], span=span_of(meta))

    def select_decl(self, meta, c):
        return ast.SelectDecl(name=str(c[0]), pipeline=c[1], span=span_of(meta))

    def start(self, meta, c):
        fields: dict = {"cites": [], "code": [], "decls": []}
        for item in c:
            if isinstance(item, tuple) and item and item[0] == "recipe":
                if "name" in fields:
                    raise RecipeError("a recipe has one `recipe` header", item[3])
                fields["name"], fields["title"], fields["params"] = item[1], item[2], item[4]
            elif isinstance(item, tuple) and item and item[0] == "cite":
                fields["cites"].append(item[1])
            elif isinstance(item, tuple) and item and item[0] == "code":
                fields["code"].append(item[1])
            elif isinstance(item, (ast.ModelDecl, ast.DataDecl, ast.SelectDecl)):
                fields["decls"].append(item)
            else:
                fields["pipeline"] = item
        return ast.Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


# ---- friendly syntax errors ----------------------------------------------------
# lark's match_examples maps a failing parse to the closest known mistake.
_EXAMPLES: dict[str, list[str]] = {
    "a stage must follow `|`": ["score ifd |", "score ifd | | top 10%"],
    "stages are separated by `|`": ["score ifd rank", "score ifd using pfm top 10%", "score ifd where ifd < 1"],
    "`top` takes a count or a percentage, e.g. `top 10%` or `top 1000`": ["score ifd | rank | top", "score ifd | top |"],
    "`rank by` needs an expression, e.g. `rank by ifd desc`": ["score ifd | rank by", "score ifd | rank by |"],
    "`score` needs a scorer name, e.g. `score ifd using pfm`": ["score", "score |", "score using pfm"],
    "`using` needs a model, e.g. `using pfm` or `using hf(\"gpt2\")`": ["score ifd using", "score ifd using |"],
    "a declaration needs `=` and a value, e.g. `model pre = warmup(pfm, 5%)`": ["model pre warmup(pfm, 5%)", "model pre =", "data d ="],
    "a recipe needs a pipeline after its declarations": ["model pre = pfm", 'recipe x "t"'],
    "unclosed parenthesis": ["score ifd using warmup(pfm, 5%", "score ifd using hf(\"x\""],
    "missing operand": ["score ifd | where ifd <", "score ifd | where ifd < 1 and", "score ifd | let x = 1 +"],
}


def _syntax_hint(err: UnexpectedInput, text: str) -> str | None:
    try:
        return err.match_examples(parser().parse, _EXAMPLES, use_accepts=True)
    except Exception:  # match_examples re-parses examples; never let it mask the real error
        return None


def _describe_expected(expected: set[str]) -> str:
    shown = []
    for name in sorted(expected):
        if name == "$END":
            shown.append("the end of the recipe")
            continue
        try:
            pattern = parser().get_terminal(name).pattern
        except KeyError:
            shown.append(name.lower())
            continue
        is_literal = type(pattern).__name__ == "PatternStr"
        shown.append(f"`{pattern.value}`" if is_literal else name.lower())
    return ", ".join(shown[:10]) + (" …" if len(shown) > 10 else "")


def read_recipe_text(path: Path) -> str:
    """A recipe file's text; bytes that are not UTF-8 are a located error, not a traceback."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        before = data[:err.start]
        line = before.count(b"\n") + 1
        column = len(before[before.rfind(b"\n") + 1:].decode("utf-8", errors="replace")) + 1
        raise RecipeError(f"not UTF-8 text: byte 0x{data[err.start]:02x} at byte {err.start}",
                          Span(line, column, line, column + 1), path=str(path),
                          hint="save the recipe as UTF-8") from None


def parse(text: str, path: str | None = None) -> ast.Recipe:
    """Parse recipe text into an AST; every failure is a RecipeError with a caret-ready span."""
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark, as editors on Windows write
    try:
        tree = parser().parse(text)
    except UnexpectedInput as err:
        raise _syntax_error(err, text, path) from None
    try:
        _check_depth(tree)
        recipe = ToAst().transform(tree)
    except RecipeError as err:
        raise err.with_source(text, path) from None
    except VisitError as err:
        if isinstance(err.orig_exc, RecipeError):
            raise err.orig_exc.with_source(text, path) from None
        raise
    return recipe.model_copy(update={"path": path, "source": text})


def parse_params(pairs: dict[str, str]) -> tuple[ast.Kwarg, ...]:
    """`--param size=5%` values (recipe expressions as text) as keyword arguments for a recipe's
    parameters, each parsed as it would be written in `use RECIPE(size=5%)`."""
    out = []
    for name, text in pairs.items():
        try:
            use = parse(f"use _({name}={text})").pipeline[0]
        except RecipeError as err:
            raise RecipeError(f"--param {name}={text}: not a recipe value ({err.message})",
                              hint='write a value as in a recipe: 5%, 1000, "text", true, hf("gpt2")') from None
        if not isinstance(use, ast.Use) or len(use.kwargs) != 1 or use.args:
            raise RecipeError(f"--param {name}={text}: not one value")
        out.append(_on_command_line(use.kwargs[0], f"--param {name}={text}"))
    return tuple(out)


def _on_command_line(node, text: str):
    """`node` (parsed from "use _(NAME=VALUE)") with every span moved onto `text` ("--param NAME=VALUE",
    two characters longer before the name), so errors point at what the user typed."""
    if isinstance(node, tuple):
        return tuple(_on_command_line(x, text) for x in node)
    if not isinstance(node, ast.Node):
        return node
    s = node.span
    update = {"span": ParamSpan(s.line, s.column + 2, s.end_line, s.end_column + 2, s.start + 2, s.end + 2, text)}
    for field in type(node).model_fields:
        value = getattr(node, field)
        if field != "span" and isinstance(value, (ast.Node, tuple)):
            update[field] = _on_command_line(value, text)
    return node.model_copy(update=update)


def _syntax_error(err: UnexpectedInput, text: str, path: str | None) -> RecipeError:
    line, col = getattr(err, "line", 1) or 1, getattr(err, "column", 1) or 1
    if line < 1:  # lark reports EOF at -1; point just past the last character
        lines = text.splitlines() or [""]
        line, col = len(lines), len(lines[-1]) + 1
    hint = _syntax_hint(err, text)
    if isinstance(err, UnexpectedCharacters):
        ch = text[err.pos_in_stream] if err.pos_in_stream < len(text) else ""
        message = f"unexpected character {ch!r}"
        width = 1
    elif isinstance(err, UnexpectedEOF):
        message = "the recipe ends too early"
        width = 1
    else:
        assert isinstance(err, UnexpectedToken)
        tok = err.token
        if tok.type == "$END":
            message = "the recipe ends too early"
            width = 1
            lines = text.rstrip().splitlines() or [""]
            line, col = len(lines), len(lines[-1]) + 1
        else:
            value = str(tok)
            kind = {"NAME": "name", "NUMBER": "number", "STRING": "string", "PERCENT": "percentage"}.get(
                tok.type, "keyword" if value.isalpha() else "symbol"
            )
            message = f"unexpected {kind} {value!r}"
            width = max(1, len(value))
    expected = getattr(err, "expected", None) or getattr(err, "allowed", None)
    if not hint and expected:
        hint = "expected one of " + _describe_expected(set(expected))
    span = Span(line, col, line, col + width)
    return RecipeError(message, span, source=text, path=path, hint=hint)

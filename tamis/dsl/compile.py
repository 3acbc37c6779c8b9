"""The front end in one call: text → AST → checked logical graph → optimised graph."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from tamis.dsl import ast
from tamis.dsl.feasibility import Feasibility, measure
from tamis.dsl.lower import Resolver, builtin_recipe_dir, default_resolver, lower
from tamis.dsl.parse import parse, parse_params, read_recipe_text
from tamis.dsl.passes import PASSES, Pass, optimise
from tamis.errors import ParamSpan, RecipeError


@dataclass
class Compiled:
    recipe: ast.Recipe
    logical: nx.DiGraph
    graph: nx.DiGraph  # optimised

    @property
    def name(self) -> str:
        return self.recipe.name or (Path(self.recipe.path).stem if self.recipe.path else "<recipe>")

    def feasibility(self) -> Feasibility:
        f = measure(self.graph)
        f.recipe = self.name
        return f


def compile_text(text: str, path: str | None = None, *, resolver: Resolver = default_resolver,
                 passes: list[Pass] = PASSES, pool_fields: dict[str, str] | None = None,
                 params: dict[str, str] | None = None) -> Compiled:
    """`pool_fields`: the pool's own fields and their column types (`pool_column_types`), when known;
    without them a name no stage produces is taken to be a pool field, checked when the pool is read."""
    try:
        recipe = parse(text, path)
        values = parse_params(params or {})  # `--param NAME=VALUE`: the recipe's own parameters
        try:
            logical = lower(recipe, resolver, pool_fields, values)
        except RecipeError as err:
            if isinstance(err.span, ParamSpan):  # a --param value's error: show what was typed
                err.source, err.path = err.span.text, "--param"
                raise
            raise err.with_source(text, path)
        return Compiled(recipe, logical, optimise(logical, passes))
    except RecursionError:  # the depth check in parse() should make this unreachable; never a traceback
        raise RecipeError("recipe nested too deeply to compile", path=path,
                          hint="split deep expressions with `let` stages") from None


def resolve_recipe_path(name_or_path: str) -> Path:
    """A file path, or the name of a built-in recipe (`ifd`)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    builtin = builtin_recipe_dir() / f"{name_or_path}.tamis"
    if builtin.is_file():
        return builtin
    raise RecipeError(f"no recipe file {name_or_path!r}",
                      hint=f"built-in recipes: {', '.join(sorted(q.stem for q in builtin_recipe_dir().glob('*.tamis')))}")


def compile_file(name_or_path: str | Path, **kw) -> Compiled:
    path = resolve_recipe_path(str(name_or_path))
    return compile_text(read_recipe_text(path), str(path), **kw)


def pool_column_types(schema) -> dict[str, str]:
    """The recipe column type of each extra field of a pool schema (Polars dtypes by name): numbers
    are "float", booleans "bool", strings "text", lists of strings "tags", lists or arrays of
    numbers "vector", anything else "other" (kept in the output, usable only in `is_null`)."""
    import polars as pl

    from tamis.dsl.registry import POOL_COLUMNS

    out: dict[str, str] = {}
    for name, dtype in schema.items():
        if name in POOL_COLUMNS:
            continue
        if dtype.is_numeric():
            out[name] = "float"
        elif dtype == pl.Boolean:
            out[name] = "bool"
        elif dtype in (pl.String, pl.Categorical, pl.Null) or isinstance(dtype, (pl.Categorical, pl.Enum)):
            out[name] = "text"
        elif isinstance(dtype, (pl.List, pl.Array)) and dtype.inner == pl.String:
            out[name] = "tags"
        elif isinstance(dtype, (pl.List, pl.Array)) and dtype.inner.is_numeric():
            out[name] = "vector"
        else:
            out[name] = "other"
    return out


def builtin_recipes() -> list[Path]:
    return sorted(builtin_recipe_dir().glob("*.tamis"))

"""The front end in one call: text → AST → checked logical graph → optimised graph."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from tamis.dsl import ast
from tamis.dsl.feasibility import Feasibility, measure
from tamis.dsl.lower import Resolver, builtin_recipe_dir, default_resolver, lower
from tamis.dsl.parse import parse, read_recipe_text
from tamis.dsl.passes import PASSES, Pass, optimise
from tamis.errors import RecipeError


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
                 passes: list[Pass] = PASSES) -> Compiled:
    try:
        recipe = parse(text, path)
        try:
            logical = lower(recipe, resolver)
        except RecipeError as err:
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


def builtin_recipes() -> list[Path]:
    return sorted(builtin_recipe_dir().glob("*.tamis"))

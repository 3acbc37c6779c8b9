"""AST → logical operator graph, checking names, types and columns on the way.

Every check reads the registry (`tamis.dsl.registry`) and raises a RecipeError at
the offending span. The graph is a `networkx.DiGraph` whose nodes are datasets,
models and operators (attribute `kind`), and whose edges carry `flow`:

  data       rows flowing from one operator to the next
  model      a model an operator (or derived model/dataset) runs
  train      a dataset a model is trained or fitted on
  base       the model a trained/proxy model starts from
  labels     the probe models whose losses label a fitted predictor
  eval       the evaluation set probe models are labelled on
  side       another dataset an operator reads (a target set, anchors)
  selection  a named sub-selection an intersect/union combines with
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Callable

import networkx as nx

from tamis.dsl import ast
from tamis.dsl import registry as reg
from tamis.dsl.parse import parse, read_recipe_text
from tamis.errors import RecipeError, Span

# ---- helpers -------------------------------------------------------------------


def did_you_mean(name: str, candidates) -> str | None:
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    if not close:
        return None
    return "did you mean " + " or ".join(f"`{c}`" for c in close) + "?"


def guess_param_count(name: str) -> float | None:
    """Parameter count from a model name ("Llama-2-7b" → 7e9), or a table of well-known names."""
    base = name.rstrip("/").split("/")[-1].lower()
    if base in reg.KNOWN_PARAMS:
        return reg.KNOWN_PARAMS[base]
    m = re.search(r"(?<![a-z0-9])(\d+(?:\.\d+)?)\s*([bm])(?![a-z])", base)
    if not m:
        return None
    return float(m.group(1)) * (1e9 if m.group(2) == "b" else 1e6)


@dataclass(frozen=True)
class ModelInfo:
    node: str
    llm: bool
    api: bool = False
    trained: bool = False
    depends_on_pfm: bool = False
    lora: bool = False
    fit: bool = False
    features: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataInfo:
    node: str
    derives_from_pool: bool
    multiplicity: int = 1


@dataclass(frozen=True)
class Column:
    type: str
    dataset: str | None = None  # None: a column of the rows in the pipeline; else another dataset's


@dataclass
class ChainState:
    prev: str
    columns: dict[str, Column]
    ranked: bool = False
    last_score: str | None = None
    pick_step: str | None = None
    produced_later: dict[str, ast.Node] = field(default_factory=dict)


@dataclass
class Scope:
    """Names visible inside one recipe (a spliced recipe gets its own)."""

    recipe: ast.Recipe
    prefix: str
    models: dict[str, ModelInfo] = field(default_factory=dict)
    datas: dict[str, DataInfo] = field(default_factory=dict)
    selects: dict[str, str] = field(default_factory=dict)
    column_prefix: str = ""  # `use X as a`: the columns X produces are named "a.<column>"
    renames: dict[str, str] = field(default_factory=dict)  # a column as this recipe names it -> its real name
    used: set[str] = field(default_factory=set)  # declarations some stage or declaration refers to

    def error(self, message: str, span: Span | None, hint: str | None = None) -> RecipeError:
        return RecipeError(message, span, source=self.recipe.source, path=self.recipe.path, hint=hint)

    def produced(self, name: str) -> str:
        """The real name of a column this recipe produces (prefixed under `use … as`)."""
        real = self.column_prefix + name
        if self.column_prefix:
            self.renames[name] = real
        return real

    def column(self, name: str) -> str:
        return self.renames.get(name, name)

    def resolve(self, e):
        """An expression (or stage) with this recipe's column names replaced by the real ones."""
        if not self.renames:
            return e
        return substitute(e, {k: ast.Name(id=v) for k, v in self.renames.items()})


def substitute(node, names: dict):
    """`node` with each `Name` whose id is in `names` replaced by names[id] (recipe parameters by
    their values; a spliced recipe's columns by their prefixed names, keeping the span)."""
    if isinstance(node, ast.Name):
        new = names.get(node.id)
        if new is None:
            return node
        return new.model_copy(update={"span": node.span}) if isinstance(new, ast.Name) else new
    if isinstance(node, tuple):
        out = tuple(substitute(x, names) for x in node)
        return node if all(a is b for a, b in zip(out, node)) else out
    if isinstance(node, ast.Node) and not isinstance(node, (ast.Recipe,)):
        update = {}
        for name in type(node).model_fields:
            value = getattr(node, name)
            if isinstance(value, (ast.Node, tuple)):
                new = substitute(value, names)
                if new is not value:
                    update[name] = new
        per = getattr(node, "per", None)
        if per is not None and isinstance(names.get(per), ast.Name):
            update["per"] = names[per].id
        return node.model_copy(update=update) if update else node
    return node


def _param_kind(e: ast.Expr) -> str:
    """What kind of value a recipe parameter holds, told from its default (or an override)."""
    if isinstance(e, ast.Percent):
        return "size"
    if isinstance(e, ast.Number):
        return "count" if e.is_int else "number"
    if isinstance(e, ast.Neg):
        return "number"
    if isinstance(e, ast.String):
        return "string"
    if isinstance(e, ast.Bool):
        return "bool"
    if isinstance(e, ast.ListExpr):
        return "list"
    if isinstance(e, ast.DictExpr):
        return "dict"
    if isinstance(e, ast.Name):
        return "model" if e.id == "pfm" else "data" if e.id == "pool" else "name"
    if isinstance(e, ast.Call):
        return "model" if e.func in reg.MODEL_CTORS else "data" if e.func in reg.DATA_CTORS else "value"
    return "value"


# which override kinds a default's kind accepts (a count and a percentage are both sizes)
_ACCEPTS = {"size": {"size", "count"}, "count": {"count", "size", "number"}, "number": {"number", "count"},
            "model": {"model", "name"}, "data": {"data", "name"}, "name": {"name", "model", "data"}}
_KIND_TEXT = {"size": "a size (a count or a percentage)", "count": "a number", "number": "a number",
              "string": "a string", "bool": "true or false", "list": "a list", "dict": "a {…} mapping",
              "model": "a model", "data": "a dataset", "name": "a model or dataset", "value": "a value"}


Resolver = Callable[[str, bool, "ast.Recipe"], tuple[str, str]]  # (name, is_path, from) -> (path, text)


def builtin_recipe_dir() -> Path:
    return Path(str(resources.files("tamis.recipes")))


def default_resolver(name: str, is_path: bool, origin: ast.Recipe) -> tuple[str, str]:
    """Find a recipe for `use`: a path relative to the using file, else NAME.tamis beside it, else built-in.

    A spliced path must name a recipe file (`.tamis`, also after following links): a recipe is
    shared text, and must not be able to read (and echo, in an error) any other file."""
    here = Path(origin.path).parent if origin.path else Path.cwd()
    if is_path:
        c = here / name
        if c.suffix != ".tamis" or (c.exists() and c.resolve().suffix != ".tamis"):
            raise LookupError("`use \"PATH\"` splices recipe files only: the path must end in .tamis")
        candidates = [c]
    else:
        candidates = [here / f"{name}.tamis", builtin_recipe_dir() / f"{name}.tamis"]
    for c in candidates:
        if c.is_file():
            return str(c), read_recipe_text(c)
    known = sorted(p.stem for p in builtin_recipe_dir().glob("*.tamis"))
    known += sorted(p.stem for p in here.glob("*.tamis")) if not is_path else []
    raise LookupError(did_you_mean(name, known) or f"built-in recipes: {', '.join(known)}")


# ---- the lowering ----------------------------------------------------------------------


class Lowerer:
    def __init__(self, resolver: Resolver = default_resolver, pool_fields: dict[str, str] | None = None,
                 params: tuple[ast.Kwarg, ...] = ()) -> None:
        self.params = params  # the top-level recipe's parameter values (`--param size=5%`)
        self.g = nx.DiGraph()
        self.resolver = resolver
        # the pool's own fields and their column types, when known (`check --pool`, or a run once
        # the pool is loaded); None: a name no stage produces is assumed to be a pool field
        self.pool_fields = pool_fields
        self._counter = 0
        self._stack: list[str] = []
        self._splices: list[list[bool]] = [[]]  # per recipe being lowered: whether each recipe it splices is reproducible

    # -- graph building --
    def node(self, kind: str, label: str, scope: Scope | None, span: Span | None = None, **attrs) -> str:
        self._counter += 1
        nid = f"{kind[0]}{self._counter}"
        self.g.add_node(
            nid, kind=kind, label=label, recipe=scope.recipe.name if scope else None,
            line=span.line if span else None, column=span.column if span else None, **attrs,
        )
        return nid

    def edge(self, src: str, dst: str, flow: str, role: str | None = None) -> None:
        """One edge per pair of nodes; a side dataset read in several roles (`on X` and a
        data parameter) lists them all in `roles`."""
        if role is not None and self.g.has_edge(src, dst):
            self.g.edges[src, dst].setdefault("roles", []).append(role)
            return
        self.g.add_edge(src, dst, flow=flow, **({"roles": [role]} if role is not None else {}))

    def singleton(self, nid: str, kind: str, label: str, **attrs) -> str:
        if nid not in self.g:
            self.g.add_node(nid, kind=kind, label=label, recipe=None, line=None, column=None, **attrs)
        return nid

    # -- entry --
    def lower(self, recipe: ast.Recipe) -> nx.DiGraph:
        self._stack.append(self._key(recipe))
        recipe = self.bind_params(Scope(recipe, prefix=""), recipe, (), self.params, None)
        scope = Scope(recipe, prefix="")
        self.declare(scope)
        state = self.new_chain(scope, recipe.pipeline)
        self.pipeline(scope, recipe.pipeline, state, step_prefix="")
        self.warn_unused(scope)
        self.warn_unknown_sizes()
        out = self.node("output", "selection", scope, None)
        self.edge(state.prev, out, "data")
        self.g.graph.update(
            recipe=recipe.name, title=recipe.title, cites=list(recipe.cites), code=list(recipe.code),
            path=recipe.path, output=out, reproducible=self.reproducible(recipe),
        )
        return self.g

    def _key(self, recipe: ast.Recipe) -> str:
        return str(Path(recipe.path).resolve()) if recipe.path else f"<{recipe.name or 'recipe'}>"

    def reproducible(self, recipe: ast.Recipe) -> bool:
        """Its own code, or every recipe it splices directly is reproducible (recursively)."""
        if recipe.code:
            return True
        direct = self._splices[0]
        return bool(direct) and all(direct)

    def bind_params(self, outer: Scope, recipe: ast.Recipe, args, kwargs, span: Span | None) -> ast.Recipe:
        """`recipe` with its parameters replaced by their values: a `use`'s arguments (checked
        against each default's kind, errors at the `use`) or the defaults."""
        declared = {k.name: k for k in recipe.params}

        def error(message: str, at: Span, hint: str | None = None) -> RecipeError:
            if span is None:  # the top-level recipe's values come from `--param`, not from recipe text
                return RecipeError(f"--param: {message}", hint=hint)
            return outer.error(message, at, hint=hint)

        names = list(declared)
        what = f"recipe {recipe.name or Path(recipe.path or 'recipe').stem}"
        if (args or kwargs) and not declared:
            raise error(f"{what} takes no parameters", (args or kwargs)[0].span,
                              hint="declare them in its header: recipe NAME(size = 10%)")
        if len(args) > len(names):
            raise error(f"{what} takes {len(names)} parameter(s), got {len(args)}", args[len(names)].span,
                              hint=f"parameters: {', '.join(names)}")
        given = dict(zip(names, args))
        for kw in kwargs:
            if kw.name not in declared:
                raise error(f"{what} has no parameter {kw.name!r}", kw.span,
                                  hint=did_you_mean(kw.name, names) or f"parameters: {', '.join(names)}")
            if kw.name in given:
                raise error(f"{what}: parameter {kw.name!r} given twice", kw.span)
            given[kw.name] = kw.value
        values = {}
        for name, decl in declared.items():
            want = _param_kind(decl.value)
            value = given.get(name, decl.value)
            if span is None and want == "string" and isinstance(value, ast.Name):
                value = ast.String(value=value.id, span=value.span)  # --param ranking=constrained: a bare word
            got = _param_kind(value)
            if got != want and got not in _ACCEPTS.get(want, ()):
                quote = (f"quote it: --param {name}='\"…\"' on the command line, {name}=\"…\" in a recipe"
                         if want == "string" else None)  # a bare path parses as arithmetic on names
                raise error(f"{what}: parameter {name!r} takes {_KIND_TEXT[want]} (its default is "
                                  f"{decl.value.unparse()}), got {value.unparse()}", value.span, hint=quote)
            values[name] = value
        for d in recipe.decls:
            if d.name in declared:
                raise RecipeError(f"{d.name!r} is both a parameter and a declaration", d.span,
                                  source=recipe.source, path=recipe.path)
        # a parameter named like a column the recipe produces would silently replace every use of that column
        produced = set(self.produced_columns(recipe.pipeline))
        for d in recipe.decls:
            if isinstance(d, ast.SelectDecl):
                produced |= set(self.produced_columns(d.pipeline))
        for name, decl in declared.items():
            if name in produced or name in reg.POOL_COLUMNS:
                raise RecipeError(f"parameter {name!r} has the name of a column of this recipe", decl.span,
                                  source=recipe.source, path=recipe.path,
                                  hint=f"rename the parameter, e.g. {name}_value")
        if not values:
            return recipe
        return recipe.model_copy(update={"decls": substitute(recipe.decls, values),
                                         "pipeline": substitute(recipe.pipeline, values)})

    def declare(self, scope: Scope) -> None:
        for d in scope.recipe.decls:  # in source order: a declaration sees those above it
            self.check_fresh(scope, d.name, d.span)
            if isinstance(d, ast.ModelDecl):
                scope.models[d.name] = self.model(scope, d.expr)
            elif isinstance(d, ast.DataDecl):
                scope.datas[d.name] = self.data(scope, d.expr)
            else:
                state = self.new_chain(scope, d.pipeline)
                self.pipeline(scope, d.pipeline, state, step_prefix=f"{d.name}.")
                scope.selects[d.name] = state.prev

    def warn(self, scope: Scope, span: Span | None, message: str) -> None:
        where = f"{scope.recipe.path or '<recipe>'}" + (f":{span.line}:{span.column}" if span else "")
        self.g.graph.setdefault("warnings", []).append(f"{where}: {message}")

    def warn_unused(self, scope: Scope) -> None:
        for d in scope.recipe.decls:
            if d.name not in scope.used:
                kind = {"ModelDecl": "model", "DataDecl": "dataset", "SelectDecl": "selection"}[type(d).__name__]
                self.warn(scope, d.span, f"{kind} {d.name!r} is declared but never used")

    def warn_unknown_sizes(self) -> None:
        """A trained model whose size is unknown leaves the small-proxy mark (`*`) undecided."""
        for n, a in self.g.nodes(data=True):
            if a["kind"] == "model" and a.get("ctor") == "hf" and a.get("param_count") is None:
                trained = any(self.g.nodes[s].get("trained") for s in self.g.successors(n)
                              if self.g.nodes[s]["kind"] == "model")
                if trained:
                    self.g.graph.setdefault("warnings", []).append(
                        f"{a.get('recipe') or '<recipe>'}:{a['line']}: the size of {a['label']} is unknown, so whether "
                        "it is a small proxy (the feasibility `*`) cannot be decided: give it, e.g. hf(\"…\", params=7e9)")

    def check_fresh(self, scope: Scope, name: str, span: Span) -> None:
        taken = {**scope.models, **scope.datas, **{k: None for k in scope.selects}}
        if name in taken or name in reg.RUNTIME_MODELS or name in reg.RUNTIME_DATA:
            raise scope.error(f"{name!r} is already defined", span)

    def new_chain(self, scope: Scope, stages) -> ChainState:
        pool = self.pool()
        cols = {k: Column(t) for k, t in reg.POOL_COLUMNS.items()}
        for name, t in (self.pool_fields or {}).items():
            cols.setdefault(name, Column(t))
        return ChainState(prev=pool, columns=cols, produced_later=self.produced_columns(stages))

    def pool(self) -> str:
        return self.singleton("data:pool", "dataset", "pool", source="pool", derives_from_pool=True,
                              multiplicity=1, llm_generated=False, params={})

    @staticmethod
    def produced_columns(stages) -> dict[str, ast.Node]:
        out: dict[str, ast.Node] = {}
        for s in stages:
            if isinstance(s, ast.Score):
                for it in s.items:
                    out.setdefault(it.column, it)
            elif isinstance(s, ast.Let):
                out.setdefault(s.name, s)
        return out

    # ---- arguments ---------------------------------------------------------------
    def bind(self, scope: Scope, params: tuple[reg.Param, ...], args, kwargs, span: Span, what: str) -> dict:
        """Match positional and keyword arguments to declared parameters and check each value."""
        bound: dict[str, ast.Expr] = {}
        if len(args) > len(params):
            raise scope.error(f"{what} takes at most {len(params)} positional argument(s), got {len(args)}",
                              args[len(params)].span)
        for p, a in zip(params, args):
            bound[p.name] = a
        names = [p.name for p in params]
        for kw in kwargs:
            if kw.name not in names:
                raise scope.error(f"{what} has no parameter {kw.name!r}", kw.span,
                                  hint=did_you_mean(kw.name, names) or f"parameters: {', '.join(names) or 'none'}")
            if kw.name in bound:
                raise scope.error(f"{what}: parameter {kw.name!r} given twice", kw.span)
            bound[kw.name] = kw.value
        values: dict = {}
        for p in params:
            if p.name in bound:
                values[p.name] = self.value(scope, p, bound[p.name], what)
            elif p.required:
                raise scope.error(f"{what} needs {p.name!r}" + (f" ({p.doc})" if p.doc else ""), span,
                                  hint=f"parameters: {', '.join(names)}")
            else:
                values[p.name] = p.default
        return values

    def value(self, scope: Scope, p: reg.Param, e: ast.Expr, what: str):
        t = p.type
        if t == "seed":
            if not isinstance(e, ast.Number) or not e.is_int:
                raise scope.error(f"{what}: {p.name!r} needs a whole number ≥ 0, got {e.unparse()}", e.span)
            return int(e.value)
        if t in ("count", "size", "fraction", "number"):
            if isinstance(e, ast.Neg) and isinstance(e.operand, ast.Number) and t == "number":
                return -e.operand.value
            if isinstance(e, ast.Percent):
                if t == "count":
                    raise scope.error(f"{what}: {p.name!r} needs a count, not a percentage", e.span,
                                      hint=f"write a whole number, e.g. {p.name}=1000")
                if t == "number":
                    raise scope.error(f"{what}: {p.name!r} needs a number, not a percentage", e.span)
                if not 0 < e.value <= 100:
                    raise scope.error(f"a fraction must lie in (0, 100] %, got {e.unparse()}", e.span)
                return {"fraction": e.value / 100}
            if isinstance(e, ast.Number):
                if t == "fraction":
                    raise scope.error(f"{what}: {p.name!r} needs a percentage, e.g. 5%", e.span)
                if t in ("count", "size"):
                    if not e.is_int or e.value <= 0:
                        raise scope.error(f"{what}: {p.name!r} needs a positive whole number, got {e.unparse()}", e.span)
                    return {"count": int(e.value)} if t == "size" else int(e.value)
                return e.value
            raise scope.error(f"{what}: {p.name!r} needs a {'count or percentage' if t == 'size' else t}", e.span)
        if t == "string":
            if not isinstance(e, ast.String):
                raise scope.error(f"{what}: {p.name!r} needs a string in quotes", e.span,
                                  hint=f'write {p.name}="{e.unparse()}"' if isinstance(e, ast.Name) else None)
            if p.choices and e.value not in p.choices:
                raise scope.error(f"{what}: {p.name!r} must be one of {', '.join(map(repr, p.choices))}", e.span,
                                  hint=did_you_mean(e.value, p.choices))
            return e.value
        if t == "any":  # checked by the caller (a stage's own keyword, e.g. weights={…})
            return e
        if t == "bool":
            if not isinstance(e, ast.Bool):
                raise scope.error(f"{what}: {p.name!r} needs true or false", e.span)
            return e.value
        if t == "model":
            return self.model(scope, e)
        if t == "data":
            return self.data(scope, e)
        if t == "lora":
            if not (isinstance(e, ast.Call) and e.func == "lora"):
                raise scope.error(f"{what}: {p.name!r} needs a lora(...) configuration", e.span)
            return self.bind(scope, reg.MODEL_CTORS["lora"].params, e.args, e.kwargs, e.span, "lora(...)")
        if t == "column":
            if isinstance(e, (ast.Name, ast.String)):
                return e.id if isinstance(e, ast.Name) else e.value
            raise scope.error(f"{what}: {p.name!r} needs a column name", e.span)
        if t == "list":
            if not isinstance(e, ast.ListExpr):
                raise scope.error(f"{what}: {p.name!r} needs a list, e.g. [\"a\", \"b\"]", e.span)
            out = []
            for item in e.items:
                if isinstance(item, (ast.String,)):
                    out.append(item.value)
                elif isinstance(item, ast.Name):
                    out.append(item.id)
                elif isinstance(item, ast.Number):
                    out.append(item.value)
                else:
                    raise scope.error("list items must be names, strings or numbers", item.span)
            return out
        raise AssertionError(t)

    @staticmethod
    def plain(values: dict) -> dict:
        """The JSON-able parameters (models and datasets are edges, not parameters)."""
        return {k: v for k, v in values.items() if not isinstance(v, (ModelInfo, DataInfo))}

    # ---- models --------------------------------------------------------------------
    def model(self, scope: Scope, e: ast.Expr) -> ModelInfo:
        if isinstance(e, ast.Name):
            if e.id == "pfm":
                nid = self.singleton("model:pfm", "model", "pfm", ctor="pfm", llm=True, api=False, trained=False,
                                     depends_on_pfm=True, multiplicity=1, param_count=None, params={})
                return ModelInfo(nid, llm=True, depends_on_pfm=True)
            if e.id in scope.models:
                scope.used.add(e.id)
                return scope.models[e.id]
            if e.id in scope.datas:
                raise scope.error(f"{e.id!r} is a dataset, but a model is needed here", e.span)
            known = list(scope.models) + ["pfm"]
            raise scope.error(f"unknown model {e.id!r}", e.span,
                              hint=did_you_mean(e.id, known + list(reg.MODEL_CTORS))
                              or f"declare it: model {e.id} = hf(\"path/or/name\")")
        if not isinstance(e, ast.Call):
            raise scope.error(f"a model is needed here, got {e.unparse()}", e.span)
        if e.func == "lora":
            raise scope.error("lora(...) is a training configuration, not a model", e.func_span,
                              hint="pass it to warmup or train: warmup(pfm, 5%, lora(r=8))")
        ctor = reg.MODEL_CTORS.get(e.func)
        if ctor is None:
            where = next((k for k, v in reg.all_names().items() if e.func in v), None)
            raise scope.error(f"unknown model constructor {e.func!r}" + (f" ({e.func!r} is a {where})" if where else ""),
                              e.func_span, hint=did_you_mean(e.func, [m for m in reg.MODEL_CTORS if m != "lora"]))
        vals = self.bind(scope, ctor.params, e.args, e.kwargs, e.span, f"{e.func}(...)")
        return getattr(self, f"model_{ctor.name}")(scope, e, vals)

    def _model_node(self, scope, e, ctor: str, label: str, *, llm, api=False, trained=False, depends=False,
                    multiplicity=1, param_count=None, params=None, **extra) -> str:
        return self.node("model", label, scope, e.span, ctor=ctor, llm=llm, api=api, trained=trained,
                         depends_on_pfm=depends, multiplicity=multiplicity, param_count=param_count,
                         params=params or {}, **extra)

    def model_hf(self, scope, e, v) -> ModelInfo:
        count = v["params"] if v["params"] is not None else guess_param_count(v["name"])
        nid = self._model_node(scope, e, "hf", f"hf({v['name']})", llm=True, param_count=count, params=self.plain(v))
        return ModelInfo(nid, llm=True)

    def model_encoder(self, scope, e, v) -> ModelInfo:
        nid = self._model_node(scope, e, "encoder", f"encoder({v['name']})", llm=False,
                               param_count=guess_param_count(v["name"]), params=self.plain(v))
        return ModelInfo(nid, llm=False)

    def model_api(self, scope, e, v) -> ModelInfo:
        nid = self._model_node(scope, e, "api", f"api({v['name']})", llm=True, api=True, params=self.plain(v))
        return ModelInfo(nid, llm=True, api=True)

    def model_proxy(self, scope, e, v) -> ModelInfo:
        of, m = v["of"], v["model"]
        if not of.depends_on_pfm:
            raise scope.error("proxy(of, model): `of` must be the PFM (or a model derived from it)", e.args[0].span)
        count = self.g.nodes[m.node].get("param_count")
        nid = self._model_node(scope, e, "proxy", f"proxy({self.g.nodes[m.node]['label']})", llm=m.llm, api=m.api,
                               depends=True, param_count=count)
        self.edge(of.node, nid, "base")
        self.edge(m.node, nid, "base")
        return replace(m, node=nid, depends_on_pfm=True)

    def _trainable(self, scope, e, m: ModelInfo, what: str) -> None:
        attrs = self.g.nodes[m.node]
        if m.api:
            raise scope.error(f"{what}: {attrs['label']} is an API model and cannot be trained here", e.args[0].span
                              if e.args else e.span, hint="warm up an open model: hf(\"…\") or pfm")
        if m.fit:
            raise scope.error(f"{what}: a fitted predictor cannot be fine-tuned", e.span)

    def model_warmup(self, scope, e, v) -> ModelInfo:
        base: ModelInfo = v["model"]
        self._trainable(scope, e, base, "warmup")
        on: DataInfo | None = v.pop("on")
        if on is not None:  # `warmup(pfm, on=s)`: the rows are given, not sampled
            if v["size"] is not None or v["select"] != "random":
                raise scope.error("warmup(..., on=DATA) trains on DATA: it takes no size or select", e.span,
                                  hint="pick the rows in DATA's own pipeline (select s = … | top 5%)")
            v["trained_on"] = True
            return self._trained(scope, e, "warmup", base, on.node, v, multiplicity=on.multiplicity)
        if v["size"] is None:
            raise scope.error("warmup(...) needs a size (a sample of the pool) or on=DATA", e.span,
                              hint="e.g. warmup(pfm, 5%) or warmup(pfm, on=first)")
        sample = self.node("dataset", f"warmup sample ({_size_text(v['size'])}, {v['select']})", scope, e.span,
                           source="warmup_sample", derives_from_pool=True, multiplicity=1, llm_generated=False,
                           params={"size": v["size"], "select": v["select"], "seed": v["seed"], "clusters": v["clusters"],
                                   "max_length": v["max_length"]})
        self.edge(self.pool(), sample, "data")
        if v["select"] == "cherry":
            self.edge(base.node, sample, "model")  # Cherry's sampling embeds with the base model
        return self._trained(scope, e, "warmup", base, sample, v, multiplicity=1)

    def model_train(self, scope, e, v) -> ModelInfo:
        base: ModelInfo = v["model"]
        self._trainable(scope, e, base, "train")
        data: DataInfo = v["on"]
        evaluation: DataInfo | None = v.get("evaluate_on")
        source = self.g.nodes[data.node]
        if source.get("source") == "subsets":  # probes: each one's label is its loss on an evaluation set
            if evaluation is None and source["params"].get("holdout") is None:
                raise scope.error("train(…, on=subsets(…)) trains probe models, and each probe's label is its loss "
                                  "on an evaluation set: none is given", e.span,
                                  hint="hold rows out: subsets(D, n=…, size=…, holdout=10%), "
                                       "or name one: train(pfm, on=…, evaluate_on=load(\"eval.jsonl\"))")
        elif evaluation is not None:
            kw = next((k for k in e.kwargs if k.name == "evaluate_on"), None)
            raise scope.error("train(…, evaluate_on=…) labels probe models: it needs on=subsets(…)",
                              kw.span if kw else e.span)
        nid = self._trained(scope, e, "train", base, data.node, v, multiplicity=data.multiplicity).node
        if evaluation is not None:
            self.edge(evaluation.node, nid, "eval")
        return ModelInfo(nid, llm=base.llm, trained=True, depends_on_pfm=base.depends_on_pfm, lora=bool(v.get("lora")))

    def _trained(self, scope, e, ctor, base: ModelInfo, data_node: str, v: dict, multiplicity: int) -> ModelInfo:
        battrs = self.g.nodes[base.node]
        lora = v.get("lora")
        extra = (", lora" if lora else "") + (f", task={v['task']}" if v.get("task") else "")
        label = f"{ctor}({battrs['label']}{extra})" + (f" ×{multiplicity}" if multiplicity > 1 else "")
        nid = self._model_node(scope, e, ctor, label, llm=base.llm, trained=True, depends=base.depends_on_pfm,
                               multiplicity=multiplicity, param_count=battrs.get("param_count"), params=self.plain(v),
                               lora=bool(lora))
        self.edge(base.node, nid, "base")
        self.edge(data_node, nid, "train")
        return ModelInfo(nid, llm=base.llm, trained=True, depends_on_pfm=base.depends_on_pfm, lora=bool(lora))

    def model_fit(self, scope, e, v) -> ModelInfo:
        labels: ModelInfo = v["labels"]
        data: DataInfo = v["on"]
        nid = self._model_node(scope, e, "fit", f"fit({v['kind']})", llm=False, trained=True,
                               depends=labels.depends_on_pfm, params=self.plain(v))
        self.edge(data.node, nid, "train")
        self.edge(labels.node, nid, "labels")
        return ModelInfo(nid, llm=False, trained=True, depends_on_pfm=labels.depends_on_pfm, fit=True,
                         features=tuple(v["features"]))

    # ---- datasets ---------------------------------------------------------------------
    def data(self, scope: Scope, e: ast.Expr) -> DataInfo:
        if isinstance(e, ast.Name):
            if e.id == "pool":
                return DataInfo(self.pool(), derives_from_pool=True)
            if e.id in scope.datas:
                scope.used.add(e.id)
                return scope.datas[e.id]
            if e.id in scope.selects:  # a selection is a dataset: train on it, score it, splice it
                scope.used.add(e.id)
                return DataInfo(scope.selects[e.id], derives_from_pool=True)
            if e.id in scope.models or e.id == "pfm":
                raise scope.error(f"{e.id!r} is a model, but a dataset is needed here", e.span)
            raise scope.error(f"unknown dataset {e.id!r}", e.span,
                              hint=did_you_mean(e.id, list(scope.datas) + list(scope.selects) + ["pool"])
                              or f"declare it: data {e.id} = load(\"file.jsonl\")")
        if not isinstance(e, ast.Call):
            raise scope.error(f"a dataset is needed here, got {e.unparse()}", e.span)
        ctor = reg.DATA_CTORS.get(e.func)
        if ctor is None:
            raise scope.error(f"unknown data constructor {e.func!r}", e.func_span,
                              hint=did_you_mean(e.func, reg.DATA_CTORS) or f"constructors: {', '.join(reg.DATA_CTORS)}")
        v = self.bind(scope, ctor.params, e.args, e.kwargs, e.span, f"{e.func}(...)")
        parent: DataInfo | None = v.get("data")
        model: ModelInfo | None = v.get("model")
        if ctor.llm_generated and (model is None or not model.llm):
            raise scope.error(f"{e.func}(...) generates data and needs an LLM", e.span)
        derives = parent.derives_from_pool if parent else False
        mult = (parent.multiplicity if parent else 1) * (v["n"] if ctor.name == "subsets" else 1)
        label = f"{e.func}({v['path']})" if ctor.name == "load" else e.unparse() if len(e.unparse()) < 48 else f"{e.func}(…)"
        nid = self.node("dataset", label, scope, e.span, source=ctor.name, derives_from_pool=derives,
                        multiplicity=mult, llm_generated=ctor.llm_generated, params=self.plain(v))
        if parent:
            self.edge(parent.node, nid, "data")
        if model:
            self.edge(model.node, nid, "model")
        return DataInfo(nid, derives_from_pool=derives, multiplicity=mult)

    # ---- the pipeline -------------------------------------------------------------
    def pipeline(self, scope: Scope, stages, state: ChainState, step_prefix: str) -> None:
        for i, stage in enumerate(stages):
            handler = getattr(self, f"stage_{type(stage).__name__.lower()}")
            handler(scope, stage, state, f"{step_prefix}{scope.prefix}{i}")

    def op(self, scope, stage_span, state: ChainState, op: str, label: str, step: str, *, pick=False,
           columns_out=None, columns_in=(), rowwise=True, cost="cheap", params=None, **attrs) -> str:
        if pick:
            if state.pick_step is None:
                state.pick_step = step
            step = state.pick_step
        else:
            state.pick_step = None
        nid = self.node("op", label, scope, stage_span, op=op, step=step, pick=pick, columns_out=columns_out or {},
                        columns_in=sorted(set(columns_in)), rowwise=rowwise, cost=cost, params=params or {}, **attrs)
        self.edge(state.prev, nid, "data")
        state.prev = nid
        return nid

    def stage_score(self, scope: Scope, stage: ast.Score, state: ChainState, step: str) -> None:
        state.pick_step = None
        for item in stage.items:
            spec = reg.SCORERS.get(item.scorer)
            if spec is None:
                where = next((k for k, v in reg.all_names().items() if item.scorer in v), None)
                raise scope.error(f"unknown scorer {item.scorer!r}" + (f" ({item.scorer!r} is a {where})" if where else ""),
                                  item.scorer_span, hint=did_you_mean(item.scorer, reg.SCORERS)
                                  or f"scorers: {', '.join(reg.SCORERS)}")
            what = f"score {item.scorer}"
            v = self.bind(scope, spec.params, item.args, item.kwargs, item.span, what)
            model = self.scorer_model(scope, spec.model, item.using, item, what)
            target = self.data(scope, item.on) if item.on is not None else None
            col = scope.produced(item.column)
            if col in state.columns:
                raise scope.error(f"column {col!r} already exists", item.span,
                                  hint=f"name this score: score {item.scorer} … as {col}_2")
            if spec.name == "predict":
                assert model is not None
                missing = [f for f in model.features if f not in state.columns]
                if missing:
                    raise scope.error(f"predict: the selector needs feature column(s) {', '.join(map(repr, missing))} "
                                      "that no earlier stage produces", item.span)
            for name, (for_pool, for_target) in spec.auto.items():
                if v.get(name) == "auto":
                    v[name] = for_target if target else for_pool
            dataset = self.g.nodes[target.node]["label"] if target else None
            outs = {scope.produced(item.column + suffix): Column(t, dataset) for suffix, t in spec.columns.items()}
            label = f"score {item.scorer}" + (f" using {self.g.nodes[model.node]['label']}" if model else "") \
                + (f" on {dataset}" if dataset else "") + (f" as {col}" if col != item.scorer else "")
            nid = self.op(scope, item.span, state, "score", label, step, columns_out={k: c.type for k, c in outs.items()},
                          columns_in=list(model.features) if model and model.fit else [],
                          rowwise=spec.rowwise and target is None, cost=spec.cost,
                          params={"scorer": spec.name, **self.plain(v), "target": dataset})
            if model:
                self.edge(model.node, nid, "model")
                if spec.needs_optimizer_state and self.g.nodes[model.node].get("trained"):
                    self.g.nodes[model.node]["params"]["optimizer_state"] = True  # keep what this stage reads
            if target:
                self.edge(target.node, nid, "side", role="target")
            for name, value in v.items():
                if isinstance(value, DataInfo):
                    self.edge(value.node, nid, "side", role=name)
            state.columns.update(outs)
            if target is None and spec.columns[""] == "float":
                state.last_score = col

    def scorer_model(self, scope, need, using: ast.Expr | None, item, what) -> ModelInfo | None:
        if need is None:
            if using is not None:
                raise scope.error(f"{what} uses no model; remove `using`", using.span)
            return None
        if using is None:
            if need in ("llm", "local_llm"):
                return self.model(scope, ast.Name(id="pfm", span=item.span))
            raise scope.error(f"{what} needs a model: add `using …`", item.span)
        m = self.model(scope, using)
        self.check_model_need(scope, need, m, using.span, what)
        return m

    def check_model_need(self, scope, need: str, m: ModelInfo, span: Span, what: str) -> None:
        label = self.g.nodes[m.node]["label"]
        ok = {
            "llm": m.llm,
            "local_llm": m.llm and not m.api,
            "lora_llm": m.llm and m.trained and m.lora,
            "embedder": not m.api and not m.fit,
            "encoder": not m.llm and not m.fit,
            "fit": m.fit,
        }[need]
        if not ok:
            wants = {
                "llm": "an LLM", "local_llm": "an LLM whose weights are local (not an API model)",
                "lora_llm": "a model warmed up with LoRA, e.g. warmup(pfm, 5%, lora(r=128))",
                "embedder": "a local model to embed with (an LLM or an encoder)",
                "encoder": "an encoder model, e.g. encoder(\"…\")", "fit": "a fitted predictor, e.g. fit(\"linear\", …)",
            }[need]
            raise scope.error(f"{what} needs {wants}, but {label} is not", span)

    def stage_let(self, scope, stage: ast.Let, state: ChainState, step: str) -> None:
        expr = scope.resolve(stage.expr)
        t, cols, aggregate = self.expr_type(scope, expr, state)
        name = scope.produced(stage.name)
        if name in state.columns:
            raise scope.error(f"column {name!r} already exists", stage.span, hint=f"choose another name than {stage.name!r}")
        if t not in ("float", "bool", "any"):
            raise scope.error(f"`let` needs a number or a condition, but this is {t}", stage.expr.span)
        self.op(scope, stage.span, state, "let", f"let {name} = {expr.unparse()}", step,
                columns_out={name: t}, columns_in=cols, rowwise=not aggregate, expr=expr,
                params={"name": name, "expr": expr.unparse()})
        state.columns[name] = Column(t)
        if t in ("float", "any"):
            state.last_score = name

    def stage_where(self, scope, stage: ast.Where, state: ChainState, step: str) -> None:
        cond = scope.resolve(stage.cond)
        t, cols, aggregate = self.expr_type(scope, cond, state)
        if t not in ("bool", "any"):
            raise scope.error(f"`where` needs a condition, but this is a {t}", stage.cond.span,
                              hint=f"compare it: where {stage.cond.unparse()} > …")
        from tamis.dsl.conditions import never_passes

        if why := never_passes(cond):
            self.warn(scope, stage.cond.span, f"this `where` can never pass: {why}; every row would be dropped")
        self.op(scope, stage.span, state, "where", f"where {cond.unparse()}", step, pick=True, columns_in=cols,
                rowwise=not aggregate, expr=cond, params={"expr": cond.unparse()})

    def stage_rank(self, scope, stage: ast.Rank, state: ChainState, step: str) -> None:
        if stage.by is None:
            if state.last_score is None:
                raise scope.error("`rank` with nothing to rank by: no score before it", stage.span,
                                  hint="add a score stage before it, or write `rank by EXPR`")
            by: ast.Expr = ast.Name(id=state.last_score, span=stage.span)
        else:
            by = scope.resolve(stage.by)
        t, cols, _ = self.expr_type(scope, by, state)
        if t not in ("float", "any"):
            raise scope.error(f"`rank by` needs a number, but this is a {t}", by.span)
        order = stage.order or "desc"
        per = self.group_column(scope, stage.per, stage.span, state, "rank … per") if stage.per else None
        self.op(scope, stage.span, state, "rank", f"rank by {by.unparse()} {order}" + (f" per {per}" if per else ""),
                step, pick=True, columns_in=cols + ([per] if per else []), expr=by,
                params={"by": by.unparse(), "order": order, **({"per": per} if per else {})})
        state.ranked = True

    def stage_top(self, scope, stage: ast.Top, state: ChainState, step: str) -> None:
        if not state.ranked:
            raise scope.error("`top` with nothing ranked", stage.span,
                              hint="add `rank` (or `rank by EXPR`) before `top`; use `sample` for a random subset")
        size = self.value(scope, reg.Param("amount", "size"), stage.amount, "top")
        v = self.bind(scope, (reg.Param("weights", "any", None),), (), stage.kwargs, stage.span, "top")
        per, weights = self.grouping(scope, stage, state, v["weights"], "top")
        self.op(scope, stage.span, state, "top", f"top {stage.amount.unparse()}" + self._per_text(per, weights), step,
                pick=True, columns_in=[per] if per else [], params={"size": size, **_grouped(per, weights)})

    def stage_sample(self, scope, stage: ast.Sample, state: ChainState, step: str) -> None:
        size = self.value(scope, reg.Param("amount", "size"), stage.amount, "sample")
        v = self.bind(scope, (reg.Param("seed", "seed", 42), reg.Param("weights", "any", None)), (), stage.kwargs,
                      stage.span, "sample")
        per, weights = self.grouping(scope, stage, state, v.pop("weights"), "sample")
        self.op(scope, stage.span, state, "sample", f"sample {stage.amount.unparse()}" + self._per_text(per, weights),
                step, pick=True, columns_in=[per] if per else [], params={"size": size, **v, **_grouped(per, weights)})
        state.ranked = False

    @staticmethod
    def _per_text(per: str | None, weights: dict | None) -> str:
        if per is None:
            return ""
        return f" per {per}" + (" with weights={" + ", ".join(f"{k}: {v:g}" for k, v in weights.items()) + "}"
                                if weights else "")

    def grouping(self, scope, stage, state: ChainState, weights, what: str) -> tuple[str | None, dict | None]:
        """`per G` and `with weights={…}` of a top/sample stage: the group column, the mixture weights."""
        per = self.group_column(scope, stage.per, stage.span, state, f"{what} … per") if stage.per else None
        if weights is None:
            return per, None
        span = next(k.span for k in stage.kwargs if k.name == "weights")
        if per is None:
            raise scope.error(f"`{what}` with weights needs groups to weigh", span,
                              hint=f'write {what} {stage.amount.unparse()} per source with weights={{"a": 0.7, "b": 0.3}}')
        if not isinstance(weights, ast.DictExpr) or not weights.keys:
            raise scope.error("weights needs a mapping from group values to numbers", span,
                              hint='e.g. weights={"sharegpt": 0.7, "dolly": 0.3}')
        out = {}
        for key, value in zip(weights.keys, weights.values):
            if not isinstance(value, ast.Number) or value.value < 0:
                raise scope.error(f"the weight of {key!r} must be a number ≥ 0", value.span)
            out[key] = value.value
        if not sum(out.values()) > 0:
            raise scope.error("the weights add up to 0: nothing would be picked", span)
        return per, out

    def group_column(self, scope, name: str, span: Span, state: ChainState, what: str) -> str:
        """The column `per NAME` groups by: a column here, or (unknown pool schema) an assumed pool field."""
        real = scope.column(name)
        col = state.columns.get(real) or self.field_or_error(scope, real, span, state)
        if col.dataset is not None:
            raise scope.error(f"{what}: {real!r} holds scores of dataset {col.dataset}, not of these rows", span)
        if col.type in ("vector", "tags", "messages", "other"):
            raise scope.error(f"{what}: cannot group by {real!r}, a {col.type} column", span,
                              hint="group by a field (source, category) or a cluster score (score cluster using …)")
        return real

    def field_or_error(self, scope, name: str, span: Span, state: ChainState) -> Column:
        """A name no stage has produced: an error, or — when the pool's fields are not known yet — a
        pool field assumed to exist, checked (with this line and column) once the run loads the pool."""
        later = state.produced_later.get(name)
        if later is not None and later.span.start > span.start:
            raise scope.error(f"column {name!r} is used before any stage produces it", span,
                              hint=f"it is produced at line {later.span.line}; move this stage after it")
        known = [c for c in state.columns if state.columns[c].dataset is None]
        # a name close to a column a stage produced is a typo far more often than a pool field
        produced = [c for c in known if c not in reg.POOL_COLUMNS and state.columns[c].type != "any"
                    and c not in (self.pool_fields or {})]
        typo = did_you_mean(name, produced)
        if self.pool_fields is None and not typo and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            self.g.graph.setdefault("assumed_fields", []).append(
                {"name": name, "line": span.line, "column": span.column, "path": scope.recipe.path})
            state.columns[name] = Column("any")
            return state.columns[name]
        if typo and self.pool_fields is None:
            typo += " (if it is a field of the pool, `tamis check --pool FILE` checks it against the pool)"
        raise scope.error(f"unknown column {name!r}", span,
                          hint=typo or did_you_mean(name, known) or f"columns here: {', '.join(known)}")

    def stage_diverse(self, scope, stage: ast.Diverse, state: ChainState, step: str) -> None:
        spec = reg.SAMPLERS.get(stage.method)
        if spec is None:
            raise scope.error(f"unknown sampler {stage.method!r}", stage.method_span,
                              hint=did_you_mean(stage.method, reg.SAMPLERS) or f"samplers: {', '.join(reg.SAMPLERS)}")
        what = f"diverse {stage.method}"
        v = self.bind(scope, spec.params, stage.args, stage.kwargs, stage.span, what)
        if spec.needs_ranked and not state.ranked:
            raise scope.error(f"{what} visits rows in rank order, but nothing is ranked", stage.span,
                              hint="add `rank by EXPR` before it")
        cols = []
        for pname, ctype in spec.column_types.items():
            col = v[pname] = scope.column(v[pname])
            if col not in state.columns:
                raise scope.error(f"{what}: no column {col!r}", stage.span, hint=did_you_mean(col, state.columns))
            if state.columns[col].type != ctype:
                raise scope.error(f"{what}: column {col!r} is {state.columns[col].type}, needs {ctype}", stage.span)
            cols.append(col)
        model = self.stage_embedder(scope, spec.model, stage, what)
        label = f"diverse {stage.method}({_size_text(v['budget'])})" + (f" using {self.g.nodes[model.node]['label']}" if model else "")
        nid = self.op(scope, stage.span, state, "diverse", label, step, columns_in=cols, rowwise=False,
                      cost="model" if model else "cheap", params={"sampler": spec.name, **self.plain(v)})
        if model:
            self.edge(model.node, nid, "model")
        state.ranked = True

    def stage_embedder(self, scope, need, stage, what: str) -> ModelInfo | None:
        """The model after a stage's `using` (a sampler's or dedup's embedder): required when the
        method embeds, refused when it does not."""
        if not need:
            if stage.using is not None:
                raise scope.error(f"{what} uses no model; remove `using`", stage.using.span)
            return None
        if stage.using is None:
            raise scope.error(f"{what} needs a model to embed with: add `using …`", stage.span,
                              hint='e.g. using encoder("sentence-transformers/all-MiniLM-L6-v2")')
        model = self.model(scope, stage.using)
        self.check_model_need(scope, need, model, stage.using.span, what)
        return model

    def stage_dedup(self, scope, stage: ast.Dedup, state: ChainState, step: str) -> None:
        spec = reg.DEDUP_METHODS.get(stage.method)
        if spec is None:
            raise scope.error(f"unknown dedup method {stage.method!r}", stage.method_span,
                              hint=did_you_mean(stage.method, reg.DEDUP_METHODS)
                              or f"methods: {', '.join(reg.DEDUP_METHODS)}")
        what = f"dedup {stage.method}"
        v = self.bind(scope, spec.params, stage.args, stage.kwargs, stage.span, what)
        if "threshold" in v and not 0 < v["threshold"] <= 1:
            at = next((k.value.span for k in stage.kwargs if k.name == "threshold"), stage.span)
            raise scope.error(f"{what}: threshold must lie in (0, 1], got {v['threshold']:g}", at)
        model = self.stage_embedder(scope, spec.model, stage, what)
        against = self.data(scope, stage.against) if stage.against is not None else None
        other = self.g.nodes[against.node]["label"] if against else None
        label = f"dedup {stage.method}" + (f" using {self.g.nodes[model.node]['label']}" if model else "") \
            + (f" against {other}" if other else "")
        nid = self.op(scope, stage.span, state, "dedup", label, step, pick=True, rowwise=False,
                      cost="model" if model else "cheap", params={"method": spec.name, **self.plain(v), "against": other})
        if model:
            self.edge(model.node, nid, "model")
        if against:
            self.edge(against.node, nid, "side", role="against")

    def stage_normalize(self, scope, stage: ast.Normalize, state: ChainState, step: str) -> None:
        column = scope.column(stage.column)
        col = state.columns.get(column)
        if col is None:
            raise scope.error(f"normalize: no column {column!r}", stage.span, hint=did_you_mean(column, state.columns))
        if col.type != "tags":
            raise scope.error(f"normalize works on tags, but {column!r} is {col.type}", stage.span)
        v = self.bind(scope, reg.TAG_NORMALIZE_PARAMS, (), stage.kwargs, stage.span, "normalize")
        sem: ModelInfo | None = v.get("semantic")
        if sem is not None:
            self.check_model_need(scope, "embedder", sem, stage.span, "normalize")
        nid = self.op(scope, stage.span, state, "normalize", f"normalize {column}", step,
                      columns_in=[column], rowwise=False, params={"column": column, **self.plain(v)})
        if sem is not None:
            self.edge(sem.node, nid, "model")

    def stage_combine(self, scope, stage: ast.Combine, state: ChainState, step: str) -> None:
        other = scope.selects.get(stage.selection)
        scope.used.add(stage.selection)
        if other is None:
            raise scope.error(f"unknown selection {stage.selection!r}", stage.span,
                              hint=did_you_mean(stage.selection, scope.selects) or f"declare it: select {stage.selection} = use RECIPE")
        nid = self.op(scope, stage.span, state, stage.op, f"{stage.op} {stage.selection}", step, pick=True,
                      rowwise=False, params={"selection": stage.selection})
        self.edge(other, nid, "selection")
        if stage.op == "union":
            state.ranked = False

    def stage_use(self, scope, stage: ast.Use, state: ChainState, step: str) -> None:
        try:
            path, text = self.resolver(stage.recipe, stage.is_path, scope.recipe)
        except LookupError as err:
            raise scope.error(f"no recipe {stage.recipe!r}", stage.span, hint=str(err.args[0]) if err.args else None)
        key = str(Path(path).resolve())
        builtin = builtin_recipe_dir() / f"{stage.recipe}.tamis"
        shadows = not stage.is_path and builtin.is_file() and Path(path).resolve() != builtin.resolve()
        self.g.graph.setdefault("uses", []).append({"recipe": stage.recipe, "path": path, "line": stage.span.line,
                                                    "shadows_builtin": shadows})
        if shadows:
            self.g.graph.setdefault("warnings", []).append(
                f"{scope.recipe.path or '<recipe>'}:{stage.span.line}: `use {stage.recipe}` splices {path}, "
                f"not the built-in recipe {stage.recipe!r} (a local file of that name shadows it)")
        if key in self._stack:
            chain = " → ".join(Path(k).stem for k in self._stack[self._stack.index(key):] + [key])
            raise scope.error(f"composition cycle: {chain}", stage.span)
        other = self.bind_params(scope, parse(text, path), stage.args, stage.kwargs, stage.span)
        self._stack.append(key)
        self._splices.append([])
        try:
            inner = Scope(other, prefix=f"{other.name or Path(path).stem}:{step}.",
                          column_prefix=scope.column_prefix + (f"{stage.alias}." if stage.alias else ""))
            self.declare(inner)
            self.pipeline(inner, other.pipeline, state, step_prefix="")
            self.warn_unused(inner)
        except RecipeError as err:
            if err.path == path:  # an error inside the spliced file: say where it was spliced too
                err.notes.append(scope.error(f"in recipe {stage.recipe!r}, spliced here", stage.span).render())
            raise
        finally:
            self._stack.pop()
            inner_splices = self._splices.pop()
        # a spliced recipe is reproducible when it has its own code, or when everything it splices is
        reproducible = bool(other.code) or (bool(inner_splices) and all(inner_splices))
        self._splices[-1].append(reproducible)
        self.g.graph.setdefault("used_reproducible", {})[other.name or path] = reproducible

    # ---- expressions -------------------------------------------------------------
    def expr_type(self, scope: Scope, e: ast.Expr, state: ChainState) -> tuple[str, list[str], bool]:
        """(type, columns read, aggregates over rows) of an expression, or a RecipeError at the culprit."""
        cols: list[str] = []
        agg = [False]

        def t(x: ast.Expr) -> str:
            if isinstance(x, ast.Number):
                return "float"
            if isinstance(x, ast.Percent):
                raise scope.error("a percentage is a size (for top, sample, budgets); write a plain number here",
                                  x.span, hint=f"write {x.value / 100:g}")
            if isinstance(x, ast.Bool):
                return "bool"
            if isinstance(x, ast.String):
                return "text"
            if isinstance(x, ast.Name):
                col = state.columns.get(x.id) or self.field_or_error(scope, x.id, x.span, state)
                if col.dataset is not None:
                    raise scope.error(f"column {x.id!r} holds scores of dataset {col.dataset}, not of these rows",
                                      x.span, hint="use it inside influence(...) or win_rate(...)")
                cols.append(x.id)
                return col.type
            if isinstance(x, ast.Call):
                return call(x)
            if isinstance(x, ast.BinOp):
                for side in (x.left, x.right):
                    st = t(side)
                    if st not in ("float", "any"):
                        raise scope.error(f"`{x.op}` needs numbers, but {side.unparse()} is {st}", side.span)
                return "float"
            if isinstance(x, ast.Neg):
                st = t(x.operand)
                if st not in ("float", "any"):
                    raise scope.error(f"`-` needs a number, but {x.operand.unparse()} is {st}", x.operand.span)
                return "float"
            if isinstance(x, ast.Compare):
                lt, rt = t(x.left), t(x.right)
                if "any" in (lt, rt) or (lt == rt and lt in ("text", "group") and x.op in ("==", "!=")):
                    return "bool"  # a pool field whose type is not known yet is checked at run time
                if {lt, rt} <= {"text", "group"} and lt != rt and x.op in ("==", "!="):
                    return "bool"  # a cluster id against its written value, e.g. cluster == "3"
                for side, st in ((x.left, lt), (x.right, rt)):
                    if st not in ("float", "bool", "group"):
                        raise scope.error(f"`{x.op}` compares numbers, but {side.unparse()} is {st}", side.span)
                return "bool"
            if isinstance(x, ast.BoolOp):
                for side in (x.left, x.right):
                    if t(side) not in ("bool", "any"):
                        raise scope.error(f"`{x.op}` needs conditions, but {side.unparse()} is not one", side.span)
                return "bool"
            if isinstance(x, ast.Not):
                if t(x.operand) not in ("bool", "any"):
                    raise scope.error("`not` needs a condition", x.operand.span)
                return "bool"
            if isinstance(x, ast.ListExpr):
                raise scope.error("a list is not a value a row can hold", x.span)
            if isinstance(x, ast.DictExpr):
                raise scope.error("a {…} mapping is not a value a row can hold", x.span,
                                  hint="mappings are for stage options, e.g. top 1000 per source with weights={…}")
            raise AssertionError(type(x))

        def call(x: ast.Call) -> str:
            spec = reg.FUNCTIONS.get(x.func)
            if spec is None:
                if x.func in reg.SCORERS:
                    raise scope.error(f"{x.func!r} is a scorer: run it as a stage", x.func_span,
                                      hint=f"score {x.func} using … | let … = … {x.func} …")
                raise scope.error(f"unknown function {x.func!r}", x.func_span,
                                  hint=did_you_mean(x.func, reg.FUNCTIONS) or f"functions: {', '.join(reg.FUNCTIONS)}")
            if x.kwargs:
                raise scope.error(f"{x.func}(...) takes no keyword arguments", x.kwargs[0].span)
            if not len(spec.args) - spec.optional <= len(x.args) <= len(spec.args):
                n = f"{len(spec.args) - spec.optional} to {len(spec.args)}" if spec.optional else str(len(spec.args))
                raise scope.error(f"{x.func}(...) takes {n} argument(s), got {len(x.args)}", x.span)
            agg[0] = agg[0] or spec.aggregate
            if x.per is not None:
                if not spec.aggregate:
                    raise scope.error(f"{x.func}(...) is computed row by row: `per` groups only functions over rows "
                                      f"({', '.join(f for f, v in reg.FUNCTIONS.items() if v.aggregate)})", x.span)
                cols.append(self.group_column(scope, x.per, x.span, state, f"{x.func}(...) per"))
            for kind, a in zip(spec.args, x.args):
                if kind == "foreign":
                    if isinstance(a, ast.Name) and a.id not in state.columns and "." in a.id:
                        # `t.subtask`: a field of the dataset whose scores column `t` holds (checked at run time)
                        owner = state.columns.get(a.id.rsplit(".", 1)[0])
                        if owner is not None and owner.dataset is not None:
                            state.columns[a.id] = Column("any", owner.dataset)
                    if not isinstance(a, ast.Name) or a.id not in state.columns or state.columns[a.id].dataset is None:
                        raise scope.error(f"{x.func}(...): argument {a.unparse()} must be a score of another dataset "
                                          "(score … on DATA as NAME)", a.span)
                    cols.append(a.id)
                    agg[0] = True
                    continue
                at = t(a)
                want = {"num": ("float", "bool"), "vector": ("vector",), "tags": ("tags",), "any": None}[kind]
                if want is not None and at not in want and at != "any":
                    raise scope.error(f"{x.func}(...) needs {'a number' if kind == 'num' else kind}, "
                                      f"but {a.unparse()} is {at}", a.span)
            return spec.returns

        typ = t(e)
        return typ, cols, agg[0]


def _grouped(per: str | None, weights: dict | None) -> dict:
    """A stage's grouping parameters, present only when given (ungrouped stages keep their old keys)."""
    return {**({"per": per} if per else {}), **({"weights": weights} if weights else {})}


def _size_text(size) -> str:
    if isinstance(size, dict) and "fraction" in size:
        return f"{size['fraction'] * 100:g}%"
    if isinstance(size, dict):
        return str(size["count"])
    return str(size)


def lower(recipe: ast.Recipe, resolver: Resolver = default_resolver,
          pool_fields: dict[str, str] | None = None, params: tuple[ast.Kwarg, ...] = ()) -> nx.DiGraph:
    return Lowerer(resolver, pool_fields, params).lower(recipe)

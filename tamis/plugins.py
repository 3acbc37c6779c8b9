"""User operators in Python: scorers, samplers, expression functions and judge prompts.

A plug-in is a Python file (``--plugins my_ops.py`` on any command) or an installed package
that names a module in the entry-point group ``tamis.plugins``. Loading user code is only
ever explicit: a recipe can never load a plug-in, it can only use names one registered.

Each decorator registers the two halves every built-in has: the front end's declaration
(`tamis.dsl.registry`: parameters, columns, the model it needs — so `check` validates it
and `feasibility` counts it) and the runtime kernel (`tamis.ops`: the function, its cache
key, schema, mode). A plug-in's cached scores are keyed by its declared parameters and a
digest of its file, so editing the file rescores.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import re
import sys
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import polars as pl

from tamis.dsl import registry as reg
from tamis.errors import PluginError
from tamis.ops.kernel import ExecOptions, Kernel, Resources, register, unregister

__all__ = ["Param", "REQUIRED", "function", "judge_prompt", "load_entry_points", "load_plugin_file", "load_plugins",
           "sampler", "scorer"]

Param = reg.Param
REQUIRED = reg.REQUIRED
ENTRY_POINT_GROUP = "tamis.plugins"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_DTYPES: dict[str, pl.DataType] = {"float": pl.Float64, "bool": pl.Boolean, "text": pl.String,
                                   "tags": pl.List(pl.String), "vector": pl.List(pl.Float32)}
_MODEL_NEEDS = ("llm", "local_llm", "embedder", "encoder")
R_NO_VALUE = "plug-in gave no value"
R_NOT_FINITE = "plug-in gave a value that is not a finite number"

# (family, name) -> the file that registered it; a plug-in may re-register its own names (a reload)
_REGISTERED: dict[tuple[str, str], str] = {}
_FRONT_END: dict[tuple[str, str], Callable[[], None]] = {}  # how to take each declaration back


# --------------------------------------------------------------------------- loading


def load_plugins(paths: list[str | Path] | None = None, *, entry_points: bool = True) -> None:
    """The plug-ins named on the command line, then those of installed packages."""
    if entry_points:
        load_entry_points()
    for p in paths or []:
        load_plugin_file(p)


def load_plugin_file(path: str | Path) -> None:
    path = Path(path)
    if path.suffix != ".py" or not path.is_file():
        raise PluginError(f"--plugins {path}: not a Python file (.py)")
    digest = hashlib.blake2b(path.read_bytes(), digest_size=8).hexdigest()
    name = f"tamis_plugin_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except PluginError:
        sys.modules.pop(name, None)
        raise
    except Exception as err:  # the user's code: say where it broke, in their file
        sys.modules.pop(name, None)
        frames = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename) == path]
        where = f"{path}:{frames[-1].lineno}" if frames else str(path)
        if isinstance(err, SyntaxError) and err.lineno:
            where = f"{path}:{err.lineno}"
        raise PluginError(f"{where}: loading the plug-in failed: {type(err).__name__}: {err}") from None


def load_entry_points() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except PluginError:
            raise
        except Exception as err:
            raise PluginError(f"plug-in package entry point {ep.name!r} ({ep.value}): {type(err).__name__}: {err}") from None


def forget_plugins() -> None:
    """Take back everything plug-ins registered (for tests, and long-lived processes)."""
    from tamis.runtime.judge_prompts import JUDGE_PROMPTS

    for (family, name), undo in list(_FRONT_END.items()):
        undo()
        if family == "judge_prompt":
            JUDGE_PROMPTS.pop(name, None)
        else:
            unregister(family, name)  # type: ignore[arg-type]
    _FRONT_END.clear()
    _REGISTERED.clear()
    _sync_judge_prompt_choices()


# --------------------------------------------------------------------------- helpers


def _source_of(fn: Callable) -> tuple[str, str]:
    """(where it is defined, digest of that file): the digest keys the plug-in's cache."""
    try:
        file = inspect.getsourcefile(fn) or "<unknown>"
        data = Path(file).read_bytes()
    except (TypeError, OSError):
        file, data = getattr(fn, "__module__", "<unknown>"), inspect.getsource(fn).encode() if callable(fn) else b""
    return file, hashlib.blake2b(data, digest_size=16).hexdigest()


def _claim(family: str, name: str, file: str, taken: Mapping[str, Any]) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise PluginError(f"{file}: {family} name {name!r} must be a name: letters, digits and _, not starting with a digit")
    owner = _REGISTERED.get((family, name))
    if name in taken and owner != file:
        by = f"the plug-in {owner}" if owner else "tamis itself"
        raise PluginError(f"{file}: a {family} named {name!r} already exists (from {by}); choose another name")


def _params(file: str, what: str, params: Mapping[str, Any] | None) -> tuple[reg.Param, ...]:
    out = []
    for pname, default in (params or {}).items():
        if not _NAME.match(pname) or pname in ("rows", "model", "budget", "options"):
            raise PluginError(f"{file}: {what}: {pname!r} cannot be a parameter name")
        if isinstance(default, reg.Param):
            out.append(replace(default, name=pname))
        elif isinstance(default, bool):
            out.append(reg.Param(pname, "bool", default))
        elif isinstance(default, int) and default > 0:
            out.append(reg.Param(pname, "count", default))
        elif isinstance(default, (int, float)):
            out.append(reg.Param(pname, "number", float(default)))
        elif isinstance(default, str):
            out.append(reg.Param(pname, "string", default))
        elif isinstance(default, (list, tuple)):
            out.append(reg.Param(pname, "list", list(default)))
        elif default is REQUIRED:
            raise PluginError(f"{file}: {what}: a required parameter needs its type: "
                              f"params={{{pname!r}: tamis.Param({pname!r}, \"number\")}}")
        else:
            raise PluginError(f"{file}: {what}: parameter {pname!r}: default {default!r} is not a number, string, "
                              "bool or list; declare it with tamis.Param(name, type, default)")
    return tuple(out)


def _check_signature(fn: Callable, file: str, what: str, leading: tuple[str, ...], params: tuple[reg.Param, ...]) -> bool:
    """The function must take the leading arguments and every declared parameter; say so now,
    not after an hour of scoring. Returns whether it wants `options`."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as err:
        raise PluginError(f"{file}: {what}: cannot read the function's signature: {err}") from None
    wants = "options" in sig.parameters
    try:
        sig.bind(*([None] * len(leading)), **{p.name: None for p in params}, **({"options": None} if wants else {}))
    except TypeError as err:
        shown = ", ".join([*leading, *(p.name for p in params)])
        raise PluginError(f"{file}: {what}: the function must accept ({shown}): {err}") from None
    return wants


def _need(file: str, what: str, model: str | None) -> str | None:
    if model is not None and model not in _MODEL_NEEDS:
        raise PluginError(f"{file}: {what}: model={model!r} must be one of {', '.join(map(repr, _MODEL_NEEDS))} "
                          "or None (no model)")
    return model


def _remember(family: str, name: str, file: str, undo: Callable[[], None]) -> None:
    _REGISTERED[(family, name)] = file
    _FRONT_END.setdefault((family, name), undo)  # a reload keeps the first undo: back to what tamis had


# --------------------------------------------------------------------------- scorers


def scorer(name: str, *, model: str | None = None, params: Mapping[str, Any] | None = None,
           columns: Mapping[str, str] | None = None, doc: str = "", cached: bool | None = None,
           rowwise: bool = True, resources: Resources | None = None) -> Callable[[Callable], Callable]:
    """Register a scorer: ``fn(rows, model, **params) -> values``.

    `columns` maps column suffixes to types ("float", "bool", "text", "tags", "vector"); ""
    is the main column, named by the scorer (or `as`). The function returns one value per
    row: a list, numpy array or Polars Series when there is one column, else a dict by suffix.
    A None (or a NaN) is a null score; an optional "_reason" entry says why. `model`: None,
    "llm", "local_llm", "encoder" or "embedder" (what `using …` must give). Scores are cached
    when the scorer uses a model (or `cached=True`).
    """
    columns = dict(columns or {"": "float"})

    def wrap(fn: Callable) -> Callable:
        file, digest = _source_of(fn)
        what = f"scorer {name!r}"
        _claim("scorer", name, file, reg.SCORERS)
        need = _need(file, what, model)
        if "" not in columns:
            raise PluginError(f"{file}: {what}: columns must include the main column \"\" (e.g. {{\"\": \"float\"}})")
        for suffix, ctype in columns.items():
            if ctype not in _DTYPES:
                raise PluginError(f"{file}: {what}: column type {ctype!r} must be one of {', '.join(_DTYPES)}")
            if suffix and (not suffix.startswith("_") or not _NAME.match(suffix) or suffix == "_reason"):
                raise PluginError(f"{file}: {what}: column suffix {suffix!r} must look like \"_name\" (and not \"_reason\")")
        declared = _params(file, what, params)
        _check_signature(fn, file, what, ("rows", "model"), declared)
        spec = reg.ScorerSpec(name, doc or (fn.__doc__ or "").strip().split("\n")[0] or f"plug-in scorer from {file}",
                              dict(columns), need, declared, rowwise=rowwise, cost="model" if need else "cheap",
                              source=file)
        results = {("value" if s == "" else s): s for s in columns}
        schema = {r: _DTYPES[columns[s]] for r, s in results.items()}
        run = _named(_scorer_runner(fn, name, file, results, schema), fn)
        k = Kernel("scorer", name, run, mode="rowwise" if rowwise else "global",
                   cached=bool(need) if cached is None else cached, key_params=tuple(p.name for p in declared),
                   schema={**schema, "reason": pl.String}, names={**results, "reason": "_reason"},
                   resources=resources or Resources(device="any" if need else "cpu"), source=file, source_hash=digest)
        previous = reg.SCORERS.get(name)
        reg.SCORERS[name] = spec
        register(k, replace=True)
        _remember("scorer", name, file, lambda: _restore(reg.SCORERS, name, previous))
        return fn
    return wrap


def _named(run: Callable, fn: Callable) -> Callable:
    """The runner shows as the user's function (in `explain`, in tracebacks)."""
    run.__name__ = run.__qualname__ = getattr(fn, "__name__", run.__name__)
    run.__doc__ = fn.__doc__
    return run


def _restore(table: dict, name: str, previous: Any) -> None:
    if previous is None:
        table.pop(name, None)
    else:
        table[name] = previous


def _scorer_runner(fn: Callable, name: str, file: str, results: dict[str, str], schema: dict[str, pl.DataType]):
    wants = "options" in inspect.signature(fn).parameters

    def run(rows: pl.DataFrame, model: Any, options: ExecOptions, **params: Any) -> dict:
        try:
            got = fn(rows, model, **params, **({"options": options} if wants else {}))
        except Exception as err:
            raise PluginError(f"plug-in scorer {name!r} ({file}) failed: {type(err).__name__}: {err}") from err
        if not isinstance(got, Mapping):
            got = {"": got}
        unknown = [k for k in got if k not in results.values() and k != "_reason"]
        if unknown:
            raise PluginError(f"plug-in scorer {name!r} ({file}) returned column(s) {unknown} it did not declare")
        out: dict[str, list] = {}
        reasons = _as_list(got.get("_reason"), rows.height, name, file, "_reason") or [None] * rows.height
        for result, suffix in results.items():
            if suffix not in got:
                raise PluginError(f"plug-in scorer {name!r} ({file}) returned no {suffix or 'main'!r} column")
            values = _as_list(got[suffix], rows.height, name, file, suffix)
            if schema[result] == pl.Float64:
                values = [_finite(v, i, reasons, name, file) for i, v in enumerate(values)]
            out[result] = values
        main = out["value"]
        out["reason"] = [r if r is not None else (R_NO_VALUE if main[i] is None else None)
                         for i, r in enumerate(reasons)]
        for result, dtype in schema.items():  # a wrong type is the plug-in's error, named, not Polars'
            try:
                pl.Series(out[result], dtype=dtype, strict=True)
            except (TypeError, pl.exceptions.PolarsError) as err:
                raise PluginError(f"plug-in scorer {name!r} ({file}): column {results[result] or 'main'!r} must hold "
                                  f"{dtype} values: {err}") from None
        return out
    return run


def _as_list(values: Any, n: int, name: str, file: str, col: str) -> list | None:
    if values is None:
        return None
    if isinstance(values, pl.Series):
        values = values.to_list()
    elif hasattr(values, "tolist"):
        values = values.tolist()
    else:
        values = list(values)
    if len(values) != n:
        raise PluginError(f"plug-in scorer {name!r} ({file}) returned {len(values)} value(s) in "
                          f"{col or 'its main column'!r} for {n} row(s)")
    return values


def _finite(v: Any, i: int, reasons: list, name: str, file: str) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise PluginError(f"plug-in scorer {name!r} ({file}): row {i}: {v!r} is not a number") from None
    if not math.isfinite(f):
        reasons[i] = reasons[i] or R_NOT_FINITE
        return None
    return f


# --------------------------------------------------------------------------- samplers


def sampler(name: str, *, model: str | None = None, params: Mapping[str, Any] | None = None, doc: str = "",
            needs_ranked: bool = False, resources: Resources | None = None,
            reads: Sequence[str] | None = None) -> Callable[[Callable], Callable]:
    """Register a sampler: ``fn(rows, model, budget, **params) -> positions of the rows to keep``
    (in the order picked, at most `budget`). `needs_ranked`: it visits rows in rank order. `reads`: the
    only columns of `rows` it reads; then the Ray engine gathers just those (the rows stay on its
    workers) and `rows` holds only them. Left out, it may read any column, and runs on the driver's path."""
    def wrap(fn: Callable) -> Callable:
        file, digest = _source_of(fn)
        what = f"sampler {name!r}"
        _claim("sampler", name, file, reg.SAMPLERS)
        need = _need(file, what, model)
        declared = _params(file, what, params)
        wants = _check_signature(fn, file, what, ("rows", "model", "budget"), declared)
        spec = reg.SamplerSpec(name, doc or (fn.__doc__ or "").strip().split("\n")[0] or f"plug-in sampler from {file}",
                               (reg.Param("budget", "size", doc="how many rows to keep"), *declared), need,
                               needs_ranked=needs_ranked, source=file)

        def run(rows, model, budget, options: ExecOptions, **p):
            try:
                return fn(rows, model, budget, **p, **({"options": options} if wants else {}))
            except Exception as err:
                raise PluginError(f"plug-in sampler {name!r} ({file}) failed: {type(err).__name__}: {err}") from err

        previous = reg.SAMPLERS.get(name)
        reg.SAMPLERS[name] = spec
        register(Kernel("sampler", name, _named(run, fn), mode="global", resources=resources or Resources(), source=file,
                        source_hash=digest, reads=tuple(reads) if reads is not None else None), replace=True)
        _remember("sampler", name, file, lambda: _restore(reg.SAMPLERS, name, previous))
        return fn
    return wrap


# --------------------------------------------------------------------------- functions


def function(name: str, *, args: tuple[str, ...] = ("num",), returns: str = "float", doc: str = "",
             aggregate: bool = False, series: bool = False) -> Callable[[Callable], Callable]:
    """Register a function for `let`/`where`/`rank by` expressions.

    By default the function takes and returns Polars expressions (fast, lazy). With
    `series=True` it takes and returns Polars Series (numpy-friendly); it then sees all the
    current rows at once, so declare `aggregate=True` if a row's value depends on others.
    `args`: "num" (a number or condition), "tags", "vector" or "any" per argument.
    """
    def wrap(fn: Callable) -> Callable:
        file, digest = _source_of(fn)
        what = f"function {name!r}"
        _claim("function", name, file, reg.FUNCTIONS)
        if returns not in ("float", "bool"):
            raise PluginError(f"{file}: {what}: returns={returns!r} must be \"float\" or \"bool\"")
        bad = [a for a in args if a not in ("num", "tags", "vector", "any")]
        if bad:
            raise PluginError(f"{file}: {what}: argument kinds {bad} must be \"num\", \"tags\", \"vector\" or \"any\"")
        dtype = pl.Float64 if returns == "float" else pl.Boolean
        if series:
            def run(*exprs: pl.Expr) -> pl.Expr:
                return pl.map_batches(list(exprs), lambda s: pl.Series(fn(*s), dtype=dtype), return_dtype=dtype)
        else:
            run = fn
        run = _named(run, fn) if series else fn
        spec = reg.FunctionSpec(name, doc or (fn.__doc__ or "").strip().split("\n")[0] or f"plug-in function from {file}",
                                tuple(args), returns, aggregate=aggregate)
        previous = reg.FUNCTIONS.get(name)
        reg.FUNCTIONS[name] = spec
        register(Kernel("function", name, run, mode="global" if aggregate else "rowwise", source=file,
                        source_hash=digest), replace=True)
        _remember("function", name, file, lambda: _restore(reg.FUNCTIONS, name, previous))
        return fn
    return wrap


# --------------------------------------------------------------------------- judge prompts


def judge_prompt(name: str, *, system: str, template: str, request: str = "") -> Callable[[Callable], Callable]:
    """Register a judge prompt for `score rating … with prompt="NAME"`, decorating its parse rule.

    The judge gets `system` as the system message and `template` (``{instruction}``,
    ``{input}``, ``{output}`` filled from the row) followed by `request` as the user message.
    It stops at the end of its first line, so ask for the score first; the decorated function
    turns that line into a number, or None when there is none (a null score with a reason).
    """
    from tamis.runtime.judge_prompts import JUDGE_PROMPTS, JudgePrompt

    def wrap(parse: Callable[[str], Any]) -> Callable:
        file, digest = _source_of(parse)
        _claim("judge_prompt", name, file, JUDGE_PROMPTS)
        try:
            template.format_map({"instruction": "", "input": "", "output": ""})
        except (KeyError, IndexError, ValueError) as err:
            raise PluginError(f"{file}: judge prompt {name!r}: the template may only use {{instruction}}, {{input}} "
                              f"and {{output}} (double other braces): {err!r}") from None

        def rule(line: str) -> tuple[float | None, str | None]:
            try:
                value = parse(line)
            except Exception as err:
                return None, f"parse rule of {name!r} failed: {type(err).__name__}"
            if value is None:
                return None, f"parse rule of {name!r} found no score"
            try:
                f = float(value)
            except (TypeError, ValueError):
                return None, f"parse rule of {name!r} gave {value!r}, not a number"
            return (f, None) if math.isfinite(f) else (None, f"parse rule of {name!r} gave a non-finite number")

        JUDGE_PROMPTS[name] = JudgePrompt(name, system, template, request, parse=rule, version=digest, source=file)
        _remember("judge_prompt", name, file, lambda: None)
        _sync_judge_prompt_choices()
        return parse
    return wrap


def _sync_judge_prompt_choices() -> None:
    """`rating`'s prompt= accepts every registered prompt (so `check` suggests plug-in prompts too)."""
    from tamis.runtime.judge_prompts import JUDGE_PROMPTS

    spec = reg.SCORERS.get("rating")
    if spec is None:
        return
    params = tuple(replace(p, choices=tuple(JUDGE_PROMPTS)) if p.name == "prompt" else p for p in spec.params)
    reg.SCORERS["rating"] = replace(spec, params=params)

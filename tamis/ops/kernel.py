"""The kernel interface: what the runtime needs to know to run one registry entry.

The front end's registry (`tamis.dsl.registry`) declares what a name *means* to a recipe:
its parameters, the columns it produces, the model it needs. A kernel is the other half:
one plain function that computes it, and what an engine needs to run that function —
the parameters that key its cache, its output schema, whether it works row by row
(chunkable, cacheable, parallel) or needs all rows at once, and its resources.

Kernels hold no engine state, so the local executor and a distributed one call the same
functions. Contracts by family (`params` are the entry's declared parameters, by name):

  scorer    fn(rows, model, **params[, options]) -> {result column: values}   (row-wise)
  sampler   fn(rows, model, budget, **params[, options]) -> [row positions]  (global)
  function  fn(*args: pl.Expr) -> pl.Expr                                   (row-wise or aggregate)
  model     fn(params, env: BuildEnv) -> Built                               (driver side)
  data      fn(params, env: BuildEnv) -> pl.DataFrame                        (driver side)
  dedup     fn(rows, against rows | None, **params[, options]) -> DedupResult   (global)

A kernel that names a parameter `options` receives the run's `ExecOptions` (batch size,
progress bars, device): how to run, never what to compute, so never part of a cache key.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

import polars as pl

Family = Literal["scorer", "sampler", "function", "model", "data", "dedup"]
Mode = Literal["rowwise", "global"]


@dataclass(frozen=True)
class Resources:
    """What one worker running the kernel needs (Ray actors are sized from this)."""

    device: Literal["cpu", "any"] = "cpu"  # "any": a GPU when there is one, else the CPU
    memory_per_row: int = 0  # rough working memory per row in flight, bytes (0: negligible)
    cpus: float = 1.0

    def describe(self) -> str:
        dev = "cpu" if self.device == "cpu" else "gpu|cpu"
        mem = f", ~{_bytes(self.memory_per_row)}/row" if self.memory_per_row else ""
        return f"{dev}{mem}"


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return str(n)


@dataclass(frozen=True)
class ExecOptions:
    """How a run executes (never what it computes): given to kernels that ask for `options`."""

    device: str = "auto"
    dtype: str = "auto"
    batch_tokens: int | None = None
    progress: bool = True
    pfm: str | None = None
    model_paths: Mapping[str, str] = field(default_factory=dict)
    api_base: str | None = None
    cache_dir: str | None = None  # the run's cache root (GGUF conversions land there too)
    api_max_wait: float = 120.0  # seconds of retry waits one endpoint request may spend
    api_max_failures: int = 3  # failed endpoint requests in a row that stop the run


@dataclass(frozen=True)
class Kernel:
    family: Family
    name: str
    fn: Callable[..., Any]
    mode: Mode = "rowwise"
    cached: bool = False  # results persist in the content-addressed score cache, chunk by chunk
    key_params: tuple[str, ...] = ()  # the semantic parameters that key the cache
    # constants in the key (a decoding version, a prompt's text): a mapping, or a function of the
    # parameters giving one (so the text can live in a module that is only imported to run)
    key_extra: Mapping[str, Any] | Callable[[Mapping[str, Any]], Mapping[str, Any]] = field(default_factory=dict)
    schema: Mapping[str, pl.DataType] = field(default_factory=dict)  # result column -> dtype (scorers)
    names: Mapping[str, str] = field(default_factory=dict)  # result column -> stage column suffix ("" = main)
    resources: Resources = Resources()
    source: str = ""  # where it is defined: a module, or a plug-in file
    source_hash: str | None = None  # plug-ins: digest of the defining file, part of every cache key
    # model kernels: a check run at plan time, before any work ((params, options) -> problem or None)
    plan_check: Callable[[Mapping[str, Any], ExecOptions], str | None] | None = None
    # scorers whose result types depend on the model (an embedding's width): (model, params) -> schema
    schema_for: Callable[[Any, Mapping[str, Any]], Mapping[str, pl.DataType]] | None = None
    # samplers: columns the engine fills before the call with a scorer's values, computed through
    # the score cache ({column: model -> (scorer name, its parameters)}), e.g. the candidates' embeddings
    scored_inputs: Mapping[str, Callable[[Any], tuple[str, dict[str, Any]]]] = field(default_factory=dict)
    # global kernels: the columns of their rows they read besides the scored inputs (() for a sampler of
    # embeddings alone), or a function of the stage's parameters giving them (a column the recipe names);
    # None: any column, so the Ray engine hands them the whole frame on the driver
    reads: tuple[str, ...] | Callable[[Mapping[str, Any]], Sequence[str]] | None = None

    def result_schema(self, model: Any, params: Mapping[str, Any]) -> dict[str, pl.DataType]:
        """The result columns' types for this model: the declared ones, or what `schema_for` says."""
        return dict(self.schema_for(model, params)) if self.schema_for else dict(self.schema)

    def columns_read(self, params: Mapping[str, Any]) -> tuple[str, ...] | None:
        """The columns this global kernel reads for a stage's parameters (see `reads`); None: any."""
        return tuple(self.reads(params)) if callable(self.reads) else self.reads

    @property
    def wants_options(self) -> bool:
        try:
            return "options" in inspect.signature(self.fn).parameters
        except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
            return False

    def cache_key(self, params: Mapping[str, Any], model_fingerprint: str | None) -> dict[str, Any]:
        """What a cached score is keyed by: the semantic parameters, the model, the code version."""
        key: dict[str, Any] = {"op": "score", "scorer": self.name,
                               **{p: params.get(p) for p in self.key_params},
                               **(self.key_extra(params) if callable(self.key_extra) else self.key_extra),
                               "model": model_fingerprint}
        if self.source_hash:
            key["plugin"] = self.source_hash
        return key

    def describe(self) -> dict[str, Any]:
        """For `explain` (text and JSON)."""
        return {"kernel": f"{self.source}:{getattr(self.fn, '__name__', self.name)}", "mode": self.mode,
                "cached": self.cached, "resources": {"device": self.resources.device,
                                                     "memory_per_row": self.resources.memory_per_row,
                                                     "cpus": self.resources.cpus}}


@dataclass
class Lazy:
    """A model or dataset a builder may need: built only when `get()` is called."""

    node: str
    ctor: str  # the model constructor, or the dataset's source
    label: str
    params: Mapping[str, Any]
    get: Callable[[], Any]


@dataclass
class BuildEnv:
    """What a model or data kernel may use: its inputs (lazily), the pool, the artifact cache."""

    label: str
    options: ExecOptions
    pool: pl.DataFrame
    artifacts: Any  # tamis.runtime.cache.ArtifactCache
    bases: list[Lazy] = field(default_factory=list)  # models it starts from
    inputs: list[Lazy] = field(default_factory=list)  # datasets it is trained on or derived from
    models: list[Lazy] = field(default_factory=list)  # models that derive a dataset
    labels: list[Lazy] = field(default_factory=list)  # probe models whose losses label a fitted predictor
    evaluation: list[Lazy] = field(default_factory=list)  # the set probe models are evaluated on
    # what the run report says of a built dataset (a data kernel fills it: evolve's counts)
    report: dict[str, Any] = field(default_factory=dict)
    # the recipe's columns computed for other rows: (rows, names) -> frame of id and those columns
    columns: Callable[[pl.DataFrame, Sequence[str]], pl.DataFrame] | None = None
    # the engine's way of running independent probe trainings (tamis.runtime.probes.ProbeMap); None: in turn, here
    map_probes: Callable[..., Any] | None = None
    # the pool's content hash (`data_fingerprint`), from an engine that does not hold the pool; None: of `pool`
    pool_key: Callable[[], str] | None = None

    def pool_fingerprint(self) -> str:
        """`data_fingerprint` of the whole pool: what keys a model built from the pool (a warmup)."""
        if self.pool_key is not None:
            return self.pool_key()
        from tamis.runtime.cache import data_fingerprint

        return data_fingerprint(self.pool)


@dataclass
class Built:
    """A model kernel's result: the model, what the run report says of it, and any training summary."""

    model: Any
    info: dict[str, Any]
    training: dict[str, Any] | None = None


# --------------------------------------------------------------------------- the table

_KERNELS: dict[tuple[str, str], Kernel] = {}


class KernelError(Exception):
    pass


def register(kernel: Kernel, *, replace: bool = False) -> Kernel:
    key = (kernel.family, kernel.name)
    if key in _KERNELS and not replace:
        raise KernelError(f"a {kernel.family} kernel named {kernel.name!r} is already registered "
                          f"(by {_KERNELS[key].source})")
    _KERNELS[key] = kernel
    return kernel


def unregister(family: Family, name: str) -> None:
    _KERNELS.pop((family, name), None)


def kernel_for(family: Family, name: str) -> Kernel | None:
    from tamis import ops  # noqa: F401  (registers the built-in kernels)

    return _KERNELS.get((family, name))


def kernels(family: Family | None = None) -> dict[str, Kernel]:
    from tamis import ops  # noqa: F401

    return {n: k for (f, n), k in _KERNELS.items() if family is None or f == family}


def node_kernel(attrs: Mapping[str, Any]) -> Kernel | None:
    """The kernel an operator node of the graph runs (a scorer's or a sampler's), if any."""
    if attrs.get("op") == "score":
        return kernel_for("scorer", attrs["params"]["scorer"])
    if attrs.get("op") == "diverse":
        return kernel_for("sampler", attrs["params"]["sampler"])
    if attrs.get("op") == "dedup":
        return kernel_for("dedup", attrs["params"]["method"])
    return None


def kernel(family: Family, name: str | None = None, **declared: Any) -> Callable[[Callable], Callable]:
    """Decorator for built-in kernels: `@kernel("scorer", "ifd", cached=True, …)`."""
    def wrap(fn: Callable) -> Callable:
        register(Kernel(family, name or fn.__name__, fn, source=fn.__module__, **declared))
        return fn
    return wrap

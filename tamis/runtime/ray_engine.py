"""The Ray engine: the local executor's plan, with row-wise scoring run as Ray Data pipelines.

`RayExecutor` is the local executor (`LocalExecutor`) with one step replaced: computing the rows
of a row-wise scorer that the score cache does not hold yet. The driver still plans, loads the
pool, binds models, decides what is cached, and runs every global operator (rank, top, where,
samplers, dedup) on its frame; the rows to score go to Ray as Arrow blocks and through
`map_batches`, calling the same kernel (`call_scorer`) as the local engine:

* a kernel without a model runs as Ray tasks (each `Resources.cpus` CPUs);
* a kernel with a model runs in an actor pool: each actor builds the model once
  (`tamis.runtime.ray_models`), with one GPU when the kernel and model can use one and the
  cluster has GPUs, and the memory the kernel declares per row in flight;
* each batch of a cached kernel is written to the score cache by the worker that computed it
  (one Parquet shard per batch; the cache takes concurrent writers), so a run killed midway
  resumes with every finished batch cached;
* a worker that dies (killed, out of memory) is restarted by Ray and its batch run again: Ray
  Data gives its actors `max_restarts=-1, max_task_retries=-1` and its tasks `max_retries=-1`
  (the defaults this engine keeps); the kernels are deterministic, so the result is the same.

Results come back to the driver as ids and result columns only, in any order, and are put back
in row order by id. What runs where is printed by `tamis explain --engine ray`
(`tamis.runtime.ray_plan`).

Two more paths: a cheap recipe (row-wise scorers without a model or cache, `let`/`where`/`rank`/`top`,
`pct`/`zscore`/`minmax`) runs streamed, its pool read and its selection written by Ray Data, the
driver holding only statistics, ranking keys and positions (`tamis.runtime.ray_stream`,
`tamis.runtime.ray_pool`); whatever that path cannot run falls back to the path above, `fallback`
saying why. Probe trainings run as Ray tasks (`tamis.runtime.ray_train`). Each stage report says
where the stage ran (`RayStageReport.engine`).
"""

from __future__ import annotations

import logging
import math
import re
import sys
from dataclasses import dataclass, replace
from typing import Any

import networkx as nx
import polars as pl

from tamis.errors import TamisError
from tamis.ops.kernel import Kernel, kernel_for
from tamis.runtime.executor import LocalExecutor, RunConfig, RunResult, ScoreCall, StageReport

KEY = "⟨key⟩"  # the row key (cache key, or row position) carried beside each row; no recipe name can clash
TASK_BLOCKS_PER_CPU = 4  # blocks per CPU slot for cheap kernels: enough to balance, few enough to be cheap
MAX_BLOCK_ROWS = 200_000  # rows per Arrow block sent to the object store


class RayEngineError(TamisError):
    """Ray is missing, unreachable, or a worker failed for good."""


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local instance; else a cluster's address ("auto", "ray://…")
    concurrency: int | None = None  # actors per model stage (default: one per GPU, else one), or tasks in flight
    num_cpus: int | None = None  # a local instance's CPUs (default: all)
    stream: bool = True  # cheap recipes: the pool read, ranked and written by Ray Data (tamis.runtime.ray_stream)
    train_cpus: int | None = None  # CPUs per training task (probes); default: 1, or a GPU's share where there are GPUs


def ensure_ray(opts: RayOptions) -> bool:
    """Connect to Ray (or start a local instance); True when this call started it (so it stops it)."""
    try:
        import ray
        import ray.data
    except ImportError:  # pragma: no cover - ray is in the `ray` and `test` extras
        raise RayEngineError("--engine ray needs Ray: pip install 'tamis[ray]'") from None
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the stage's own bar counts rows (tqdm), as under the local engine
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if ray.is_initialized():
        return False
    try:
        ray.init(address=opts.address, num_cpus=opts.num_cpus if opts.address is None else None,
                 include_dashboard=False, configure_logging=False, log_to_driver=False)
    except ConnectionError as err:
        raise RayEngineError(f"--address {opts.address}: cannot reach a Ray cluster there ({err})") from None
    return True


@dataclass
class RayStageReport(StageReport):
    engine: str = "driver"  # where the stage ran: "ray" (Ray Data / tasks / actors) or "driver"


class RayExecutor(LocalExecutor):
    """Runs a compiled recipe with its row-wise scorers on Ray (see the module note)."""

    def __init__(self, g: nx.DiGraph, cfg: RunConfig, ray_options: RayOptions | None = None) -> None:
        super().__init__(g, cfg)
        self.ray = ray_options or RayOptions()
        self.ray_stages: list[dict[str, Any]] = []  # how Ray ran each scoring pipeline (kernel, rows, workers)
        self.fallback: str | None = None  # why the streamed path could not run this recipe
        self._node: str | None = None

    def run(self) -> RunResult:
        started = ensure_ray(self.ray)
        streamed = False
        try:
            result = self._with_engine(self._run())
            streamed = not isinstance(result.selected, pl.DataFrame)
            return result
        finally:
            if started and not streamed:  # a streamed result is still on the workers until it is written:
                import ray  # Ray stops at the process's exit (its own atexit hook)

                ray.shutdown()

    def _run(self) -> RunResult:
        """The streamed path where the recipe allows it (the driver never holds the pool), else the
        driver's path with row-wise scoring on Ray; `self.fallback` says why the latter."""
        from tamis.runtime.ray_pool import NeedsDriver
        from tamis.runtime.ray_stream import StreamRun, stream_plan

        if self.ray.stream:
            import ray

            try:
                return StreamRun(self, stream_plan(self.g)).run()
            except ray.exceptions.RayError as err:
                raise RayEngineError(f"a Ray worker failed: {_cause(err)}") from None
            except NeedsDriver as why:
                self.fallback = str(why)
                self.stages, self.ray_stages, self._order = [], [], []
        return super().run()

    def _with_engine(self, result: RunResult) -> RunResult:
        """Each stage report says where the stage ran (`engine`): ray, or the driver."""
        ray_nodes = {s.get("node"): s for s in self.ray_stages if s.get("node")}
        streamed = self.fallback is None and self.ray.stream
        result.stages = [RayStageReport(**vars(s), engine="ray" if streamed or s.node in ray_nodes else "driver")
                         for s in result.stages]
        self.stages = result.stages
        return result

    # ---- the two hooks of the local executor ------------------------------------------
    def _compute_missing(self, key: str, frame: pl.DataFrame, row_keys: pl.Series, todo: pl.Series, schema: dict,
                         report: StageReport, compute) -> list[pl.DataFrame]:
        if not self._distributable(compute) or len(todo) == 0:
            return super()._compute_missing(key, frame, row_keys, todo, schema, report, compute)
        first = todo[0]
        if todo[-1] - first + 1 == len(todo) and todo.is_sorted():  # consecutive rows: a slice, not a gather
            rows, ids = frame.slice(first, len(todo)), row_keys.slice(first, len(todo))
        else:
            rows, ids = frame[todo], row_keys.gather(todo)
        root = None if self.cache.disabled else str(self.cache.scores.root)
        got = self._pipeline(rows.with_columns(ids.alias(KEY)), compute, schema, report, cache=(root, key))
        report.scored_rows += len(todo)
        # back in `todo`'s order (the pipeline returns batches as they finish), every row accounted for
        done = pl.DataFrame([ids]).join(got.rename({KEY: "id"}), on="id", how="left", maintain_order="left")
        return [done]

    def _compute_all(self, frame: pl.DataFrame, compute) -> dict:
        if not self._distributable(compute) or frame.height == 0:
            return super()._compute_all(frame, compute)
        schema = compute.kernel.result_schema(compute.model, compute.params)
        got = self._pipeline(frame.with_row_index(KEY), compute, schema, None, cache=None).sort(KEY)
        return {c: got[c] for c in schema}

    def _run_op(self, n: str) -> None:
        self._node = n  # the stage being run, for what `_compute_all` sends to Ray
        try:
            super()._run_op(n)
        finally:
            self._node = None

    def _probe_map(self, node: str):
        from tamis.runtime.ray_train import probe_map

        return probe_map(self, node)

    @staticmethod
    def _distributable(compute) -> bool:
        return isinstance(compute, ScoreCall) and compute.kernel.mode == "rowwise"

    # ---- one scorer over rows, on Ray ---------------------------------------------------
    def _pipeline(self, rows: pl.DataFrame, call: ScoreCall, schema: dict, report: StageReport | None,
                  cache: tuple[str | None, str] | None) -> pl.DataFrame:
        """Score `rows` (their keys in column KEY) with `call` on Ray: a frame of KEY and `schema`'s columns,
        in no particular order. With `cache` (root, key), each batch is written to the score cache."""
        import ray
        import ray.data

        k = call.kernel
        _ship_plugin_code()
        model_node = self._model_node(call.model)
        slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
        if model_node is None:
            batch = self._task_batch_rows(rows.height, slots)
        else:
            batch = max(1, self.cfg.chunk_rows)
        block = min(MAX_BLOCK_ROWS, max(batch, math.ceil(rows.height / (TASK_BLOCKS_PER_CPU * slots))))
        table = rows.to_arrow()
        blocks = [table.slice(i, block) for i in range(0, table.num_rows, block)]
        ds = ray.data.from_arrow(blocks)
        spec = _BatchSpec(replace(call, model=None, options=replace(call.options, progress=False)), schema,
                          cache[0] if cache else None, cache[1] if cache else None, self.cfg.checkpoint_seconds)
        plan: dict[str, Any] = {"kernel": k.name, "rows": rows.height, "batch_rows": batch, "blocks": len(blocks)}
        if model_node is None:
            ds = ds.map_batches(_score_batch, fn_kwargs={"spec": spec}, batch_format="pyarrow", batch_size=batch,
                                num_cpus=k.resources.cpus,
                                **({"concurrency": self.ray.concurrency} if self.ray.concurrency else {}))
            plan["workers"] = "tasks"
        else:
            from tamis.runtime.ray_models import recipe_for

            recipe = recipe_for(self, model_node)
            gpus, size, memory = _gpus_and_actors(self, k, model_node)
            artifacts = str(self.cache.artifacts.root)
            ds = ds.map_batches(_ScoreActor, fn_constructor_args=(spec, recipe, artifacts, bool(gpus)),
                                batch_format="pyarrow", batch_size=batch, compute=ray.data.ActorPoolStrategy(size=size),
                                num_cpus=k.resources.cpus, num_gpus=gpus, **({"memory": memory} if memory else {}))
            plan.update(workers=f"{size} actor(s)", gpus_per_actor=gpus, model=recipe.describe())
        node = report.node if report else self._node
        self.ray_stages.append({"stage": self.g.nodes[node]["label"] if node else None, "node": node,
                                "where": "ray", **plan})
        if report is not None:
            bar = self._stage_bar(report, total=report.cached_rows + rows.height)
        else:
            bar = None
        parts = []
        try:
            for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                parts.append(pl.from_arrow(out))
                if bar is not None:
                    bar.update(out.num_rows)
        except ray.exceptions.RayError as err:
            raise RayEngineError(f"scorer `{k.name}` failed on a Ray worker: {_cause(err)}") from None
        finally:
            if bar is not None:
                bar.close()
        got = pl.concat(parts, how="vertical") if parts else pl.DataFrame()
        if got.height != rows.height:
            raise RayEngineError(f"scorer `{k.name}`: Ray returned {got.height} row(s) for {rows.height}")
        return got.select(pl.col(KEY), *[pl.col(c).cast(t) for c, t in schema.items()])

    def _task_batch_rows(self, n: int, slots: int) -> int:
        # cheap kernels: few, large batches (per-batch overhead is milliseconds); never below the chunk size
        return max(self.cfg.chunk_rows, min(MAX_BLOCK_ROWS, math.ceil(n / (TASK_BLOCKS_PER_CPU * slots))))

    def _model_node(self, model) -> str | None:
        if model is None:
            return None
        return next(node for node, built in self._models.items() if built is model)

    def _gpus_per_actor(self, k: Kernel, model_node: str) -> float:
        import ray

        mk = kernel_for("model", self.g.nodes[model_node]["ctor"])
        wants = k.resources.device == "any" and (mk is None or mk.resources.device == "any")
        if not wants or self.cfg.device == "cpu" or not ray.cluster_resources().get("GPU"):
            return 0
        return 1


def _gpus_and_actors(ex: "RayExecutor", k: Kernel, model_node: str) -> tuple[float, int, int | None]:
    """An actor pool's shape: GPUs per actor, actors (--concurrency, else one per GPU, else one), and the
    Ray memory to reserve per actor for a batch of --checkpoint-rows rows."""
    import ray

    gpus = ex._gpus_per_actor(k, model_node)
    size = ex.ray.concurrency or (max(1, int(ray.cluster_resources().get("GPU", 0))) if gpus else 1)
    return gpus, size, _memory(k, max(1, ex.cfg.chunk_rows), size)


def _memory(k: Kernel, batch: int, actors: int) -> int | None:
    """Bytes to reserve per actor (Ray's `memory` resource): the kernel's per-row estimate times a
    batch, capped so that the pool always fits the cluster (a request that never fits would hang)."""
    if not k.resources.memory_per_row:
        return None
    import ray

    want = k.resources.memory_per_row * batch
    have = ray.cluster_resources().get("memory", 0)
    return int(min(want, have / max(1, actors) * 0.9)) if have else None


def _ship_plugin_code() -> None:
    """Plug-in modules are loaded from files (`--plugins`), so workers cannot import them by name:
    their code travels by value with the kernels that call it (cloudpickle)."""
    import ray.cloudpickle as cloudpickle

    for name, module in list(sys.modules.items()):
        if name.startswith("tamis_plugin_") and module is not None:
            cloudpickle.register_pickle_by_value(module)


def _cause(err: BaseException) -> str:
    """The worker's own error, as its traceback's last lines say it: Ray hands the driver a wrapper
    (task error → "UDF failed") whose text holds the remote traceback, not the exception object."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).split("\n\nThe above exception was the direct cause")[0]
    lines = text.splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    if frames:
        rest = [line for line in lines[frames[-1] + 1:] if not line.startswith("    ")]
        if rest:
            return "\n".join(rest).strip()
    return lines[-1].strip() if lines else type(err).__name__


# --------------------------------------------------------------------------- on the workers


@dataclass(frozen=True)
class _BatchSpec:
    call: ScoreCall  # the scorer, its parameters and options; the model is bound on the worker
    schema: dict
    cache_root: str | None  # None: results are not cached (--no-cache, or an uncached kernel)
    cache_key: str | None
    sync_seconds: float


def _score(spec: _BatchSpec, call: ScoreCall, batch, caches: dict):
    """Score one Arrow batch (rows plus KEY), persist it when cached, return KEY and the result columns."""
    frame = pl.from_arrow(batch)
    keys = frame.get_column(KEY)
    got = call(frame.drop(KEY))
    out = pl.DataFrame([keys.rename("id"), *[pl.Series(c, got[c], dtype=t) for c, t in spec.schema.items()]])
    if spec.cache_root is not None and spec.cache_key is not None:
        from tamis.runtime.cache import ScoreCache

        scores = caches.setdefault("scores", ScoreCache(spec.cache_root))
        with scores.writer(spec.cache_key, sync_seconds=spec.sync_seconds) as writer:
            writer.put(out, check=False)  # one shard per batch: a killed worker loses only its batch in flight
    return out.rename({"id": KEY}).to_arrow()


def _score_batch(batch, spec: _BatchSpec):
    """A Ray task: a kernel without a model."""
    return _score(spec, spec.call, batch, {})


def _actor_call(spec: _BatchSpec, recipe, artifacts_root: str, gpu: bool) -> ScoreCall:
    """The stage's call with its model built on this actor (once), on the actor's GPU or its CPU."""
    model, options = actor_model(recipe, spec.call.options, artifacts_root, gpu)
    return replace(spec.call, model=model, options=options)


def actor_model(recipe, options, artifacts_root: str, gpu: bool):
    """(the model of `recipe` built on this actor, the options it runs with): on the actor's GPU or its CPU."""
    from tamis.runtime.ray_models import build

    if gpu and options.device.startswith("cuda:"):  # Ray gives the actor its GPU as cuda:0
        options = replace(options, device="cuda")
    if not gpu and options.device == "auto":
        options = replace(options, device="cpu")
    return build(recipe, options, artifacts_root), options


class _ScoreActor:
    """A Ray actor: builds its stage's model once, then scores batch after batch."""

    def __init__(self, spec: _BatchSpec, recipe, artifacts_root: str, gpu: bool) -> None:
        self.spec = spec
        self.call = _actor_call(spec, recipe, artifacts_root, gpu)
        self.caches: dict = {}

    def __call__(self, batch):
        return _score(self.spec, self.call, batch, self.caches)

"""Training fan-out under the Ray engine: independent trainings run as Ray tasks, one per GPU where
the cluster has GPUs, else one per CPU slot (`--train-cpus N` CPUs each):

* the probes of Instruction-Mining / InstructionGPT-4 (`probe_map`, the executor's hook);
* the SEM/BM/random fine-tunes of `tamis evaluate` (`train_models`).

The driver still plans: it builds the base model (its fingerprint keys every artifact), works out
each training's rows and artifact key, and reads what the artifact cache already holds. Each
missing training becomes one Ray task that builds the base model itself (`tamis.runtime.ray_models`:
from a small recipe, never a copy of the weights through the driver; `worker_base`), then calls the
very function the local engine calls (`tamis.runtime.probes.probe_one`, `tamis.runtime.warmup.
trained_model`). The artifact cache's `building()` builds into a private temporary directory and
renames it into place, so concurrent builders of different artifacts never meet, and a killed run
keeps every finished one. The driver collects the results as the tasks finish (`as_finished`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, TypeVar

import polars as pl

from tamis.runtime.probes import ProbeJob, ProbeMap, ProbeTask

RETRIES = 3  # a task whose worker died (killed, out of memory) is run again this many times
J = TypeVar("J")


def probe_map(executor, node: str) -> ProbeMap | None:
    """The Ray engine's ProbeMap for model node `node` (a `train(M, on=subsets(…))`), or None where
    its base model is not one a worker can rebuild (then the probes train on the driver, in turn)."""
    bases = executor._preds(node, "base")
    if len(bases) != 1:
        return None

    def run(jobs: list[ProbeJob], task: ProbeTask) -> Iterator[tuple[ProbeJob, dict]]:
        import ray

        from tamis.runtime.ray_models import recipe_for

        recipe = recipe_for(executor, bases[0])  # the driver built the base already (for the probes' keys)
        cpus, gpus = task_resources(executor.ray.train_cpus, _wants_gpu(executor, bases[0]))
        options = replace(task.options, progress=False)
        shared = ray.put(replace(task, options=options))
        remote = ray.remote(_train_probe).options(num_cpus=cpus, num_gpus=gpus, max_retries=RETRIES,
                                                  name=f"probe:{executor.g.nodes[node]['label']}")
        artifacts = str(executor.cache.artifacts.root)
        refs = {remote.remote(recipe, job, shared, artifacts, bool(gpus)): job for job in jobs}
        executor.ray_stages.append({"stage": executor.g.nodes[node]["label"], "kernel": "probes",
                                    "rows": sum(j.rows.height for j in jobs), "workers": f"{len(jobs)} task(s)",
                                    "cpus_per_task": cpus, "gpus_per_task": gpus, "model": recipe.describe(),
                                    "where": "ray"})
        yield from as_finished(refs, lambda job: f"probe {job.label}")

    return run


def task_resources(train_cpus: int | None, wants_gpu: bool) -> tuple[int, int]:
    """(CPUs, GPUs) of one training task: one GPU where the work can use one and the cluster has
    GPUs; `train_cpus` CPUs, by default 1, or a GPU's share of the cluster's CPUs."""
    import ray

    have = ray.cluster_resources()
    gpus = 1 if wants_gpu and have.get("GPU") else 0
    if train_cpus:
        return train_cpus, gpus
    return (max(1, int(have.get("CPU", 1)) // max(1, int(have["GPU"]))) if gpus else 1), gpus


def as_finished(refs: dict[Any, J], what: Callable[[J], str]) -> Iterator[tuple[J, Any]]:
    """(job, result) for each task as it finishes; a task that failed for good stops the run naming
    `what(job)`, and on any stop (a failure, an interrupt) the tasks still running are cancelled
    (the finished ones' artifacts stay)."""
    import ray

    from tamis.runtime.ray_engine import RayEngineError, _cause

    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                got = ray.get(ready[0])
            except ray.exceptions.RayError as err:
                raise RayEngineError(f"{what(refs[ready[0]])} failed on a Ray worker: {_cause(err)}") from None
            yield refs[ready[0]], got
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def _wants_gpu(executor, base_node: str) -> bool:
    from tamis.ops.kernel import kernel_for

    mk = kernel_for("model", executor.g.nodes[base_node]["ctor"])
    return not (executor.cfg.device == "cpu" or (mk is not None and mk.resources.device == "cpu"))


# --------------------------------------------------------------------------- fine-tunes (tamis evaluate)


@dataclass(frozen=True)
class TrainJob:
    """One fine-tune to run on a worker, as plain values: `base` fine-tuned on `rows` under `config`,
    stored as artifact `key` (`tamis.runtime.warmup.train_key`); then `after(lm, artifacts)`, if
    given (a module-level function, so it pickles by reference), with the trained model loaded —
    `tamis evaluate` scores it there, into the artifact cache."""

    key: str
    rows: pl.DataFrame
    config: Any  # tamis.runtime.training.TrainConfig
    label: str
    after: Callable[[Any, Any], Any] | None = None


def pfm_recipe(base: Any) -> Any:
    """The recipe a worker rebuilds `base` (the run's --pfm, loaded on the driver) from."""
    from tamis.runtime.models import dtype_name
    from tamis.runtime.ray_models import ModelRecipe

    return ModelRecipe("pfm", {}, "pfm", base.fingerprint, dtype_name(base.dtype))


def train_models(jobs: list[TrainJob], base: Any, options: Any, artifacts_root: str, train_cpus: int | None
                 ) -> Iterator[tuple[TrainJob, dict]]:
    """Run `jobs` (fine-tunes of the --pfm `base`) as Ray tasks in parallel; (job, its training summary)
    as each finishes. `options`: the run's ExecOptions (its `pfm` is what workers load)."""
    import ray

    recipe = pfm_recipe(base)
    cpus, gpus = task_resources(train_cpus, options.device != "cpu")
    remote = ray.remote(_train_model)
    options = replace(options, progress=False)
    refs = {remote.options(num_cpus=cpus, num_gpus=gpus, max_retries=RETRIES, name=f"fine-tune:{job.label}")
            .remote(recipe, job, options, artifacts_root, bool(gpus)): job for job in jobs}
    yield from as_finished(refs, lambda job: f"fine-tune {job.label}")


# --------------------------------------------------------------------------- on the workers


def worker_base(recipe, options, artifacts_root: str, gpu: bool) -> tuple[Any, Any]:
    """On a Ray worker: the task's options (its device; the driver's dtype, so the models it trains
    have the fingerprints the driver's would) and the base model built from `recipe`."""
    from tamis.runtime.ray_models import build

    if gpu and options.device.startswith("cuda:"):  # Ray gives the task its GPU as cuda:0
        options = replace(options, device="cuda")
    if not gpu and options.device == "auto":
        options = replace(options, device="cpu")
    if recipe.dtype:
        options = replace(options, dtype=recipe.dtype)
    _threads(int(os.environ.get("OMP_NUM_THREADS", "0") or 0))
    return build(recipe, options, artifacts_root), options


def _train_probe(recipe, job: ProbeJob, task: ProbeTask, artifacts_root: str, gpu: bool) -> dict:
    """A Ray task: build the base model here, then train, evaluate and store one probe."""
    from tamis.runtime.cache import ArtifactCache
    from tamis.runtime.probes import probe_one

    base, options = worker_base(recipe, task.options, artifacts_root, gpu)
    return probe_one(base, job, replace(task, options=options), ArtifactCache(artifacts_root))


def _train_model(recipe, job: TrainJob, options, artifacts_root: str, gpu: bool) -> dict:
    """A Ray task: build the base model here, fine-tune it into artifact `job.key` (unless another run
    finished it first), then run `job.after` on the trained model."""
    from tamis.runtime.cache import ArtifactCache
    from tamis.runtime.warmup import trained_model

    base, options = worker_base(recipe, options, artifacts_root, gpu)
    artifacts = ArtifactCache(artifacts_root)
    lm, summary = trained_model(base, job.key, job.config, lambda: job.rows, artifacts, options,
                                {"label": job.label, "rows_given": job.rows.height})
    if job.after is not None:
        job.after(lm, artifacts)
    summary.pop("sample_ids", None)
    return summary


def _threads(n: int) -> None:
    """Torch uses as many threads as the task has CPUs (Ray sets OMP_NUM_THREADS to them)."""
    if n > 0:
        import torch

        torch.set_num_threads(n)

"""Training fan-out under the Ray engine: independent trainings (the probes of Instruction-Mining /
InstructionGPT-4) run as Ray tasks, one per GPU where the cluster has GPUs, else one per CPU slot.

The driver still plans: it builds the base model (its fingerprint keys every probe), works out each
probe's rows and artifact key, and reads the probes the artifact cache already holds. Each missing
probe becomes one Ray task that builds the base model itself (`tamis.runtime.ray_models`: from a
small recipe, never a copy of the weights through the driver), then calls the very function the
local engine calls (`tamis.runtime.probes.probe_one`): train, evaluate, write the probe's artifacts.
The artifact cache's `building()` builds into a private temporary directory and renames it into
place, so concurrent builders of different probes never meet, and a killed run keeps every
finished probe. The driver collects the losses as the tasks finish.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Iterator

from tamis.runtime.probes import ProbeJob, ProbeMap, ProbeTask

RETRIES = 3  # a task whose worker died (killed, out of memory) is run again this many times


def probe_map(executor, node: str) -> ProbeMap | None:
    """The Ray engine's ProbeMap for model node `node` (a `train(M, on=subsets(…))`), or None where
    its base model is not one a worker can rebuild (then the probes train on the driver, in turn)."""
    bases = executor._preds(node, "base")
    if len(bases) != 1:
        return None

    def run(jobs: list[ProbeJob], task: ProbeTask) -> Iterator[tuple[ProbeJob, dict]]:
        import ray

        from tamis.runtime.ray_engine import RayEngineError, _cause
        from tamis.runtime.ray_models import recipe_for

        recipe = recipe_for(executor, bases[0])  # the driver built the base already (for the probes' keys)
        gpus = _gpus(executor, bases[0])
        cpus = executor.ray.train_cpus or (1 if not gpus else max(1, int(ray.cluster_resources().get("CPU", 1))
                                                                      // max(1, int(ray.cluster_resources()["GPU"]))))
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
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                try:
                    got = ray.get(ready[0])
                except ray.exceptions.RayError as err:
                    raise RayEngineError(f"probe {refs[ready[0]].label} failed on a Ray worker: {_cause(err)}") from None
                yield refs[ready[0]], got
        finally:
            for ref in pending:  # a failed or interrupted run: the probes still running stop (finished ones stay)
                ray.cancel(ref, force=True)

    return run


def _gpus(executor, base_node: str) -> int:
    import ray

    from tamis.ops.kernel import kernel_for

    mk = kernel_for("model", executor.g.nodes[base_node]["ctor"])
    if executor.cfg.device == "cpu" or (mk is not None and mk.resources.device == "cpu"):
        return 0
    return 1 if ray.cluster_resources().get("GPU") else 0


def _train_probe(recipe, job: ProbeJob, task: ProbeTask, artifacts_root: str, gpu: bool) -> dict:
    """A Ray task: build the base model here, then train, evaluate and store one probe."""
    from tamis.runtime.cache import ArtifactCache
    from tamis.runtime.probes import probe_one
    from tamis.runtime.ray_models import build

    options = task.options
    if gpu and options.device.startswith("cuda:"):  # Ray gives the task its GPU as cuda:0
        options = replace(options, device="cuda")
    if not gpu and options.device == "auto":
        options = replace(options, device="cpu")
    _threads(int(os.environ.get("OMP_NUM_THREADS", "0") or 0))
    base = build(recipe, options, artifacts_root)
    return probe_one(base, job, replace(task, options=options), ArtifactCache(artifacts_root))


def _threads(n: int) -> None:
    """Torch uses as many threads as the task has CPUs (Ray sets OMP_NUM_THREADS to them)."""
    if n > 0:
        import torch

        torch.set_num_threads(n)


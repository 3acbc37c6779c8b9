"""How a Ray worker gets the model a stage scores with: built again, once per actor, from a recipe.

The driver builds every model first, as the local executor does (training happens there, once;
a trained model's weights become an artifact in the cache, and the model's fingerprint keys the
score cache). A worker then needs the same model. Shipping the loaded object would copy every
weight through the driver and pin it to the driver's device, so instead the driver hands each
actor a small picklable `ModelRecipe` and the actor builds the model itself:

* `pfm`, `hf`, `api`, `encoder`: the model kernel is called again with the run's options (it reads
  only its parameters and local files, never the pool);
* `warmup`, `train`: the base is built the same way, then the trained weights are loaded from the
  artifact the driver wrote (`trained_model` with the driver's artifact key: never trains again);
* `proxy`: the stand-in's recipe;
* anything else (a plug-in's model kernel): the object itself, through Ray's object store.

The actor checks that its model has the driver's fingerprint, so scores can never be written
under a cache key that another model's numbers would then answer for.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import polars as pl

from tamis.errors import TamisError
from tamis.ops.kernel import BuildEnv, ExecOptions, kernel_for

SELF_CONTAINED = ("pfm", "hf", "api", "encoder")  # model kernels that read only their parameters and files
TRAINED = ("warmup", "train")


@dataclass(frozen=True)
class ModelRecipe:
    ctor: str
    params: Mapping[str, Any]
    label: str
    fingerprint: str | None
    dtype: str | None = None  # the driver's resolved dtype ("fp32", "bf16"): the fingerprint depends on it
    base: "ModelRecipe | None" = None  # trained models: the model they were trained from
    artifact_key: str | None = None  # trained models: where the driver stored the weights
    shipped: Any = None  # a Ray ObjectRef of the model itself, when it cannot be rebuilt

    def describe(self) -> str:
        if self.shipped is not None:
            return f"{self.label}: shipped through the object store"
        if self.artifact_key:
            return f"{self.label}: loaded from artifact {self.artifact_key} (base {self.base.describe()})"
        return f"{self.label}: built by the `{self.ctor}` model kernel"


def recipe_for(executor, node: str) -> ModelRecipe:
    """The recipe for model node `node`, which `executor` (a LocalExecutor) has built."""
    a = executor.g.nodes[node]
    model = executor._model(node)
    ctor, fp = a["ctor"], getattr(model, "fingerprint", None)
    dtype = _dtype_of(model)
    if ctor in SELF_CONTAINED:
        return ModelRecipe(ctor, dict(a["params"]), a["label"], fp, dtype)
    bases = executor._preds(node, "base")
    if ctor == "proxy" and bases:  # as the proxy kernel picks its stand-in
        stand_in = next(b for b in bases if executor.g.nodes[b]["ctor"] != "pfm" or len(bases) == 1)
        return recipe_for(executor, stand_in)
    checkpoints = getattr(model, "checkpoints", None)
    if ctor in TRAINED and checkpoints is not None and len(bases) == 1:
        return ModelRecipe(ctor, dict(a["params"]), a["label"], fp, dtype, base=recipe_for(executor, bases[0]),
                           artifact_key=checkpoints.key)
    import ray

    return ModelRecipe(ctor, dict(a["params"]), a["label"], fp, dtype, shipped=ray.put(model))


def build(recipe: ModelRecipe, options: ExecOptions, artifacts_root: str) -> Any:
    """Build the model on this worker (see the module note), checked against the driver's fingerprint."""
    model = _build(recipe, options, artifacts_root)
    got = getattr(model, "fingerprint", None)
    if got != recipe.fingerprint:
        raise TamisError(f"model `{recipe.label}` built on a Ray worker has fingerprint {got}, the driver's has "
                         f"{recipe.fingerprint}: the worker sees other weights or another dtype (is the same model "
                         "file at the same path on every node, and the cache directory shared?)")
    return model


def _build(recipe: ModelRecipe, options: ExecOptions, artifacts_root: str) -> Any:
    from tamis.runtime.cache import ArtifactCache

    if recipe.shipped is not None:
        import ray

        return ray.get(recipe.shipped)
    if recipe.dtype:  # the driver's numbers: a worker on other hardware must not pick another dtype
        options = replace(options, dtype=recipe.dtype)
    artifacts = ArtifactCache(artifacts_root)
    if recipe.artifact_key:
        from tamis.runtime.warmup import train_config, trained_model

        assert recipe.base is not None
        base = build(recipe.base, options, artifacts_root)
        if not artifacts.exists(recipe.artifact_key):
            raise TamisError(f"model `{recipe.label}`: artifact {recipe.artifact_key} is not in "
                             f"{artifacts.root} on this worker (run with a cache directory every node can read)")

        def never() -> pl.DataFrame:  # the driver trained it: the artifact exists, so this is never called
            raise TamisError(f"model `{recipe.label}` would be trained again on a worker")

        lm, _ = trained_model(base, recipe.artifact_key, train_config(dict(recipe.params)), never, artifacts,
                              options, {"label": recipe.label})
        return lm
    k = kernel_for("model", recipe.ctor)
    env = BuildEnv(label=recipe.label, options=options, pool=pl.DataFrame(), artifacts=artifacts)
    return k.fn(dict(recipe.params), env).model


def _dtype_of(model: Any) -> str | None:
    dtype = getattr(model, "dtype", None)
    if dtype is None or not hasattr(dtype, "is_floating_point"):  # not a torch dtype (an encoder, an endpoint)
        return None
    from tamis.runtime.models import dtype_name

    return dtype_name(dtype)

"""Data constructors: the datasets a recipe derives (the pool itself is bound with --pool)."""

from __future__ import annotations

from typing import Mapping

import polars as pl

from tamis.errors import TamisError
from tamis.ops.kernel import BuildEnv, kernel


@kernel("data", "pool")
def pool(params: Mapping, env: BuildEnv) -> pl.DataFrame:
    return env.pool  # loaded by the engine before anything runs: every percentage is a share of it


@kernel("data", "warmup_sample")
def warmup_sample(params: Mapping, env: BuildEnv) -> pl.DataFrame:
    """The rows a warmup trains on: a random P% of the pool, or Cherry's cluster-stratified pick
    (KMeans over the base model's embeddings)."""
    from tamis.runtime.warmup import sample_ids

    base = env.models[0].get() if env.models else None
    ids = sample_ids(base, env.pool, dict(params), env.options.progress)
    return env.pool.filter(pl.col("id").is_in(ids))


@kernel("data", "sample")
def sample(params: Mapping, env: BuildEnv) -> pl.DataFrame:
    """`sample(D, size, seed=…)`: a seeded random subset of a dataset (a count, or a percentage of D's rows),
    in the order of the permutation (numpy's RandomState(seed), as the warmup's random sample draws)."""
    import numpy as np

    from tamis.runtime.warmup_sampling import subset_size

    rows = env.inputs[0].get() if env.inputs else env.pool
    size = params["size"]
    k = subset_size(rows.height, size["fraction"] if "fraction" in size else min(int(size["count"]), rows.height))
    order = np.random.RandomState(int(params["seed"])).permutation(rows.height)[:k]
    return rows[order]


@kernel("data", "anchors")
def anchors(params: Mapping, env: BuildEnv) -> pl.DataFrame:
    """Nuggets' predefined task set: KMeans over the model's embeddings of the rows, the
    nearest real row to each centroid (kmeans_sample.py). Kept in the artifact cache, so a
    re-run embeds nothing."""
    import json

    from tamis.runtime.cache import data_fingerprint, fingerprint
    from tamis.runtime.nuggets import anchor_indices

    rows = env.inputs[0].get() if env.inputs else env.pool
    model = env.models[0].get() if env.models else None
    if model is None:
        raise TamisError(f"{env.label}: anchors need a model to embed the rows with (model=pfm)")
    k, seed = int(params["k"]), int(params["seed"])
    key = fingerprint({"op": "anchors", "rows": data_fingerprint(rows), "model": model.fingerprint, "k": k,
                       "seed": seed, "embedding": "nuggets-mean-last-hidden-v1"})
    if not env.artifacts.exists(key):
        picked = anchor_indices(model, rows, k, seed, batch_tokens=env.options.batch_tokens,
                                progress=env.options.progress)
        with env.artifacts.building(key) as out:
            (out / "anchors.json").write_text(json.dumps({"positions": picked, "ids": rows["id"].gather(picked).to_list()}))
    picked = json.loads((env.artifacts.path_for(key) / "anchors.json").read_text())["positions"]
    return rows[picked]


@kernel("data", "load")
def load(params: Mapping, env: BuildEnv) -> pl.DataFrame:
    """A dataset the recipe names (a target set, an evaluation set): read like the pool, with the
    same formats and row checks; a bad row stops the run with its file, row and field. A relative
    path is taken from the working directory, as `--pool` is."""
    from tamis.runtime.data import load_pool

    frame = load_pool(params["path"], format=params.get("format", "auto")).frame
    if frame.height == 0:
        raise TamisError(f"{params['path']}: no rows in the dataset `{env.label}`")
    return frame

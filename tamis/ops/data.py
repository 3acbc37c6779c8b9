"""Data constructors: the datasets a recipe derives (the pool itself is bound with --pool)."""

from __future__ import annotations

from typing import Mapping

import polars as pl

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

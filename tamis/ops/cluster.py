"""`score cluster using M with k=…, seed=…`: a KMeans cluster id per row, a group column for `per`.

The rows' embeddings come through the score cache as a scored input (the same vectors the diversity
samplers read: an encoder's own pooling, an LLM's last real token), so a re-run embeds nothing;
the clustering itself is cheap next to them and is redone each run (it depends on all the rows
in the stage, so it is not row-wise and never cached per row). With the clusters as a column,
InstructionGPT-4's per-cluster proportional top-k is `score cluster … | rank by … | top 10% per cluster`
and Cherry's cluster-stratified sampling is `score cluster … with k=100 | sample 10 per cluster`.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from tamis.ops.diversity import _EMB, EMBEDDINGS, _embeddings
from tamis.ops.embedding import sampler_embedding
from tamis.ops.kernel import ExecOptions, kernel


@kernel("scorer", "cluster", mode="global", schema={"value": pl.Int64}, names={"value": ""}, resources=_EMB,
        scored_inputs={EMBEDDINGS: sampler_embedding})
def cluster(rows: pl.DataFrame, model, k: int, seed: int, options: ExecOptions) -> dict:
    """{"value": cluster id per row}: KMeans(k, random_state=seed, n_init=10) on the L2-normalised
    embeddings (at most one cluster per row when there are fewer rows than k)."""
    from sklearn.cluster import KMeans

    if rows.height == 0:
        return {"value": np.zeros(0, dtype=np.int64)}
    emb = _embeddings(rows, model, options)
    n_clusters = max(1, min(int(k), rows.height))
    labels = KMeans(n_clusters=n_clusters, random_state=int(seed), n_init=10).fit_predict(emb)
    return {"value": labels.astype(np.int64)}

"""`dedup exact | minhash(…) | semantic(…) using M [against DATA]`: duplicate and contamination removal.

Kernels of the family "dedup": fn(rows, against, **params, options) -> DedupResult
(`tamis.runtime.dedup`), over the rows in the pipeline's current order: of each duplicate group the
first row (the best-ranked) is kept; with `against`, every row near-duplicate to a row of that
dataset (an evaluation set) is removed. `semantic` reads the rows' embeddings from a scored input
(the score cache, as the diversity samplers do), for the pool's rows and the other dataset's alike.
"""

from __future__ import annotations

import polars as pl

from tamis.ops.diversity import _EMB, EMBEDDINGS
from tamis.ops.embedding import sampler_embedding, vectors
from tamis.ops.kernel import ExecOptions, Resources, kernel


@kernel("dedup", "exact", mode="global", resources=Resources(device="cpu"))
def exact(rows: pl.DataFrame, against: pl.DataFrame | None, field: str, options: ExecOptions):
    from tamis.runtime import dedup

    texts = dedup.dedup_text(rows, field)
    if against is not None:
        return dedup.against_exact(texts, dedup.dedup_text(against, field))
    return dedup.exact(texts)


@kernel("dedup", "minhash", mode="global", resources=Resources(device="cpu"))
def minhash(rows: pl.DataFrame, against: pl.DataFrame | None, threshold: float, ngram: int, num_perm: int, seed: int,
            field: str, options: ExecOptions):
    from tamis.runtime import dedup

    texts = dedup.dedup_text(rows, field)
    if against is not None:
        return dedup.against_minhash(texts, dedup.dedup_text(against, field), threshold=threshold, ngram=ngram,
                                     num_perm=num_perm, seed=seed)
    return dedup.minhash(texts, threshold=threshold, ngram=ngram, num_perm=num_perm, seed=seed)


@kernel("dedup", "semantic", mode="global", resources=_EMB, scored_inputs={EMBEDDINGS: sampler_embedding})
def semantic(rows: pl.DataFrame, against: pl.DataFrame | None, threshold: float, options: ExecOptions):
    from tamis.runtime import dedup
    from tamis.runtime.models import resolve_device

    device = str(resolve_device(options.device))
    if against is not None:
        return dedup.against_semantic(vectors(rows[EMBEDDINGS]), vectors(against[EMBEDDINGS]), threshold=threshold,
                                      device=device)
    return dedup.semantic(vectors(rows[EMBEDDINGS]), threshold=threshold, device=device)

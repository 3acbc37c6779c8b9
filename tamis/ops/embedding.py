"""Text embeddings as a cached, row-wise score: `score embedding using M`.

One L2-normalised float32 vector per row — an `encoder(...)`'s sentence embedding (its own pooling:
mean for MiniLM) or an LLM's final hidden states pooled at the last real token or over all tokens —
cached like every model score, by row content, chunk by chunk. The cached column is a fixed-size
list (`pl.Array(pl.Float32, dim)`, an Arrow fixed_size_list in the Parquet shards and journals),
moved in and out as numpy matrices, never as a Python list per row.

The diversity samplers (`tamis.ops.diversity`) declare the embedding they need as a *scored input*
(the kernel field `scored_inputs`): the engine computes it through this kernel and its cache before calling the
sampler, under the same key as `score embedding using M` over the same rows and text. So a rerun, a
resume, or a recipe that also has `score embedding using M` never encodes a row twice.

Two kernel fields serve this (read by the executor, which names no scorer): this kernel's
`schema_for(model, params)` (the vector's width is the model's) and each sampler's `scored_inputs`
({internal column: model -> (scorer, parameters)}).
"""

from __future__ import annotations

from typing import Any, Mapping

import polars as pl

from tamis.ops.kernel import ExecOptions, Resources, kernel

# The declared type is "a list of float32"; a run resolves it to Array(Float32, the model's width).
_VECTOR = {"value": pl.List(pl.Float32)}
_KEY = ("pooling", "field")
# Constants of what is embedded (part of the key): the text layout of `field`, L2 normalisation,
# the tokens an LLM reads at most. Bump the version when any of them changes meaning.
EMBEDDING_VERSION = 1


def _key_extra(params: Mapping[str, Any]) -> dict[str, Any]:
    from tamis.runtime.embeddings import LLM_MAX_LENGTH

    return {"embedding": EMBEDDING_VERSION, "normalise": "l2", "llm_max_length": LLM_MAX_LENGTH}


def _schema_for(model, params: Mapping[str, Any]) -> dict[str, pl.DataType]:
    from tamis.runtime.embeddings import embedding_dim

    return {"value": pl.Array(pl.Float32, embedding_dim(model))}


@kernel("scorer", "embedding", cached=True, key_params=_KEY, key_extra=_key_extra, schema=_VECTOR,
        schema_for=_schema_for, names={"value": ""}, resources=Resources(device="any", memory_per_row=64 << 10))
def embedding(rows: pl.DataFrame, model, pooling: str, field: str, options: ExecOptions) -> dict:
    """{"value": n × dim float32 matrix}: one L2-normalised vector per row."""
    from tamis.runtime import embeddings

    return {"value": embeddings.embed(model, embeddings.texts_for(rows, field), progress=options.progress,
                                      pooling=pooling)}


def sampler_embedding(model) -> tuple[str, dict[str, Any]]:
    """The scorer and parameters whose values a diversity sampler embeds with: `score embedding`'s
    defaults for an encoder (its own pooling, the whole row), the last token for an LLM (DEITA)."""
    from tamis.runtime.embeddings import sampler_pooling

    return "embedding", {"pooling": sampler_pooling(model), "field": "all"}


def vectors(column: pl.Series):
    """A vector column as an n × dim float32 numpy matrix (no copy when it is one chunk without nulls)."""
    import numpy as np

    if column.null_count():
        raise ValueError(f"{column.name}: {column.null_count()} row(s) have no embedding")
    out = column.to_numpy()
    return np.ascontiguousarray(out, dtype=np.float32)

"""Diversity samplers: budgeted selection over the embeddings of all candidate rows.

Each sampler reads its embeddings from a *scored input* column (`tamis.ops.embedding`): the engine
computes `score embedding` for the candidates through the score cache before the sampler runs (an
encoder's own embedding, or an LLM's last-token state, as DEITA embeds), so a rerun or a resume never
encodes a row again. Called without that column (directly, by another engine), a sampler embeds the
rows itself.
"""

from __future__ import annotations

from tamis.ops.embedding import sampler_embedding
from tamis.ops.kernel import ExecOptions, Resources, kernel

# the embeddings of every candidate are held at once (float32, ~384–4096 wide)
_EMB = Resources(device="any", memory_per_row=16 << 10)
# the column the engine fills with the candidates' embeddings (a name no recipe column can have)
EMBEDDINGS = "⟨embedding⟩"


def _embeddings(rows, model, options: ExecOptions):
    from tamis.ops.embedding import vectors

    if EMBEDDINGS in rows.columns:
        return vectors(rows[EMBEDDINGS])
    from tamis.runtime import embeddings

    return embeddings.embed(model, embeddings.sample_texts(rows), progress=options.progress,
                            pooling=sampler_embedding(model)[1]["pooling"])


@kernel("sampler", "repr_filter", mode="global", resources=_EMB, scored_inputs={EMBEDDINGS: sampler_embedding},
        reads=())
def repr_filter(rows, model, budget: int, threshold: float, options: ExecOptions) -> list[int]:
    from tamis.runtime import samplers

    return samplers.repr_filter(_embeddings(rows, model, options), budget, threshold)


@kernel("sampler", "facility_location", mode="global", resources=_EMB, scored_inputs={EMBEDDINGS: sampler_embedding},
        reads=())
def facility_location(rows, model, budget: int, metric: str, options: ExecOptions) -> list[int]:
    from tamis.runtime import samplers

    return samplers.facility_location(_embeddings(rows, model, options), budget, metric)


@kernel("sampler", "kcenter", mode="global", resources=_EMB, scored_inputs={EMBEDDINGS: sampler_embedding},
        reads=())
def kcenter(rows, model, budget: int, options: ExecOptions) -> list[int]:
    from tamis.runtime import samplers

    return samplers.kcenter(_embeddings(rows, model, options), budget)


@kernel("sampler", "complexity_first", mode="global", reads=lambda p: (p.get("tags", "tags"),))
def complexity_first(rows, model, budget: int, tags: str) -> list[int]:
    """InsTag: most tags first; a row is added when it brings a tag not yet covered; the covered set
    is reset after each full pass (`tamis.runtime.instag.complexity_first`)."""
    from tamis.runtime.instag import complexity_first as pick

    return pick(rows[tags].to_list(), budget)

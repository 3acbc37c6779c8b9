"""Diversity samplers: budgeted selection over the embeddings of all candidate rows."""

from __future__ import annotations

from tamis.ops.kernel import ExecOptions, Resources, kernel

# the embeddings of every candidate are held at once (float32, ~384–4096 wide)
_EMB = Resources(device="any", memory_per_row=16 << 10)


def _embeddings(rows, model, options: ExecOptions):
    from tamis.runtime import embeddings

    return embeddings.embed(model, embeddings.sample_texts(rows), progress=options.progress)


@kernel("sampler", "repr_filter", mode="global", resources=_EMB)
def repr_filter(rows, model, budget: int, threshold: float, options: ExecOptions) -> list[int]:
    from tamis.runtime import samplers

    return samplers.repr_filter(_embeddings(rows, model, options), budget, threshold)


@kernel("sampler", "facility_location", mode="global", resources=_EMB)
def facility_location(rows, model, budget: int, metric: str, options: ExecOptions) -> list[int]:
    from tamis.runtime import samplers

    return samplers.facility_location(_embeddings(rows, model, options), budget, metric)


@kernel("sampler", "kcenter", mode="global", resources=_EMB)
def kcenter(rows, model, budget: int, options: ExecOptions) -> list[int]:
    from tamis.runtime import samplers

    return samplers.kcenter(_embeddings(rows, model, options), budget)

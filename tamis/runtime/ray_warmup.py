"""A warmup model trained on the pool, under the streamed Ray path (the driver never holds the pool).

`warmup(M, size, select=…)` fine-tunes M on a sample of the pool (Cherry LLM's pre-experienced model,
LESS' warmup). Locally the sample is drawn from the loaded pool; here each part comes from Ray, and only
what the draw needs reaches the driver:

* **The artifact key** holds the pool's content hash (`data_fingerprint`). Each row's hash is computed on
  the workers; positions and hashes (≈ 40 B a row) are gathered and digested in pool order exactly as
  `data_fingerprint` digests them, so the key, and a cached warmup, are the local engine's.
* **`select="random"`** (LESS): positions and ids are gathered; the same seeded permutation picks.
* **`select="cherry"`** (Cherry LLM): each row's instruction embedding and perplexity come from an actor pool
  that builds the base model once per actor (each row is measured on its own, so any split of the pool gives
  the local values); positions, embeddings and perplexities are gathered (≈ 4 B per dimension a row) and
  KMeans and the band-and-spread pick run on the driver (`cherry_pick`).
* **The picked rows** (the training set, `size` of the pool) are then gathered whole.

The hash pass runs once a run, when a warmup's key is first needed; the sample is drawn only when the model
is not in the artifact cache (a rerun draws nothing). Training runs on the driver, as locally; the scoring
actors then load the trained weights from the artifact (`tamis.runtime.ray_models`).
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import polars as pl

from tamis.runtime.ray_pool import POS, batch_frame

HASH = "⟨row hash⟩"
EMBEDDING = "⟨embedding⟩"
PERPLEXITY = "⟨perplexity⟩"
CHERRY_TEMPLATE = "alpaca"  # the prompt text Cherry embeds (as `sample_ids` draws it)


def warmup_sample_node(g: nx.DiGraph, model: str) -> str | None:
    """The sample node of `model` when it is a warmup this module can train without the pool on the driver:
    `warmup(M, size)` with M built from its files and the sample drawn from the pool; else None."""
    from tamis.runtime.ray_stream import _from_files

    a = g.nodes[model]
    if a.get("ctor") != "warmup" or a["params"].get("trained_on"):
        return None
    flows = [(p, d["flow"]) for p, _, d in g.in_edges(model, data=True)]
    bases = [p for p, f in flows if f == "base"]
    trains = [p for p, f in flows if f == "train"]
    if len(bases) != 1 or len(trains) != 1 or not _from_files(g, bases[0]):
        return None
    sample = trains[0]
    if g.nodes[sample].get("source") != "warmup_sample":
        return None
    ins = [(p, d["flow"]) for p, _, d in g.in_edges(sample, data=True)]
    if [p for p, f in ins if f == "data"] != ["data:pool"] or any(
            f not in ("data", "model") or (f == "model" and not _from_files(g, p)) for p, f in ins):
        return None
    return sample


def pool_key(run: Any) -> str:
    """The pool's `data_fingerprint`, from row hashes computed on the workers."""
    from tamis.runtime.cache import fingerprint_columns, hashes_fingerprint
    from tamis.runtime.ray_stream import _gather
    from tamis.runtime.rowhash import CHUNK

    cols = fingerprint_columns(run.pool_columns)
    got = _gather(run.ds.map_batches(_hash_batch, fn_kwargs={"cols": cols}, batch_format="pyarrow"), [POS, HASH],
                  alive=False).sort(POS)
    run.ex.ray_stages.append({"stage": "the pool's content hash", "kernel": "row hashes", "rows": got.height,
                              "workers": "tasks", "where": "ray; the driver digests positions and hashes"})
    return hashes_fingerprint(cols, (got[HASH].slice(s, CHUNK) for s in range(0, got.height, CHUNK)))


def sample_rows(run: Any, sample: str) -> pl.DataFrame:
    """The warmup sample node `sample`'s rows, drawn as the local engine draws them (module note)."""
    import numpy as np

    from tamis.runtime.ray_stream import _gather
    from tamis.runtime.warmup import CHERRY_KMEANS_SEED, sample_shape
    from tamis.runtime.warmup_sampling import cherry_pick, random_subset

    ex = run.ex
    p = ex.g.nodes[sample]["params"]
    n, clusters, per_cluster = sample_shape(ex.pool_size, p)
    if p["select"] == "random":
        ids = _gather(run.ds, [POS, "id"], alive=False).sort(POS)
        chosen = set(random_subset(ids["id"].to_list(), n, seed=p["seed"]))
        positions = ids.filter(pl.col("id").is_in(chosen))[POS]
        how = "ids"
    elif ex.pool_size <= clusters:  # cherry_subset's small-pool rule: every row, no model pass
        positions, how = None, "nothing (a pool no larger than the clusters is taken whole)"
    else:
        measured = _cherry_measures(run, sample, p)
        emb = np.asarray(measured[EMBEDDING].to_numpy(), dtype=np.float32)
        picked, _, _ = cherry_pick(emb, measured[PERPLEXITY].to_numpy(), clusters, per_cluster, CHERRY_KMEANS_SEED)
        positions, how = measured[POS][picked], "embeddings and perplexities"
    want = None if positions is None else pl.Series(POS, sorted(positions.to_list()), dtype=pl.Int64)
    rows = _gather(run.ds.map_batches(_rows_at, fn_kwargs={"positions": want}, batch_format="pyarrow"),
                   [POS, *run.pool_columns], alive=False).sort(POS)
    ex.ray_stages.append({"stage": ex.g.nodes[sample]["label"], "kernel": f"{p['select']} sample", "rows": ex.pool_size,
                          "workers": "driver", "where": f"driver (positions and {how}; then the {rows.height} "
                                                        "sampled rows whole)"})
    return rows.drop(POS)


def _cherry_measures(run: Any, sample: str, p: dict) -> pl.DataFrame:
    """Every pool row's (POS, instruction embedding, perplexity), from an actor pool building the sample's
    model once per actor."""
    import ray

    from tamis.ops.kernel import kernel_for
    from tamis.runtime.ray_engine import _gpus_and_actors
    from tamis.runtime.ray_models import recipe_for

    ex = run.ex
    model_node = next(q for q, _, d in ex.g.in_edges(sample, data=True) if d["flow"] == "model")
    ex._model(model_node)  # built on the driver: its fingerprint checks the actors' copies
    recipe = recipe_for(ex, model_node)
    gpus, size, memory = _gpus_and_actors(ex, kernel_for("model", "warmup"), model_node)
    ds = run.ds.map_batches(_CherryActor, fn_constructor_args=(recipe, ex.cfg.options(), str(ex.cache.artifacts.root),
                                                               bool(gpus), int(p["max_length"])),
                            batch_format="pyarrow", batch_size=max(1, ex.cfg.chunk_rows),
                            compute=ray.data.ActorPoolStrategy(size=size), num_gpus=gpus,
                            **({"memory": memory} if memory else {}))
    got = _measured(ds).sort(POS)
    ex.ray_stages.append({"stage": ex.g.nodes[sample]["label"], "kernel": "cherry embeddings", "rows": got.height,
                          "workers": f"{size} actor(s)", "gpus_per_actor": gpus, "where": "ray",
                          "model": recipe.describe()})
    return got


def _measured(ds) -> pl.DataFrame:
    """The Cherry actors' blocks on the driver, as one frame (an empty batch's block, which has no embedding
    column of a known width, left out)."""
    parts = [pl.from_arrow(b) for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")]
    return pl.concat([p for p in parts if p.height], how="vertical_relaxed")


# --------------------------------------------------------------------------- on the workers


def _hash_batch(batch, cols: list[str]):
    from tamis.runtime.rowhash import row_hashes

    frame = batch_frame(batch)
    return pl.DataFrame([frame[POS], row_hashes(frame, cols).alias(HASH)]).to_arrow()


def _rows_at(batch, positions: pl.Series | None):
    frame = batch_frame(batch)
    return (frame if positions is None else frame.filter(pl.col(POS).is_in(positions))).to_arrow()


class _CherryActor:
    """A Ray actor: builds the model once (checked against the driver's fingerprint), then measures each
    batch's instructions (`cherry_measure`)."""

    def __init__(self, recipe, options, artifacts_root: str, gpu: bool, max_length: int) -> None:
        from tamis.runtime.ray_engine import actor_model

        self.model, self.options = actor_model(recipe, options, artifacts_root, gpu)
        self.max_length = max_length

    def __call__(self, batch):
        from tamis.runtime.warmup_sampling import cherry_measure

        frame = batch_frame(batch)
        if frame.height == 0:
            return frame.select(POS).to_arrow()
        rows = frame.drop(POS).to_dicts()  # one batch's rows (--checkpoint-rows), never the pool's
        emb, ppl = cherry_measure(self.model, rows, template=CHERRY_TEMPLATE, max_length=self.max_length,
                                  batch_tokens=self.options.batch_tokens, progress=False,
                                  positions=frame[POS].to_list())
        return pl.DataFrame([frame[POS], pl.Series(EMBEDDING, emb), pl.Series(PERPLEXITY, ppl, dtype=pl.Float64)]
                            ).to_arrow()

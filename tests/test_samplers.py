"""Diversity samplers: hand-checkable vectors, and the executor on real text with the offline MiniLM encoder."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from tamis.dsl.compile import compile_text
from tamis.runtime.executor import LocalExecutor, RunConfig
from tamis.runtime.samplers import facility_location, kcenter, repr_filter


def _unit(*rows):
    a = np.array(rows, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_repr_filter_drops_near_duplicates_in_visiting_order():
    emb = _unit([1, 0], [0.99, 0.14], [0, 1], [0.6, 0.8], [-1, 0])
    # cos(0,1)=0.990 > 0.9: dropped; cos(3,0)=0.6, cos(3,2)=0.8: kept; row 4 opposite: kept
    assert repr_filter(emb, budget=10, threshold=0.9) == [0, 2, 3, 4]
    assert repr_filter(emb, budget=2, threshold=0.9) == [0, 2]
    assert repr_filter(emb, budget=10, threshold=0.7) == [0, 2, 4]  # cos(3,2)=0.8 > 0.7 now
    assert repr_filter(emb, budget=10, threshold=0.9, chunk=1) == [0, 2, 3, 4]  # chunking changes nothing


def test_kcenter_is_farthest_first():
    emb = np.array([[0.0], [1.0], [10.0], [11.0], [5.0]], dtype=np.float32)
    assert kcenter(emb, 3) == [0, 3, 4]  # 11 is farthest from 0; then 5 (distance 5 to both)
    assert kcenter(np.zeros((4, 2), dtype=np.float32), 3) == [0]  # all duplicates: one center


@pytest.fixture(scope="module")
def chatter_pool(tmp_path_factory):
    from tamis.runtime.data import chatterbot_pairs
    from tamis.runtime.outputs import write_jsonl

    path = tmp_path_factory.mktemp("pool") / "chatter.jsonl"
    write_jsonl(chatterbot_pairs().frame.head(200), path)
    return path


def test_repr_filter_on_real_text_keeps_no_pair_above_threshold(chatter_pool):
    from sentence_transformers import SentenceTransformer

    from tamis.runtime.embeddings import resolve_encoder_path, sample_texts

    recipe = ('score length | rank by length desc '
              '| diverse repr_filter(budget=60%, threshold=0.9) using encoder("sentence-transformers/all-MiniLM-L6-v2")')
    res = LocalExecutor(compile_text(recipe).graph, RunConfig(pool=str(chatter_pool), no_cache=True, progress=False)).run()
    sel = res.selected
    model = SentenceTransformer(resolve_encoder_path("all-MiniLM-L6-v2", {}), device="cpu")
    emb = model.encode(sample_texts(sel), normalize_embeddings=True)
    sims = emb @ emb.T
    np.fill_diagonal(sims, -1)
    assert sims.max() <= 0.9 + 1e-5
    assert sel.select("instruction", "output").n_unique() == sel.height  # exact duplicates never both kept
    assert sel.height <= 120
    # rows are visited in rank order: the longest answer always survives
    assert sel["length"][0] == res.scores["length"].max()


def test_kcenter_with_an_llm_embedder(chatter_pool, tiny_gpt2_dir):
    res = LocalExecutor(compile_text("score length | rank | diverse kcenter(budget=5) using pfm").graph,
                        RunConfig(pool=str(chatter_pool), pfm=tiny_gpt2_dir, dtype="fp32", no_cache=True,
                                  progress=False)).run()
    assert res.selected.height == 5
    assert res.selected["id"].n_unique() == 5


def _plain_greedy(sims: np.ndarray, budget: int) -> list[int]:
    covered, chosen = np.zeros(len(sims)), []
    for _ in range(budget):
        gains = [np.maximum(sims[:, j] - covered, 0).sum() if j not in chosen else -1 for j in range(len(sims))]
        j = int(np.argmax(gains))
        chosen.append(j)
        covered = np.maximum(covered, sims[:, j])
    return chosen


def test_facility_location_lazy_greedy_equals_plain_greedy():
    from tamis.runtime.samplers import facility_location, similarity_kernel

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(60, 8)).astype(np.float32)
    for metric in ("euclidean", "cosine"):
        sims = similarity_kernel(emb, metric)
        assert facility_location(emb, 10, metric) == _plain_greedy(sims, 10)
    # the kernel is submodlib's: exp(-euclidean distance / dimension)
    k = similarity_kernel(emb[:2])
    assert k[0, 1] == pytest.approx(np.exp(-np.linalg.norm(emb[0] - emb[1]) / 8), rel=1e-6)


def test_facility_location_picks_one_per_cluster_first():
    pts = np.array([[0, 0], [0.1, 0], [0, 0.1], [10, 10], [10.1, 10], [20, 0]], dtype=np.float32)
    picked = facility_location(pts, 3, "euclidean")
    assert {0, 1, 2} & set(picked) and {3, 4} & set(picked) and 5 in picked


def test_superfiltering_d_runs_end_to_end(chatter_pool, tiny_gpt2_dir):
    from tamis.dsl.compile import compile_file

    cfg = RunConfig(pool=str(chatter_pool), pfm=tiny_gpt2_dir, dtype="fp32", no_cache=True, progress=False,
                    model_paths={"gpt2": tiny_gpt2_dir})
    res = LocalExecutor(compile_file("superfiltering_d").graph, cfg).run()
    labels = [s.label for s in res.stages]
    assert labels[-1].startswith("diverse facility_location(2%)")
    top = next(s for s in res.stages if "top 20%" in s.label)
    assert top.rows_out <= 40 and res.selected.height == 4  # 2% of the 200-row pool
    assert set(res.selected["id"]) <= set(res.scores.filter(pl.col("ifd") < 1)["id"])

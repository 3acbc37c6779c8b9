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


# --------------------------------------------------------------------------- scale: same selections, bounded memory


def _random_unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _plain_repr_filter(emb, budget, threshold):
    kept = []
    for i in range(len(emb)):
        if len(kept) >= budget:
            break
        if kept and np.max(emb[kept] @ emb[i]) > threshold:
            continue
        kept.append(i)
    return kept


def _plain_kcenter(emb, budget):
    chosen = [0]
    dist = np.linalg.norm(emb - emb[0], axis=1)
    while len(chosen) < min(budget, len(emb)):
        nxt = int(np.argmax(dist))
        if dist[nxt] == 0:
            break
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(emb - emb[nxt], axis=1))
    return chosen


@pytest.mark.parametrize("n,d,threshold", [(600, 8, 0.9), (1500, 16, 0.7), (800, 64, 0.2), (400, 3, 0.99)])
def test_repr_filter_blocks_decide_as_the_per_candidate_loop(n, d, threshold):
    emb = _random_unit(np.random.default_rng(n), n, d)
    emb[n // 2:n // 2 + 20] = emb[:20]  # exact duplicates, later in the order
    for budget in (n, n // 3, 5):
        expected = _plain_repr_filter(emb, budget, threshold)
        assert repr_filter(emb, budget, threshold) == expected
        assert repr_filter(emb, budget, threshold, chunk=7) == expected  # small kept chunks and blocks


@pytest.mark.parametrize("case", ["unit384", "unit16", "raw", "lattice", "duplicates", "float64", "ints"])
def test_kcenter_equals_the_plain_loop(case):
    rng = np.random.default_rng(7)
    emb = {
        "unit384": lambda: _random_unit(rng, 500, 384),
        "unit16": lambda: _random_unit(rng, 1500, 16),
        "raw": lambda: (rng.normal(size=(1000, 12)) * rng.uniform(0.1, 50, size=(1000, 1))).astype(np.float32),
        "lattice": lambda: rng.integers(0, 4, size=(600, 3)).astype(np.float32),  # many exactly tied distances
        "duplicates": lambda: np.repeat(_random_unit(rng, 150, 8), 3, axis=0),
        "float64": lambda: rng.normal(size=(800, 10)),
        "ints": lambda: rng.integers(-3, 3, size=(300, 4)),
    }[case]()
    for budget in (len(emb), 150, 1):
        assert kcenter(emb, budget, device="cpu") == _plain_kcenter(emb, budget)
    assert kcenter(emb[:0], 5) == [] and kcenter(emb, 0) == []


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_facility_location_sparse_with_every_neighbour_is_the_dense_selection(metric):
    rng = np.random.default_rng(3)
    for n, d, budgets in [(60, 8, (10, 60)), (250, 16, (10, 125)), (300, 384, (30,))]:
        emb = rng.normal(size=(n, d)).astype(np.float32)
        emb[n - 10:] = emb[:10]  # duplicates: exactly tied gains, broken towards the lower index
        for budget in budgets:
            dense = facility_location(emb, budget, metric)
            assert facility_location(emb, budget, metric, k=n - 1, dense_limit=0) == dense
        assert facility_location(emb, 10, metric, k=10 * n, dense_limit=0) == facility_location(emb, 10, metric)


@pytest.mark.parametrize("metric,rounds", [("euclidean", 16), ("cosine", 16), ("euclidean", 0)])
def test_facility_location_sparse_is_greedy_on_the_k_nearest_kernel(metric, rounds, monkeypatch):
    from tamis.runtime import samplers
    from tamis.runtime.samplers import similarity_kernel

    monkeypatch.setattr(samplers, "_BLOCK", 64)  # many blocks: transposed and sparse merges are exercised
    monkeypatch.setattr(samplers, "_ROUNDS", rounds)  # 0: every sparse merge takes the padded selection
    rng = np.random.default_rng(11)
    emb = (rng.normal(size=(500, 8)) * rng.uniform(0.5, 2, size=(500, 1))).astype(np.float32)  # not unit rows
    k = 12
    sims = similarity_kernel(emb, metric).astype(np.float64)
    others = sims.copy()
    np.fill_diagonal(others, -np.inf)
    keep = np.argsort(-others, axis=1, kind="stable")[:, :k]
    sparse = np.zeros_like(sims)  # submodlib's sparse mode: s_ii and row i's k most similar, else 0
    rows = np.arange(len(sims))[:, None]
    sparse[rows, keep] = sims[rows, keep]
    np.fill_diagonal(sparse, np.diag(sims))
    assert facility_location(emb, 40, metric, k=k, dense_limit=0) == _plain_greedy(sparse.astype(np.float32), 40)


def test_facility_location_above_the_dense_limit_holds_no_n_by_n_matrix(monkeypatch):
    import tracemalloc

    from tamis.runtime import samplers

    monkeypatch.setattr(samplers, "_BLOCK", 256)  # and temporaries of bounded size, so the N² term would show
    monkeypatch.setattr(samplers, "_GATHER", 1 << 16)
    emb = _random_unit(np.random.default_rng(5), 3000, 32)
    tracemalloc.start()
    try:
        picked = facility_location(emb, 30, "euclidean", k=16, dense_limit=1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(set(picked)) == 30
    assert peak < 3000 * 3000 * 4 / 4  # a quarter of one float32 N×N matrix


def test_samplers_refuse_what_they_cannot_use():
    with pytest.raises(ValueError, match="finite"):
        kcenter(np.array([[0.0, 1.0], [np.nan, 1.0]]), 2)
    with pytest.raises(ValueError, match="k"):
        facility_location(_random_unit(np.random.default_rng(0), 10, 4), 3, k=0)
    with pytest.raises(ValueError, match="device"):
        kcenter(_random_unit(np.random.default_rng(0), 10, 4), 3, device="tpu")


def test_cuda_paths_select_as_the_cpu_does():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from tamis.runtime import samplers

    emb = _random_unit(np.random.default_rng(9), 20000, 64)
    assert kcenter(emb, 300, device="cuda") == kcenter(emb, 300, device="cpu") == _plain_kcenter(emb, 300)
    found = samplers._neighbours_torch(torch, emb, 16, "cosine")
    same = np.mean([set(a) == set(b) for a, b in zip(found, samplers._neighbours(emb, 16, "cosine"))])
    assert same > 0.999  # float32 products summed in another order: a boundary tie may swap

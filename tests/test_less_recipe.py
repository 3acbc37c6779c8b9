"""LESS end to end: `score grads` at every warmup checkpoint, `influence` over a target set, in a
recipe run on the tiny GPT-2 — checked against the features of each checkpoint computed directly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tamis.dsl.compile import compile_text
from tamis.runtime.executor import LocalExecutor, RunConfig

FIX = Path(__file__).parent / "fixtures" / "data"
POOL = pl.read_ndjson(FIX / "pool_small.jsonl")


def _recipe(target: Path, checkpoints: str = "all", weights: str = "lr") -> str:
    return f"""
data target = load("{target}")
model warm = warmup(pfm, 50%, lora(r=4, alpha=8, dropout=0.1), epochs=2, lr=1e-2, batch=2, max_length=64)
score grads using warm with dim=64, checkpoints="{checkpoints}", weights="{weights}", max_length=64 as train_grads
| score grads using warm on target with dim=64, checkpoints="{checkpoints}", weights="{weights}", max_length=64 as target_grads
| rank by influence(train_grads, target_grads) desc
| top 25%
"""


@pytest.fixture
def target(tmp_path) -> Path:
    path = tmp_path / "target.jsonl"
    rows = [{"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
            {"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Translate 'cat' into French.", "input": "", "output": "Chat."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _direct(warm, rows: pl.DataFrame, precondition: str, folders, weights) -> np.ndarray:
    from tamis.runtime.less import gradient_features

    return [gradient_features(warm.checkpoints.base, f, rows, dim=64, seed=0, precondition=precondition,
                              max_length=64, progress=False).features for f in folders]


@pytest.mark.parametrize("checkpoints,weights", [("all", "lr"), ("last", "uniform")])
def test_less_recipe_influence_is_the_weighted_sum_over_checkpoints(tiny_gpt2_dir, target, tmp_path, checkpoints,
                                                                     weights):
    cfg = RunConfig(pool=str(FIX / "pool_small.jsonl"), pfm=tiny_gpt2_dir, dtype="fp32",
                    cache_dir=str(tmp_path / "cache"), progress=False)
    ex = LocalExecutor(compile_text(_recipe(target, checkpoints, weights)).graph, cfg)
    res = ex.run()
    warm = next(m for m in ex._models.values() if getattr(m, "checkpoints", None) is not None)
    ck = warm.checkpoints
    assert len(ck.folders) == 2
    folders, lrs = (list(ck.folders), list(ck.mean_lrs)) if checkpoints == "all" else ([ck.folders[-1]], [1.0])
    w = np.array(lrs if weights == "lr" else [1.0] * len(folders))
    w = w / w.sum()
    train = _direct(warm, POOL, "adam", folders, w)
    tgt = _direct(warm, pl.read_ndjson(target), "none", folders, w)
    want = sum(wc * (tr.astype(np.float64) @ tg.astype(np.float64).T).mean(axis=1) for wc, tr, tg in zip(w, train, tgt))
    # a row the warmup's encoding skips (nothing left to score at max_length=64) has no features,
    # says why, and is never picked
    skipped = res.scores.filter(pl.col("train_grads").is_null())
    assert skipped["id"].to_list() == [i for i, v in zip(POOL["id"], want) if np.isnan(v)]
    assert skipped["train_grads_reason"].null_count() == 0
    scores = ex._frames[next(n for n in ex._order if ex.g.nodes[n]["op"] in ("topk", "rank"))]
    by_id = {i: v for i, v in zip(POOL["id"], want) if not np.isnan(v)}
    ranked = sorted(by_id, key=lambda i: -by_id[i])
    assert res.selected["id"].to_list() == ranked[:2]
    key = scores.select("id", pl.col("⟨rank key⟩")).to_dicts()
    for row in key:
        assert row["⟨rank key⟩"] == pytest.approx(by_id[row["id"]], rel=1e-5, abs=1e-7)
    # each cached vector is the checkpoints' normalised features scaled by √w_c
    first = np.asarray(res.scores["train_grads"].drop_nulls()[0], dtype=np.float64)
    assert np.linalg.norm(first) == pytest.approx(1.0, rel=1e-5)  # Σ_c w_c · 1


def test_less_needs_a_lora_warmup(tiny_gpt2_dir, target, tmp_path):
    from tamis.errors import TamisError

    text = _recipe(target).replace("lora(r=4, alpha=8, dropout=0.1), ", "")
    cfg = RunConfig(pool=str(FIX / "pool_small.jsonl"), pfm=tiny_gpt2_dir, dtype="fp32",
                    cache_dir=str(tmp_path / "cache"), progress=False)
    with pytest.raises(TamisError, match="LoRA"):
        LocalExecutor(compile_text(text).graph, cfg).run()


def test_kept_sign_matrix_projects_exactly_as_generated_blocks(monkeypatch):
    import torch

    from tamis.runtime import less

    g = torch.randn(5, 3000, generator=torch.Generator().manual_seed(1))
    kept = less.RademacherProjector(3000, 96, seed=7).project(g, 0)
    assert less._SIGN_CACHE["signs"].shape == (3000, 96)  # generated once, kept for the next call
    monkeypatch.setattr(less, "SIGN_CACHE_BYTES", 0)
    fresh = less.RademacherProjector(3000, 96, seed=7).project(g, 0)
    assert torch.allclose(kept, fresh, rtol=1e-6, atol=1e-6)
    part = less.RademacherProjector(3000, 96, seed=7).project(g[:, 1000:2000], 1000)
    monkeypatch.setattr(less, "SIGN_CACHE_BYTES", 1 << 30)
    assert torch.allclose(less.RademacherProjector(3000, 96, seed=7).project(g[:, 1000:2000], 1000), part, atol=1e-6)


def test_lr_weights_of_an_untrained_warmup_are_an_error_not_a_silent_switch(tmp_path):
    from tamis.errors import TamisError
    from tamis.ops.less import _checkpoints
    from tamis.runtime.warmup import Checkpoints

    (tmp_path / "epoch-1").mkdir()
    (tmp_path / "epoch-1" / "adapter_config.json").write_text("{}")
    model = type("M", (), {"checkpoints": Checkpoints(None, (tmp_path / "epoch-1",), (0.0,), "k", {})})()
    with pytest.raises(TamisError, match='weights="uniform"'):
        _checkpoints(model, "all", "lr")
    assert _checkpoints(model, "all", "uniform")[1] == [1.0]


def test_influence_by_a_subtask_field_is_the_max_of_per_subtask_means():
    """`influence(g, t, t.subtask)`: one target set, any number of subtasks of any sizes (a field of
    the target rows), against the runtime's matching (mean per subtask, max over subtasks)."""
    from tamis.ops.functions import influence as influence_expr
    from tamis.runtime.less import influence as matching

    rng = np.random.default_rng(0)
    train = rng.normal(size=(7, 5)).astype(np.float32)
    target = rng.normal(size=(6, 5)).astype(np.float32)
    labels = ["a", "b", "a", "c", "a", "b"]
    frame = pl.DataFrame({"g": pl.Series(train.tolist(), dtype=pl.Array(pl.Float32, 5))})
    t = pl.Series([target.tolist()], dtype=pl.List(pl.Array(pl.Float32, 5)))
    lab = pl.Series([labels], dtype=pl.List(pl.String))
    got = frame.select(influence_expr(pl.col("g"), pl.lit(t), pl.lit(lab))).to_series().to_numpy()
    want = matching(train[:, None, :], target[:, None, :], [1.0], labels)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    direct = np.max([(train.astype(np.float64) @ target[[i for i, x in enumerate(labels) if x == s]].T.astype(np.float64)
                      ).mean(axis=1) for s in "abc"], axis=0)
    np.testing.assert_allclose(got, direct, rtol=1e-6)
    # lowering: a field of the target set, written NAME.field, is accepted only for a score of that set
    head = 'data t = load("t.jsonl")\nscore embedding using encoder("m") as n | '
    compile_text(head + 'score embedding using encoder("m") on t as tl | rank by influence(n, tl, tl.subtask) | top 1')
    with pytest.raises(Exception, match="must be a score of another dataset"):
        compile_text(head + "rank by influence(n, n.subtask) | top 1")


def test_less_recipe_with_subtasks_from_a_field_of_one_target_set(tiny_gpt2_dir, tmp_path):
    """One target file whose rows carry a `subtask` field: influence is the max over subtasks of the
    mean over each subtask's rows (LESS' matching), computed directly from each checkpoint's features."""
    path = tmp_path / "target.jsonl"
    rows = [{"instruction": "What is the capital of France?", "input": "", "output": "Paris.", "subtask": "geo"},
            {"instruction": "Name a colour.", "input": "", "output": "Blue.", "subtask": "words"},
            {"instruction": "What is the capital of Spain?", "input": "", "output": "Madrid.", "subtask": "geo"},
            {"instruction": "Translate 'cat' into French.", "input": "", "output": "Chat.", "subtask": "words"},
            {"instruction": "What river flows through Paris?", "input": "", "output": "The Seine.", "subtask": "geo"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = _recipe(path).replace("influence(train_grads, target_grads)",
                                 "influence(train_grads, target_grads, target_grads.subtask)")
    cfg = RunConfig(pool=str(FIX / "pool_small.jsonl"), pfm=tiny_gpt2_dir, dtype="fp32",
                    cache_dir=str(tmp_path / "cache"), progress=False)
    ex = LocalExecutor(compile_text(text).graph, cfg)
    res = ex.run()
    warm = next(m for m in ex._models.values() if getattr(m, "checkpoints", None) is not None)
    ck = warm.checkpoints
    w = np.array(ck.mean_lrs) / sum(ck.mean_lrs)
    train = _direct(warm, POOL, "adam", list(ck.folders), w)
    tgt = _direct(warm, pl.read_ndjson(path), "none", list(ck.folders), w)
    sims = sum(wc * (tr.astype(np.float64) @ tg.astype(np.float64).T) for wc, tr, tg in zip(w, train, tgt))
    labels = np.array([r["subtask"] for r in rows])
    want = np.max([sims[:, labels == s].mean(axis=1) for s in ("geo", "words")], axis=0)
    by_id = {i: v for i, v in zip(POOL["id"], want) if not np.isnan(v)}
    assert res.selected["id"].to_list() == sorted(by_id, key=lambda i: -by_id[i])[:2]
    scores = ex._frames[next(n for n in ex._order if ex.g.nodes[n]["op"] in ("topk", "rank"))]
    for row in scores.select("id", pl.col("⟨rank key⟩")).to_dicts():
        assert row["⟨rank key⟩"] == pytest.approx(by_id[row["id"]], rel=1e-5, abs=1e-7)
    # the plain mean over all five rows ranks differently: the subtasks matter here
    assert not np.allclose(want[~np.isnan(want)], sims.mean(axis=1)[~np.isnan(want)])

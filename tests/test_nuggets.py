"""Nuggets: anchors, zero-/one-shot losses and the golden score, against direct computations.

The model is the tiny randomly initialised GPT-2 with the real GPT-2 tokenizer: its losses
are real numbers of a real causal LM, so the batched, key/value-sharing scorer can be
checked against scoring each (demonstration + anchor) text on its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from tamis.dsl.compile import compile_text
from tamis.runtime import nuggets
from tamis.runtime.executor import LocalExecutor, RunConfig
from tamis.runtime.lm_scoring import score_answers

FIX = Path(__file__).parent / "fixtures" / "data"
POOL = pl.read_ndjson(FIX / "pool_small.jsonl")


def _prompt(row) -> tuple[str, str]:
    """Nuggets' tasks/alpaca.py multiple_gen_promptify, written out independently."""
    ins, inp, out = row["instruction"].strip(), (row["input"] or "").strip(), row["output"].strip()
    q = f"Instruction:\n{ins}\nInput:\n{inp}\nResponse:\n" if inp else f"Instruction:\n{ins}\nResponse:\n"
    return q, q + out


def _direct_loss(lm, prefix_text: str | None, row, max_length: int) -> float | None:
    """One text alone: [demonstration with special tokens] + anchor (no special tokens, truncated),
    mean cross-entropy of the anchor's answer tokens (None when none is left)."""
    tok = lm.tokenizer
    q, full = _prompt(row)
    anchor = tok(full, add_special_tokens=False)["input_ids"][:max_length]
    first = len(tok(q, add_special_tokens=False)["input_ids"])
    prefix = tok(prefix_text)["input_ids"] if prefix_text is not None else []
    if first >= len(anchor):
        return None
    ids = torch.tensor([prefix + anchor])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].double(), -1)
    p = len(prefix)
    targets = ids[0, p + first : p + len(anchor)]
    return float(-logp[p + first - 1 : p + len(anchor) - 1].gather(1, targets[:, None]).mean())


def _anchors() -> pl.DataFrame:
    # a duplicate anchor, an anchor with an empty answer, and one cut by max_length below
    extra = pl.DataFrame({"id": ["long"], "instruction": ["Write a long story."], "input": [""],
                          "output": [" ".join(["word"] * 80)]})
    empty = pl.DataFrame({"id": ["empty"], "instruction": ["Say nothing."], "input": [""], "output": ["   "]})
    return pl.concat([POOL.slice(2, 3), POOL.slice(2, 1), extra, empty], how="vertical")


def test_one_shot_losses_equal_each_text_scored_alone(tiny_lm):
    anchors = _anchors()
    values, reasons = nuggets.one_shot_losses(tiny_lm, POOL.slice(0, 3), anchors, max_length=48, batch_tokens=64)
    assert reasons == [None, None, None]
    for c, cand in enumerate(POOL.slice(0, 3).iter_rows(named=True)):
        for a, anchor in enumerate(anchors.iter_rows(named=True)):
            want = _direct_loss(tiny_lm, _prompt(cand)[1], anchor, 48)
            if want is None:
                assert np.isnan(values[c][a])
            else:
                assert values[c][a] == pytest.approx(want, rel=1e-5)
    assert values[0][0] == values[0][3]  # the duplicate anchor: the same loss


def test_zero_shot_template_scores_the_same_tokens(tiny_lm):
    anchors = _anchors()
    table = score_answers(tiny_lm, anchors, metric="loss", template="nuggets", max_length=48, progress=False)
    for a, anchor in enumerate(anchors.iter_rows(named=True)):
        want = _direct_loss(tiny_lm, None, anchor, 48)
        if want is None:
            assert table.value[a] is None and table.reason[a]
        else:
            assert table.value[a] == pytest.approx(want, rel=1e-5)


def test_win_rate_counts_anchors_the_demonstration_helps():
    from tamis.ops.functions import win_rate

    frame = pl.DataFrame({"one": [[1.0, 2.0, 3.0], [0.5, 9.0, float("nan")], None]},
                         schema={"one": pl.List(pl.Float64)})
    zero = pl.lit(pl.Series([[1.5, 2.5, None]], dtype=pl.List(pl.Float64)))
    got = frame.select(win_rate(pl.col("one"), zero)).to_series().to_list()
    assert got == [pytest.approx(2 / 3), pytest.approx(1 / 3), None]  # an unscored anchor never wins


def test_anchor_indices_are_the_rows_nearest_the_kmeans_centroids(tiny_lm):
    from sklearn.cluster import KMeans

    from tamis.runtime.warmup_sampling import instruction_embeddings_and_perplexity

    picked = nuggets.anchor_indices(tiny_lm, POOL, 3, 0, progress=False)
    emb, _ = instruction_embeddings_and_perplexity(tiny_lm, [_prompt(r)[1] for r in POOL.iter_rows(named=True)],
                                                   max_length=512, progress=False)
    centers = KMeans(n_clusters=3, random_state=0, n_init=10).fit(emb.astype(np.float64)).cluster_centers_
    assert picked == [int(((emb - c) ** 2).sum(1).argmin()) for c in centers]
    with pytest.raises(Exception, match="at least 9 rows"):
        nuggets.anchor_indices(tiny_lm, POOL, 9, 0, progress=False)


RECIPE = """
data anchors = anchors(pool, k=3, model=pfm)
score loss using pfm on anchors with template="nuggets", max_length=48 as zero_shot
| score icl_loss using pfm with anchors=anchors, max_length=48 as one_shot
| let golden = win_rate(one_shot, zero_shot)
| rank by golden desc
| top 25%
"""


def test_nuggets_recipe_runs_end_to_end_and_resumes_from_the_cache(tiny_gpt2_dir, tmp_path):
    from tamis.runtime.models import load_causal_lm

    cfg = RunConfig(pool=str(FIX / "pool_small.jsonl"), pfm=tiny_gpt2_dir, dtype="fp32",
                    cache_dir=str(tmp_path / "cache"), chunk_rows=3, progress=False)
    res = LocalExecutor(compile_text(RECIPE).graph, cfg).run()
    assert res.selected.height == 2  # 25% of 8
    lm = load_causal_lm(tiny_gpt2_dir, dtype="fp32")
    anchor_rows = POOL[nuggets.anchor_indices(lm, POOL, 3, 0, progress=False)]
    zero = [_direct_loss(lm, None, a, 48) for a in anchor_rows.iter_rows(named=True)]
    golden = dict(zip(res.scores["id"], res.scores["golden"]))
    for cand in POOL.iter_rows(named=True):
        one = [_direct_loss(lm, _prompt(cand)[1], a, 48) for a in anchor_rows.iter_rows(named=True)]
        wins = sum(1 for o, z in zip(one, zero) if o is not None and z is not None and o < z)
        assert golden[cand["id"]] == pytest.approx(wins / 3)
    ranked = sorted(golden.values(), reverse=True)
    assert sorted(res.selected["golden"].to_list(), reverse=True) == ranked[:2]
    zero_stage = next(s for s in res.stages if s.label.startswith("score loss"))
    assert zero_stage.target_rows == 3 and zero_stage.rows_out == 8  # anchors scored, the pool passes through

    again = LocalExecutor(compile_text(RECIPE).graph, cfg).run()
    assert [s.scored_rows for s in again.stages if s.label.startswith("score")] == [0, 0]
    assert again.selected["id"].to_list() == res.selected["id"].to_list()

"""Probe experiments and fitted selectors (Instruction-Mining, InstructionGPT-4): subsets drawn as
said, probes labelled by their real evaluation loss, the linear rule equal to numpy's least squares,
InstructionGPT-4's self-attention selector, and resume after a killed run."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest

from tamis.dsl.compile import compile_text
from tamis.errors import RecipeError, TamisError
from tamis.runtime.executor import LocalExecutor, RunConfig
from tamis.runtime.fit import fit_linear, fit_selfattn, subset_means
from tamis.runtime.probes import SUBSET, draw_subsets
from pools import chatter_pool

ROWS = 40


def _rows(n: int) -> pl.DataFrame:
    return pl.DataFrame({"id": [f"r{i}" for i in range(n)], "instruction": [f"q{i}" for i in range(n)],
                         "input": [""] * n, "output": [f"a{i}" for i in range(n)]})


# --------------------------------------------------------------------------- subsets


def test_subsets_hold_out_first_then_draw_without_replacement():
    rows = _rows(50)
    got = draw_subsets(rows, 4, {"count": 10}, 7, {"count": 5})
    held = got.filter(pl.col(SUBSET) == -1)["id"]
    assert held.len() == 5
    for i in range(4):
        ids = got.filter(pl.col(SUBSET) == i)["id"]
        assert ids.len() == ids.n_unique() == 10
        assert not ids.is_in(held.implode()).any()  # never trained on the evaluation rows
    assert got.equals(draw_subsets(rows, 4, {"count": 10}, 7, {"count": 5}))  # seeded
    assert not got.equals(draw_subsets(rows, 4, {"count": 10}, 8, {"count": 5}))


def test_subsets_without_size_partition_the_rest_and_fractions_count_rows():
    got = draw_subsets(_rows(23), 4, None, 0, {"fraction": 0.1})
    parts = got.filter(pl.col(SUBSET) >= 0)
    assert parts.height == 20 and parts["id"].n_unique() == 20  # 21 left after 2 held out: 4 × 5, disjoint
    assert got.filter(pl.col(SUBSET) == -1).height == 2


def test_subsets_errors_say_what_is_wrong():
    with pytest.raises(TamisError, match="more than the 45 row"):
        draw_subsets(_rows(50), 2, {"count": 46}, 0, {"count": 5})
    with pytest.raises(TamisError, match="already has a field 'subset'"):
        draw_subsets(_rows(5).with_columns(pl.lit(1).alias("subset")), 2, None, 0, None)
    with pytest.raises(TamisError, match="leaves no rows"):
        draw_subsets(_rows(5), 2, None, 0, {"count": 5})


def test_probes_need_an_evaluation_set_at_check_time():
    text = ('data t = load("t.jsonl")\ndata s = subsets(t, n=3, size=4)\nmodel p = train(pfm, on=s)\n'
            'model r = fit("linear", on=t, labels=p, features=["length"])\nscore length | score predict using r | rank by predict asc | top 1')
    with pytest.raises(RecipeError, match="evaluation set") as e:
        compile_text(text)
    assert "holdout" in str(e.value)
    compile_text(text.replace("size=4)", "size=4, holdout=2)"))
    with pytest.raises(RecipeError, match="needs on=subsets"):
        compile_text('data t = load("t.jsonl")\nmodel m = train(pfm, on=t, evaluate_on=t)\nscore loss using m | rank by loss desc | top 1')


# --------------------------------------------------------------------------- the linear rule


def test_linear_rule_is_numpys_least_squares_on_log_loss():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 3))
    losses = np.exp(0.5 + x @ np.array([0.2, -0.1, 0.05]) + rng.normal(scale=0.01, size=12))
    rule = fit_linear(x, losses, ["a", "b", "c"], log_loss=True)
    design = np.column_stack([np.ones(12), x])
    want, *_ = np.linalg.lstsq(design, np.log(losses), rcond=None)
    assert [rule.intercept, *rule.coefficients] == pytest.approx(want.tolist(), abs=1e-12)
    fitted = design @ want
    y = np.log(losses)
    assert rule.r2 == pytest.approx(1 - np.sum((y - fitted) ** 2) / np.sum((y - y.mean()) ** 2))
    assert rule.info["coefficients"] == pytest.approx({"a": want[1], "b": want[2], "c": want[3]})
    frame = pl.DataFrame({"a": [1.0, None], "b": [2.0, 0.0], "c": [3.0, 0.0]})
    pred = rule.predict(frame)
    assert pred[0] == pytest.approx(math.exp(want[0] + want[1] + 2 * want[2] + 3 * want[3]))
    assert pred[1] is None  # a missing feature gives no prediction, not a guess
    assert "note" not in rule.info


def test_linear_rule_says_when_probes_are_too_few():
    rule = fit_linear(np.array([[1.0, 2.0], [2.0, 1.0], [3.0, 5.0]]), np.array([1.0, 2.0, 3.0]), ["a", "b"], True)
    assert "interpolates" in rule.info["note"]


def test_subset_means_join_each_subset_to_its_rows():
    members = pl.DataFrame({"subset": [0, 0, 1, 1, 1], "id": ["a", "b", "b", "c", "d"]},
                           schema={"subset": pl.Int32, "id": pl.String})
    feats = pl.DataFrame({"id": ["a", "b", "c", "d"], "f": [1.0, 3.0, 5.0, None]})
    assert subset_means(members, feats, ["f"]).ravel().tolist() == [2.0, 4.0]  # nulls left out of a mean
    with pytest.raises(TamisError, match="no value on some probe"):
        subset_means(members, feats.with_columns(pl.when(pl.col("id") != "a").then(None).otherwise(1.0).alias("f")),
                     ["f"])


# --------------------------------------------------------------------------- the self-attention selector


def _sets(seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    sets = [rng.normal(loc=rng.normal(), size=(int(rng.integers(5, 9)), 2)) for _ in range(16)]
    losses = np.array([2.0 + 0.5 * s[:, 0].mean() - 0.2 * s[:, 1].mean() for s in sets])
    return sets, losses


def test_selfattn_learns_the_probes_and_is_seeded():
    sets, losses = _sets()
    a = fit_selfattn(sets, losses, ["f", "g"], layers=2, heads=1, epochs=200, lr=0.01, seed=3)
    b = fit_selfattn(sets, losses, ["f", "g"], layers=2, heads=1, epochs=200, lr=0.01, seed=3)
    assert a.info["r2"] > 0.9  # a linear target the network can follow
    assert a.info["r2"] == b.info["r2"]
    frame = pl.DataFrame({"f": [0.3, 1.0], "g": [-0.2, 0.5]})
    assert a.predict(frame).to_list() == b.predict(frame).to_list()


def test_selfattn_row_prediction_is_the_reference_repeat_trick():
    """The reference scores a row by repeating it 114 times and averaging: the same as a set of one."""
    import torch

    sets, losses = _sets(1)
    sel = fit_selfattn(sets, losses, ["f", "g"], layers=2, heads=2, epochs=20, lr=0.01, seed=0)
    row = np.array([[0.4, -1.2]])
    z = torch.tensor(((row - sel.mean) / sel.std), dtype=torch.float32).unsqueeze(0).repeat(1, 114, 1)
    with torch.no_grad():
        repeated = float(sel.net(z).mean()) * sel.label_std + sel.label_mean
    assert sel.predict(pl.DataFrame({"f": [0.4], "g": [-1.2]}))[0] == pytest.approx(repeated, rel=1e-5)


def test_selfattn_refuses_a_feature_with_no_values():
    sets, losses = _sets()
    nulls = [np.column_stack([s[:, 0], np.full(len(s), np.nan)]) for s in sets]  # a judge that never answered
    with pytest.raises(TamisError, match="'g' have no value on any probe's rows"):
        fit_selfattn(nulls, losses, ["f", "g"], layers=1, heads=1, epochs=1, lr=0.01, seed=0)


def test_selfattn_heads_must_divide_the_features():
    sets, losses = _sets()
    with pytest.raises(TamisError, match="heads=2 must divide"):
        fit_selfattn([s[:, :1] for s in sets], losses, ["f"], layers=1, heads=2, epochs=1, lr=0.01, seed=0)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return chatter_pool(tmp_path_factory.mktemp("pool") / "chatter.jsonl", ROWS)


def _recipe(pool, kind: str = "linear", extra: str = "") -> str:
    return f"""
data train_pool = load("{pool}")
data probe_sets = subsets(train_pool, n=5, size=8, holdout=6, seed=1)
model probes = train(pfm, on=probe_sets, lora=lora(r=4, alpha=8, dropout=0.0), epochs=1, lr=1e-2, batch=4, max_length=64)
model rule = fit("{kind}", on=train_pool, labels=probes, features=["length", "lexical"]{extra})
score length, mtld as lexical
| score predict using rule as predicted_loss
| rank by predicted_loss asc
| top 10
"""


def _run(pool, pfm, cache, text, **kw):
    cfg = RunConfig(pool=str(pool), pfm=pfm, dtype="fp32", cache_dir=str(cache), progress=False, **kw)
    ex = LocalExecutor(compile_text(text).graph, cfg)
    return ex, ex.run()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One score and artifact cache for the module: the probes are trained once, then reused."""
    return tmp_path_factory.mktemp("probe_cache")


@pytest.fixture(scope="module")
def first_run(pool, tiny_gpt2_dir, cache):
    return _run(pool, tiny_gpt2_dir, cache, _recipe(pool))


def test_probes_losses_fit_and_prediction_end_to_end(pool, tiny_gpt2_dir, cache, first_run):
    from tamis.runtime.lm_scoring import score_answers
    from tamis.runtime.models import load_causal_lm
    from tamis.runtime.warmup import train_on

    ex, res = first_run
    probes = next(m for m in ex._models.values() if type(m).__name__ == "ProbeSet")
    rule = next(m for m in ex._models.values() if type(m).__name__ == "LinearRule")
    assert len(probes.probes) == 5 and all(len(p.ids) == 8 for p in probes.probes)

    # each probe's label, recomputed directly: train the same rows (the cached model), score the held-out rows
    sets = draw_subsets(_loaded(pool), 5, {"count": 8}, 1, {"count": 6})
    held = sets.filter(pl.col(SUBSET) == -1).drop(SUBSET)
    params = {"lora": {"r": 4, "alpha": 8.0, "dropout": 0.0}, "epochs": 1, "lr": 1e-2, "batch": 4, "max_length": 64,
              "seed": 42}
    base = load_causal_lm(tiny_gpt2_dir, device="cpu", dtype="fp32")
    for p in probes.probes:
        subset = sets.filter(pl.col(SUBSET) == p.subset).drop(SUBSET)
        assert subset["id"].to_list() == p.ids
        lm, summary = train_on(base, subset, params, ex.cache.artifacts, ex.cfg.options(), label="direct")
        assert summary["cached"]  # the recipe's probe is this very model
        table = score_answers(lm, held, metric="loss", template="alpaca", max_length=64, share_prefix=False,
                              progress=False)
        assert p.loss == pytest.approx(float(np.mean([v for v in table.value if v is not None])), rel=1e-6)

    # the rule: numpy's least squares from each subset's mean scores to log(loss)
    scores = res.scores.select("id", "length", "lexical")
    x = np.array([[scores.filter(pl.col("id").is_in(p.ids))[c].mean() for c in ("length", "lexical")]
                  for p in probes.probes])
    want, *_ = np.linalg.lstsq(np.column_stack([np.ones(5), x]), np.log(probes.losses), rcond=None)
    assert [rule.intercept, *rule.coefficients] == pytest.approx(want.tolist(), rel=1e-9, abs=1e-12)
    pred = res.scores.select("id", "predicted_loss", "length", "lexical")
    direct = np.exp(want[0] + want[1] * pred["length"].to_numpy() + want[2] * pred["lexical"].to_numpy())
    assert pred["predicted_loss"].to_numpy() == pytest.approx(direct, rel=1e-9)
    assert res.selected["id"].to_list() == pred.sort("predicted_loss", maintain_order=True)["id"].head(10).to_list()

    # the run report shows the fit and the probes
    training = {k: v for k, v in ex.model_info.items() if k.endswith(":training")}
    fit_info = next(v for v in training.values() if v.get("kind") == "linear")
    assert set(fit_info["coefficients"]) == {"length", "lexical"} and fit_info["r2"] is not None
    probe_info = next(v for v in training.values() if "losses" in v)
    assert probe_info["probes"] == 5 and probe_info["cached"] == 0 and probe_info["evaluation"] == "held-out rows"

    # a second run trains nothing and selects the same rows
    ex2, res2 = _run(pool, tiny_gpt2_dir, cache, _recipe(pool))
    again = next(v for k, v in ex2.model_info.items() if k.endswith(":training") and "losses" in v)
    assert again["cached"] == 5
    assert res2.selected["id"].to_list() == res.selected["id"].to_list()


def _loaded(path) -> pl.DataFrame:
    from tamis.runtime.data import load_pool

    return load_pool(str(path)).frame


def test_a_killed_probe_run_keeps_its_finished_probes(pool, tiny_gpt2_dir, tmp_path, monkeypatch):
    import tamis.runtime.probes as probes_mod

    real = probes_mod.evaluation_loss
    calls = {"n": 0, "die_at": 3}

    def counted(*a, **kw):
        calls["n"] += 1
        if calls["n"] == calls["die_at"]:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(probes_mod, "evaluation_loss", counted)
    text = _recipe(pool).replace("n=5, size=8", "n=3, size=4")
    with pytest.raises(KeyboardInterrupt):
        _run(pool, tiny_gpt2_dir, tmp_path / "cache", text)
    calls["die_at"] = None
    ex, _ = _run(pool, tiny_gpt2_dir, tmp_path / "cache", text)
    info = next(v for k, v in ex.model_info.items() if k.endswith(":training") and "losses" in v)
    assert info["cached"] == 2 and info["probes"] == 3
    assert calls["n"] == 4  # the rerun evaluated only the probe the kill interrupted


def test_selfattn_selector_end_to_end(pool, tiny_gpt2_dir, cache, first_run):
    ex, res = _run(pool, tiny_gpt2_dir, cache, _recipe(pool, "selfattn", ", layers=2, heads=2, epochs=30"))
    sel = next(m for m in ex._models.values() if type(m).__name__ == "SelfAttnSelector")
    pred = res.scores["predicted_loss"]
    assert pred.null_count() == 0 and pred.n_unique() > 1
    assert pred.to_list() == pytest.approx(sel.predict(res.scores.select("length", "lexical")).to_list())
    assert res.selected.height == 10


def test_the_fit_names_a_feature_no_stage_produces(pool, tiny_gpt2_dir, cache, first_run):
    text = _recipe(pool).replace('features=["length", "lexical"]', 'features=["length", "lexical", "nope"]')
    text = text.replace("score length, mtld as lexical", "score length, mtld as lexical\n| let nope = length * 2")
    with pytest.raises(TamisError, match="feature 'nope' is neither a field"):
        _run(pool, tiny_gpt2_dir, cache, text)


def test_the_run_report_shows_the_rule_and_the_probes(first_run):
    from tamis.report.run_report import as_dict, markdown

    ex, res = first_run
    report = json.loads(json.dumps(as_dict(res, "probes", ex.cfg)))
    text = markdown(report)
    assert "probes: 5 (0 from cache), [8] rows each, loss on held-out rows (6 rows)" in text
    assert "fit(linear) on 5 probes: log(loss) = " in text and "·length" in text and "R² = " in text


def test_the_run_report_renders_a_datasets_account_and_where_stages_ran():
    from tamis.report.run_report import markdown

    stage = {"label": "score length", "rows_in": 2, "rows_out": 2, "seconds": 0.1, "model_seconds": 0.0,
             "scored_rows": 2, "cached_rows": 0, "skipped": {}, "engine": "ray"}
    report = {"recipe": "r", "pool": "p.jsonl", "pool_load": {"rows_loaded": 2}, "pfm": None, "selected_rows": 1,
              "seconds": 1.0, "stages": [stage],
              "models": {"d2:dataset": {"label": "evolve(seeds)", "dataset": "evolve", "summary": "4 seed(s), 1 failed",
                                        "generated_now": 15, "seconds": 628.8}}}
    text = markdown(report)
    assert "| d2:dataset | evolve(seeds): 4 seed(s), 1 failed (15 generated now, 628.8 s) | | |" in text
    assert "| ran on |" in text and "| 0 |  | ray |" in text
    del stage["engine"]
    assert "ran on" not in markdown(report)  # the local engine's report keeps its columns


def test_the_run_report_counts_evaluation_rows_a_probe_could_not_score():
    from tamis.report.run_report import markdown

    probes = {"probes": 2, "cached": 0, "evaluation": "held-out rows", "eval_rows": 6, "eval_rows_scored": [4, 5],
              "losses": [2.0, 2.1], "rows_per_probe": [8]}
    report = {"recipe": "r", "pool": "p.jsonl", "pool_load": {"rows_loaded": 2}, "pfm": None, "selected_rows": 1,
              "seconds": 1.0, "stages": [], "models": {"m3:training": probes}}
    assert "(6 rows, 1–2 of them with no scorable answer" in markdown(report)
    probes["eval_rows_scored"] = [6]
    assert "loss on held-out rows (6 rows) |" in markdown(report)

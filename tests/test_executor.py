"""`tamis run` end to end on a real (tiny, randomly initialised) GPT-2 saved to disk, and on text scorers."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from tamis.cli import app
from tamis.dsl.compile import compile_text
from tamis.errors import TamisError
from tamis.runtime.executor import LocalExecutor, PlanError, RunConfig

FIX = Path(__file__).parent / "fixtures" / "data"
runner = CliRunner()


def _run(text: str, cfg: RunConfig):
    return LocalExecutor(compile_text(text).graph, cfg).run()


def test_text_scorer_recipe_selects_by_rank(tmp_path):
    res = _run("score length | rank | top 3", RunConfig(pool=str(FIX / "pool_small.jsonl"), no_cache=True, progress=False))
    lengths = res.selected["length"].to_list()
    assert len(lengths) == 3 and lengths == sorted(lengths, reverse=True)
    every = res.scores.sort("length", descending=True)["length"].head(3).to_list()
    assert lengths == every


def test_percent_is_of_the_pool_not_of_the_remaining_rows():
    res = _run("score length | where length > 0 | rank | top 50%",
               RunConfig(pool=str(FIX / "pool_small.jsonl"), no_cache=True, progress=False))
    assert res.selected.height == 4  # 50% of 8 pool rows


def test_unrunnable_recipe_fails_before_any_work(monkeypatch):
    """Every built-in has a kernel now: take one away (as a plug-in's missing kernel would be)."""
    import tamis.ops  # noqa: F401  (registers the built-in kernels)
    from tamis.ops import kernel as kernel_table

    monkeypatch.delitem(kernel_table._KERNELS, ("data", "sample"))
    with pytest.raises(PlanError, match="dataset `sample.*` has no local runtime"):
        _run('data e = sample(pool, 5)\nscore length on e as n, length | rank by length | top 1',
             RunConfig(pool="does-not-matter.jsonl"))


def test_ifd_run_matches_scoring_each_row_alone(tiny_gpt2_dir, tmp_path):
    """The executor's cached, chunked, joined scores equal the scorer run on one row at a time."""
    from tamis.runtime.lm_scoring import score_answers
    from tamis.runtime.models import load_causal_lm

    cfg = RunConfig(pool=str(FIX / "pool_small.jsonl"), pfm=tiny_gpt2_dir, dtype="fp32", cache_dir=str(tmp_path / "c"),
                    chunk_rows=3, progress=False)
    res = _run('score ifd using pfm with template="bare", max_length=128 | where ifd < 10 | rank | top 100%', cfg)
    lm = load_causal_lm(tiny_gpt2_dir, dtype="fp32")
    pool = pl.read_ndjson(FIX / "pool_small.jsonl")
    got = dict(zip(res.scores["id"], res.scores["ifd"]))
    for i in range(pool.height):
        one = score_answers(lm, pool[i:i + 1], metric="ifd", template="bare", max_length=128, progress=False,
                            share_prefix=False)
        if one.value[0] is None:  # skipped alone (with a reason) ⇒ skipped in the run too
            assert got[pool["id"][i]] is None and one.reason[0]
        else:
            assert got[pool["id"][i]] == pytest.approx(one.value[0], rel=1e-5, abs=1e-6)
    assert sum(v is not None for v in got.values()) >= 4
    ranked = res.selected["ifd"].to_list()
    assert ranked == sorted(ranked, reverse=True)


def test_kill_and_resume_rescoring_nothing_finished(tiny_gpt2_dir, tmp_path, monkeypatch):
    import tamis.runtime.lm_scoring as lms

    recipe = "score ifd using pfm with max_length=128 | rank | top 2"
    cfg = RunConfig(pool=str(FIX / "pool_small.jsonl"), pfm=tiny_gpt2_dir, dtype="fp32",
                    cache_dir=str(tmp_path / "cache"), chunk_rows=3, progress=False)
    real = lms.score_answers
    calls = {"n": 0}

    def dies_on_second_chunk(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C mid-run
        return real(*a, **k)

    monkeypatch.setattr(lms, "score_answers", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        _run(recipe, cfg)
    monkeypatch.setattr(lms, "score_answers", real)
    res = _run(recipe, cfg)
    stage = next(s for s in res.stages if s.label.startswith("score ifd"))
    assert (stage.cached_rows, stage.scored_rows) == (3, 5)
    again = _run(recipe, cfg)
    stage = next(s for s in again.stages if s.label.startswith("score ifd"))
    assert (stage.cached_rows, stage.scored_rows) == (8, 0)
    assert again.scores.equals(res.scores)


def test_cli_run_writes_outputs_atomically_and_leaves_input(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_bytes((FIX / "pool_small.jsonl").read_bytes())
    before = pool.read_bytes()
    recipe = tmp_path / "r.tamis"
    recipe.write_text("score length | rank | top 50%\n")
    out = tmp_path / "sel.jsonl"
    res = runner.invoke(app, ["run", str(recipe), "--pool", str(pool), "-o", str(out), "--scores",
                              str(tmp_path / "s.parquet"), "--no-cache", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert len(out.read_text().splitlines()) == 4
    assert pl.read_parquet(tmp_path / "s.parquet").height == 8
    report = json.loads((tmp_path / "sel.report.json").read_text())
    assert [s["rows_out"] for s in report["stages"]] == [8, 4]
    assert pool.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cli_run_bad_pool_names_row_and_field(tmp_path):
    pool = tmp_path / "bad.jsonl"
    pool.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\nnot json\n')
    res = runner.invoke(app, ["run", "ifd", "--pool", str(pool), "-o", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 1
    assert "row 2" in res.output and "'output'" in res.output and "row 3" in res.output
    assert not (tmp_path / "o.jsonl").exists()


def test_superfiltering_reference_runs_with_a_local_gpt2(tiny_gpt2_dir, tmp_path):
    """`hf("gpt2")` resolves to a local folder with --model; the proxy scores with it; IFD < 1 kept, top 10%."""
    out = tmp_path / "sel.jsonl"
    res = runner.invoke(app, ["run", "superfiltering_reference", "--pool", str(FIX / "pool_small.jsonl"),
                              "--model", f"gpt2={tiny_gpt2_dir}", "--pfm", tiny_gpt2_dir, "-o", str(out),
                              "--cache-dir", str(tmp_path / "c"), "--dtype", "fp32", "--no-progress"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) <= 1 and all(r["ifd"] < 1 for r in rows)  # 10% of 8 rows rounds to 1
    report = json.loads((tmp_path / "sel.report.json").read_text())
    assert report["stages"][0]["label"].startswith("score ifd using proxy(hf(gpt2))")


@pytest.mark.parametrize("recipe", [
    'score ifd using warmup(pfm, 50%, lora(r=4), lr=1e-3, batch=2) with max_length=128 | rank | top 2',
    'score ifd using warmup(pfm, 4, select="cherry", clusters=2, lr=1e-3, batch=2) with max_length=128 | rank | top 2',
])
def test_warmup_trains_once_then_comes_from_the_cache(tiny_gpt2_dir, tmp_path, recipe):
    cfg = RunConfig(pool=str(FIX / "pool_small.jsonl"), pfm=tiny_gpt2_dir, dtype="fp32",
                    cache_dir=str(tmp_path / "cache"), progress=False)
    first = _run(recipe, cfg)
    training = next(v for k, v in first.models.items() if k.endswith(":training"))
    assert training["cached"] is False and training["steps"] >= 1
    # random: exactly 50% of 8 rows; Cherry: 2 per cluster, only from each cluster's 25-75% perplexity band
    assert training["rows"] == 4 if "cherry" not in recipe else 1 <= training["rows"] <= 4
    second = _run(recipe, cfg)
    again = next(v for k, v in second.models.items() if k.endswith(":training"))
    assert again["cached"] is True
    assert second.scores.equals(first.scores)
    # the warmed-up model scores differently from the untrained PFM
    plain = _run('score ifd using pfm with max_length=128 | rank | top 2', cfg)
    assert plain.scores["ifd"].to_list() != first.scores["ifd"].to_list()


def test_runnable_hybrid_end_to_end(tiny_gpt2_dir, tmp_path):
    """superfiltered_ifd: proxy IFD pre-filter → warmup PFM IFD + MTLD → blended rank; counts add up stage by stage."""
    out = tmp_path / "sel.jsonl"
    res = runner.invoke(app, ["run", "superfiltered_ifd", "--pool", str(FIX / "pool_small.jsonl"),
                              "--model", f"gpt2={tiny_gpt2_dir}", "--pfm", tiny_gpt2_dir, "-o", str(out),
                              "--scores", str(tmp_path / "s.parquet"), "--cache-dir", str(tmp_path / "c"),
                              "--dtype", "fp32", "--no-progress"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "sel.report.json").read_text())
    stages = report["stages"]
    for before, after in zip(stages, stages[1:]):
        assert after["rows_in"] == before["rows_out"]
    assert stages[2]["rows_out"] <= 4  # top 50% of the 8-row pool
    scores = pl.read_parquet(tmp_path / "s.parquet")
    assert {"weak_ifd", "ifd", "mtld"} <= set(scores.columns) and scores.height == 8
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert all(r["ifd"] < 1 and r["weak_ifd"] < 1 for r in rows)
    blends = [r["blend"] for r in rows]
    assert blends == sorted(blends, reverse=True)


@pytest.mark.slow
def test_builtin_ifd_recipe_on_smollm2_and_sharegpt(tmp_path):
    """The demo path: Cherry-sampled warmup of the real SmolLM2, IFD with Cherry's template and rules, top 10%."""
    from tamis.runtime.data import sharegpt_asset_path
    from tamis.runtime.models import smollm2_asset

    out = tmp_path / "sel.jsonl"
    res = runner.invoke(app, ["run", "ifd", "--pool", str(sharegpt_asset_path()), "--limit", "60", "--skip-bad",
                              "--pfm", smollm2_asset(), "-o", str(out), "--cache-dir", str(tmp_path / "c"),
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "sel.report.json").read_text())
    score = report["stages"][0]
    assert score["scored_rows"] + score["cached_rows"] >= 59 and score["histogram"]["n"] > 10
    assert set(score["skipped"]) <= {"answer truncated at max_length", "prompt reaches max_length", "empty answer"}
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 6 and all(0 < r["ifd"] < 1 for r in rows)


@pytest.mark.slow
def test_multi_turn_conversations_combine_per_turn_scores(tmp_path):
    """ShareGPT conversations under the chat template: every assistant turn is scored given its history."""
    from tamis.runtime.models import smollm2_asset

    cfg = RunConfig(pool=str(FIX / "sharegpt_small.json"), pfm=smollm2_asset(), cache_dir=str(tmp_path / "c"),
                    progress=False)
    by = {}
    for how in ("first", "mean", "last"):
        res = _run(f'score ifd using pfm with template="chat", turns="{how}" | rank | top 100%', cfg)
        by[how] = dict(zip(res.scores["id"], res.scores["ifd"]))
    pool = pl.read_json(FIX / "sharegpt_small.json")
    turns = {r["id"]: sum(t["from"] == "gpt" for t in r["conversations"]) for r in pool.iter_rows(named=True)}
    for cid, n in turns.items():
        if n == 1:
            assert by["first"][cid] == pytest.approx(by["mean"][cid]) == pytest.approx(by["last"][cid])
        else:
            assert by["first"][cid] != pytest.approx(by["last"][cid])
            lo, hi = sorted((by["first"][cid], by["last"][cid]))
            if n == 2:  # the mean of two turns lies between them
                assert lo <= by["mean"][cid] <= hi


def test_sample_data_constructor_is_a_seeded_subset_of_its_dataset(tmp_path):
    """`sample(D, n, seed=…)` draws the first n of numpy's RandomState(seed) permutation of D's rows."""
    import numpy as np

    text = 'data s = sample(pool, 3, seed=7)\nscore length on s as n | score length | rank | top 100%'
    ex = LocalExecutor(compile_text(text).graph, RunConfig(pool=str(FIX / "pool_small.jsonl"), no_cache=True,
                                                          progress=False))
    ex.run()
    node = next(n for n, a in ex.g.nodes(data=True) if a.get("source") == "sample")
    pool = pl.read_ndjson(FIX / "pool_small.jsonl")
    want = np.random.RandomState(7).permutation(pool.height)[:3]
    assert ex._frames[node]["instruction"].to_list() == [pool["instruction"][int(i)] for i in want]
    text2 = 'data s = sample(pool, 50%)\nscore length on s as n | score length | rank | top 100%'
    ex2 = LocalExecutor(compile_text(text2).graph, RunConfig(pool=str(FIX / "pool_small.jsonl"), no_cache=True,
                                                            progress=False))
    ex2.run()
    node2 = next(n for n, a in ex2.g.nodes(data=True) if a.get("source") == "sample")
    assert ex2._frames[node2].height == 4

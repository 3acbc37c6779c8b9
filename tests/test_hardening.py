"""What an adversarial or careless user broke (issue 9): each class has a test here."""

from __future__ import annotations

import json
import os
import time
import tracemalloc

import pytest

from tamis.dsl.compile import compile_text
from tamis.runtime.executor import INTERNAL_COLUMNS, LocalExecutor, RunConfig


def _pool(tmp_path, outputs: list[str]) -> str:
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "instruction": f"task {i}", "input": "", "output": o}) + "\n"
                            for i, o in enumerate(outputs)), encoding="utf-8")
    return str(path)


def _run(text: str, pool: str):
    return LocalExecutor(compile_text(text).graph, RunConfig(pool=pool, no_cache=True, progress=False)).run()


# ---- 0. a null ranking key is never picked ------------------------------------------------

# mtld is null for a row with no words: 3 of the 6 rows below
_OUTPUTS = ["one two three two one", "--", "alpha beta gamma", "...", "red green blue red", "!!"]


@pytest.mark.parametrize("recipe", [
    "score mtld | rank | top 100%",                   # rank then top
    "score mtld | rank by mtld asc | top 5",          # fused into one partial sort, ascending
    "score mtld, length | let b = 0.5 * pct(mtld) + 0.5 * pct(length) | rank by b | top 100%",  # a blend with a null part
    "score mtld | rank | where true | top 100%",      # a filter between rank and top keeps the key
])
def test_top_never_picks_a_row_whose_ranking_key_is_null(tmp_path, recipe):
    res = _run(recipe, _pool(tmp_path, _OUTPUTS))
    assert sorted(res.selected["id"].to_list()) == ["r0", "r2", "r4"]
    notes = [n for s in res.stages for n in s.notes]
    assert any("3 row(s) with a null ranking key" in n for n in notes), notes
    assert not set(INTERNAL_COLUMNS) & set(res.selected.columns)


def test_nan_and_infinite_keys(tmp_path):
    # log of a negative number is NaN: never picked; log(0) is -inf: a real (lowest) value, kept and
    # left out of the histogram instead of crashing it
    res = _run("score length | let x = log(length - 3) | rank by x | top 100%",
               _pool(tmp_path, ["a b c d e", "a b c", "a", "a b c d"]))
    assert res.selected["id"].to_list() == ["r0", "r3", "r1"]
    let = next(s for s in res.stages if s.label.startswith("let"))
    assert let.histogram["n"] == 2  # the finite values only


def test_a_let_cannot_collide_with_an_executor_column(tmp_path):
    res = _run("score length | let __key = length * 2 | rank by __key | top 2", _pool(tmp_path, ["a b", "a", "a b c"]))
    assert res.selected["__key"].to_list() == [6.0, 4.0]


# ---- 1. compiling is linear in the recipe ---------------------------------------------------

def test_a_2000_stage_recipe_checks_in_seconds_with_bounded_memory():
    text = "score length\n" + "".join(f"| where length > {i}\n" for i in range(1000)) \
        + "".join(f"| let x{i} = length + {i}\n" for i in range(999)) + "| rank | top 10%\n"
    tracemalloc.start()
    t0 = time.perf_counter()
    c = compile_text(text)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert c.graph.number_of_nodes() > 2000
    assert seconds < 30, seconds
    assert peak < 300e6, peak


# ---- 2. outputs never destroy inputs; bad output paths fail before any work -------------------

from pathlib import Path  # noqa: E402

from typer.testing import CliRunner  # noqa: E402

from tamis.cli import app  # noqa: E402
from tamis.errors import RecipeError  # noqa: E402

runner = CliRunner()
FIX = Path(__file__).parent / "fixtures" / "data"


def _copy_pool(tmp_path) -> Path:
    pool = tmp_path / "pool.jsonl"
    pool.write_bytes((FIX / "pool_small.jsonl").read_bytes())
    return pool


@pytest.mark.parametrize("how", ["same", "dotdot", "symlink", "hardlink", "scores"])
def test_an_output_naming_the_pool_is_refused_and_the_pool_is_untouched(tmp_path, how):
    pool = _copy_pool(tmp_path)
    before = pool.read_bytes()
    (tmp_path / "sub").mkdir()
    out = {"same": pool, "dotdot": tmp_path / "sub" / ".." / "pool.jsonl", "symlink": tmp_path / "link.jsonl",
           "hardlink": tmp_path / "hard.jsonl", "scores": pool}[how]
    if how == "symlink":
        out.symlink_to(pool)
    if how == "hardlink":
        os.link(pool, out)
    args = ["run", "score length | rank | top 2"]
    recipe = tmp_path / "r.tamis"
    recipe.write_text("score length | rank | top 2\n")
    args = ["run", str(recipe), "--pool", str(pool), "--no-cache", "--no-progress"]
    args += ["-o", str(tmp_path / "sel.jsonl"), "--scores", str(out)] if how == "scores" else ["-o", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and "tamis never overwrites its inputs" in res.output, res.output
    assert pool.read_bytes() == before


def test_the_recipe_itself_is_an_input_too(tmp_path):
    pool = _copy_pool(tmp_path)
    recipe = tmp_path / "r.tamis"
    recipe.write_text("score length | rank | top 2\n")
    res = runner.invoke(app, ["explain", str(recipe), "--dot", str(recipe)])
    assert res.exit_code == 1 and "never overwrites its inputs" in res.output
    assert recipe.read_text() == "score length | rank | top 2\n"
    res = runner.invoke(app, ["run", str(recipe), "--pool", str(pool), "-o", str(recipe.with_suffix(".md")), "--no-cache"])
    assert res.exit_code == 1 and "unknown output format '.md'" in res.output


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_outputs_are_written_in_the_format_their_extension_names(tmp_path, suffix):
    import polars as pl

    pool = _copy_pool(tmp_path)
    recipe = tmp_path / "r.tamis"
    recipe.write_text("score length, mtld | let twice = 2 * length | rank | top 3\n")
    out, scores = tmp_path / f"sel{suffix}", tmp_path / f"scores{suffix}"
    res = runner.invoke(app, ["run", str(recipe), "--pool", str(pool), "-o", str(out), "--scores", str(scores),
                              "--no-cache", "--no-progress"])
    assert res.exit_code == 0, res.output
    read = {".jsonl": pl.read_ndjson, ".json": lambda p: pl.DataFrame(json.loads(p.read_text())),
            ".parquet": pl.read_parquet}[suffix]
    assert read(out).height == 3
    every = read(scores)
    assert every.height == 8 and {"length", "mtld", "mtld_reason", "twice"} <= set(every.columns)


@pytest.mark.parametrize("bad, message", [
    ("adir", "is a directory"),
    ("afile/sel.jsonl", "is a file, so nothing can be written under it"),
    ("same", "the same file as -o"),
])
def test_bad_output_paths_fail_before_the_run_starts(tmp_path, bad, message):
    pool = _copy_pool(tmp_path)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    recipe = tmp_path / "r.tamis"
    recipe.write_text("score length | rank | top 2\n")
    out = tmp_path / ("sel.jsonl" if bad == "same" else bad)
    args = ["run", str(recipe), "--pool", str(pool), "-o", str(out), "--no-cache"]
    if bad == "same":
        args += ["--scores", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and message in res.output, res.output
    assert not (tmp_path / "sel.report.json").exists()


def test_the_report_manifest_is_written_last_and_lists_every_output(tmp_path):
    pool = _copy_pool(tmp_path)
    recipe = tmp_path / "r.tamis"
    recipe.write_text("score length | rank | top 2\n")
    stale = tmp_path / ".sel.jsonl.tmp-999999999-abcd"  # left by a killed writer (no such process)
    stale.write_text("half")
    res = runner.invoke(app, ["run", str(recipe), "--pool", str(pool), "-o", str(tmp_path / "sel.jsonl"),
                              "--scores", str(tmp_path / "s.parquet"), "--no-cache", "--no-progress"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "sel.report.json").read_text())
    from tamis.runtime.outputs import file_digest

    assert set(manifest["outputs"]) == {str(tmp_path / n) for n in ("sel.jsonl", "s.parquet", "sel.report.md")}
    for path, digest in manifest["outputs"].items():
        assert file_digest(Path(path)) == digest
    assert not stale.exists()


# ---- 3. `use "PATH"` splices recipes only, and never echoes another file -------------------------

def test_use_path_reads_recipe_files_only(tmp_path):
    secret = tmp_path / "secrets.env"
    secret.write_text("OPENAI_API_KEY=sk-do-not-print\n")
    link = tmp_path / "sneaky.tamis"
    link.symlink_to(secret)
    for target in ("secrets.env", "sneaky.tamis", "/proc/self/environ"):
        recipe = tmp_path / "r.tamis"
        recipe.write_text(f'use "{target}"\n')
        res = runner.invoke(app, ["check", str(recipe)])
        assert res.exit_code == 1 and "splices recipe files only" in res.output, res.output
        assert "sk-do-not-print" not in res.output


# ---- 6. recipe text: escapes, encodings, nesting, tabs --------------------------------------------

@pytest.mark.parametrize("text, message", [
    ('score length | rank | top 2 | use "\\x"', "bad escape in string"),
    ('score length | rank | top 2 | use "\\N{NO SUCH NAME}"', "bad escape in string"),
    ('score length | rank | top 2 | use "\\u12"', "bad escape in string"),
    ('score length | rank | top 2 | use "\\ud800.tamis"', "lone surrogate"),
    ("score length | let x = " + "-" * 3000 + "length | rank | top 2", "nested too deeply"),
    ("score length | let x = " + "log(" * 500 + "length" + ")" * 500 + " | rank | top 2", "nested too deeply"),
    ("score length | let x = " + "(" * 5000 + "length" + ")" * 5000 + " | rank by x | top 2", None),
    ("score length | where " + "not " * 3000 + "true | rank | top 2", "nested too deeply"),
    ("sample 1 with seed=9007199254740993", "too large"),
])
def test_recipe_text_errors_are_located_never_tracebacks(text, message):
    if message is None:
        compile_text(text)  # parentheses alone do not nest the tree
        return
    with pytest.raises(RecipeError) as info:
        compile_text(text)
    assert message in info.value.render()
    assert info.value.line == 1


def test_a_recipe_file_with_a_bom_or_bad_utf8(tmp_path):
    bom = tmp_path / "bom.tamis"
    bom.write_bytes(b"\xef\xbb\xbfscore length | rank | top 2\n")
    assert runner.invoke(app, ["check", str(bom)]).exit_code == 0
    bad = tmp_path / "bad.tamis"
    bad.write_bytes(b"score length\n| where length > 1 # caf\xe9\n| rank | top 2\n")
    res = runner.invoke(app, ["check", str(bad)])
    assert res.exit_code == 1 and f"{bad}:2:" in res.output and "not UTF-8" in res.output


def test_carets_line_up_after_tabs():
    with pytest.raises(RecipeError) as info:
        compile_text("score length\n\t|\twhere lenght > 1")
    lines = info.value.render().splitlines()
    assert lines[1] == "  \t|\twhere lenght > 1" and lines[2] == "  \t \t      ^^^^^^"


# ---- 15. shadowed recipes, seeds, large integers ------------------------------------------------

def test_a_local_recipe_shadowing_a_builtin_is_warned_and_explained(tmp_path):
    (tmp_path / "ifd.tamis").write_text("score length | rank | top 1\n")
    recipe = tmp_path / "r.tamis"
    recipe.write_text("use ifd\n")
    res = runner.invoke(app, ["explain", str(recipe)])
    assert res.exit_code == 0
    assert "not the built-in recipe 'ifd'" in res.output
    assert f"line 1: use ifd → {tmp_path / 'ifd.tamis'}  (a local file shadows the built-in recipe)" in res.output


def test_seed_zero_is_a_seed():
    compile_text("score length | sample 2 with seed=0")
    with pytest.raises(RecipeError, match="whole number ≥ 0"):
        compile_text("score length | sample 2 with seed=1.5")


# ---- 9. model folders: no remote code, encoders safetensors-only too ------------------------------

def test_a_model_folder_asking_for_remote_code_is_refused(tiny_gpt2_dir, tmp_path):
    import shutil

    from tamis.errors import ModelError
    from tamis.runtime.models import load_causal_lm

    folder = tmp_path / "remote"
    shutil.copytree(tiny_gpt2_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text("raise SystemExit('this must never run')\n")
    with pytest.raises(ModelError, match=r"asks to run its own Python code .*modeling_evil\.py.*never runs code"):
        load_causal_lm(str(folder), dtype="fp32")


def test_encoders_follow_the_same_safety_rules(tmp_path):
    from tamis.errors import ModelError
    from tamis.runtime.embeddings import EncoderModel

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(ModelError, match="only pickled weights"):
        EncoderModel.bind("x", {"x": str(pickled)}, "cpu")
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "custom.Model"}}))
    (remote / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="asks to run its own Python code"):
        EncoderModel.bind("x", {"x": str(remote)}, "cpu")


# ---- 11. a cache shard with the wrong schema is refused, never read as nulls ----------------------

def test_a_shard_missing_a_column_is_a_corrupt_cache_entry(tmp_path):
    import polars as pl

    from tamis.runtime.cache import CacheError, ScoreCache

    cache = ScoreCache(tmp_path)
    schema = {"value": pl.Float64, "reason": pl.String}
    cache.put("k", pl.DataFrame({"id": ["a"], "value": [1.0], "reason": [None]}, schema={"id": pl.String, **schema}))
    found, missing = cache.get("k", ["a", "b"], schema=schema)
    assert found == {"a": {"value": 1.0, "reason": None}} and missing == ["b"]
    cache.put("k", pl.DataFrame({"id": ["b"], "reason": ["x"]}))  # a damaged shard: no value column
    with pytest.raises(CacheError, match=r"corrupt cache entry .*shard-00001\.parquet: missing column\(s\) value"):
        cache.get("k", ["a", "b"], schema=schema)
    cache.put("k2", pl.DataFrame({"id": ["a"], "value": ["1.0"], "reason": [None]}, schema={"id": pl.String, "value": pl.String, "reason": pl.String}))
    with pytest.raises(CacheError, match="value is String, expected Float64"):
        cache.get("k2", ["a"], schema=schema)


def test_a_run_refuses_a_corrupt_shard_instead_of_selecting_from_nulls(tmp_path):
    pool = _copy_pool(tmp_path)
    plugin = tmp_path / "ops.py"
    plugin.write_text("import tamis\n@tamis.scorer('chars', cached=True)\n"
                      "def chars(rows, model):\n    return [float(len(t)) for t in rows['output']]\n")
    recipe = tmp_path / "r.tamis"
    recipe.write_text("score chars | rank | top 2\n")
    args = ["run", str(recipe), "--plugins", str(plugin), "--pool", str(pool), "-o", str(tmp_path / "sel.jsonl"),
            "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    assert runner.invoke(app, args).exit_code == 0
    import polars as pl

    shard = next((tmp_path / "c" / "scores").rglob("shard-*.parquet"))
    pl.read_parquet(shard).drop("value").write_parquet(shard)
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and "corrupt cache entry" in res.output and "Delete it" in res.output
    from tamis.plugins import forget_plugins

    forget_plugins()


# ---- 13. a slow scorer persists by time, not only every 64 rows -------------------------------------

def test_a_slow_scorer_persists_every_few_seconds_and_a_kill_keeps_them(tmp_path, monkeypatch):
    from tamis.plugins import forget_plugins, load_plugin_file

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": f"r{i}", "instruction": f"q{i}", "input": "", "output": f"a{i}"}) + "\n"
                            for i in range(30)))
    plugin = tmp_path / "slow.py"
    plugin.write_text('''import os, time
import tamis

@tamis.scorer("slow", cached=True)
def slow(rows, model):
    out = []
    for i in rows["id"]:
        if i == os.environ.get("TAMIS_TEST_DIE_AT"):
            raise KeyboardInterrupt  # the user's Ctrl-C, mid-chunk
        time.sleep(0.02)
        out.append(float(i[1:]))
    return out
''')
    load_plugin_file(plugin)
    cfg = RunConfig(pool=str(pool), cache_dir=str(tmp_path / "c"), progress=False, chunk_rows=64, checkpoint_seconds=0.1)
    monkeypatch.setenv("TAMIS_TEST_DIE_AT", "r25")
    with pytest.raises(KeyboardInterrupt):
        _run_cfg("score slow | rank | top 3", cfg)
    monkeypatch.delenv("TAMIS_TEST_DIE_AT")
    again = _run_cfg("score slow | rank | top 3", cfg)
    # 64-row chunks would have kept nothing; ~0.1 s chunks of ~5 rows keep most of the 25 done
    assert again.stages[0].cached_rows >= 15, again.stages[0]
    assert again.stages[0].cached_rows + again.stages[0].scored_rows == 30
    forget_plugins()


def _run_cfg(text: str, cfg: RunConfig):
    return LocalExecutor(compile_text(text).graph, cfg).run()


# ---- 14. GGUF conversion lands under the run's cache root; a killed one leaves nothing ----------

def test_gguf_conversion_uses_the_cache_root_and_cleans_a_killed_staging_folder(tmp_path, monkeypatch):
    from tamis.runtime import models

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    source = models._Source("gguf", tmp_path, "m.gguf", None)
    key = models._hash_parts(models._gguf_identity(source), models._CONVERSION_VERSION)[:24]
    root = tmp_path / "my-cache"
    (root / "models").mkdir(parents=True)
    stale = root / "models" / f".{key}.tmp-999999999-dead"  # a conversion killed mid-way
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    calls = []

    def convert(src, out):  # the real conversion is tested with SmolLM2 in test_models (slow)
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    target = models._converted_gguf_folder(source, root)
    assert target == root / "models" / key and (target / "config.json").is_file()
    assert not stale.exists() and calls[0].parent == root / "models" and calls[0].name.startswith(f".{key}.tmp-")
    assert models._converted_gguf_folder(source, root) == target and len(calls) == 1  # converted once


def test_a_truncated_json_pool_says_so_on_the_console(tmp_path):
    rows = [{"id": f"r{i}", "instruction": f"q{i}", "input": "", "output": f"answer {i}"} for i in range(3)]
    text = json.dumps(rows)
    pool = tmp_path / "cut.json"
    pool.write_text(text[: text.rindex("{") + 12])  # cut inside the last record
    recipe = tmp_path / "r.tamis"
    recipe.write_text("score length | rank | top 1\n")
    res = runner.invoke(app, ["run", str(recipe), "--pool", str(pool), "-o", str(tmp_path / "sel.jsonl"), "--no-cache",
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    assert f"warning: {pool}: file ends inside a record: 2 complete records kept" in res.output


def test_no_output_inside_a_folder_pool(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "data-00000-of-00001.arrow").write_bytes(b"")
    recipe = tmp_path / "r.tamis"
    recipe.write_text("score length | rank | top 1\n")
    res = runner.invoke(app, ["run", str(recipe), "--pool", str(folder), "-o", str(folder / "data-00000-of-00001.arrow"),
                              "--no-cache"])
    assert res.exit_code == 1 and "inside the input folder" in res.output
    assert (folder / "data-00000-of-00001.arrow").read_bytes() == b""

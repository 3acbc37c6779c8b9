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
    res = runner.invoke(app, ["run", str(recipe), "--pool", str(pool), "-o", str(recipe.with_suffix(".report.md")),
                              "--no-cache"])
    assert res.exit_code == 0  # sel "r.report.md" writes r.report.report.md beside it: no clash


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

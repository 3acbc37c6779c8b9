"""The AlpaGasus rating: its prompt, its parse, greedy first-line decoding, and `tamis run`."""

from __future__ import annotations

import json

import polars as pl
import pytest
from conftest import POOL_SMALL, judge_reply
from typer.testing import CliRunner

from tamis.cli import app
from tamis.dsl.compile import compile_text
from tamis.runtime.executor import LocalExecutor, PlanError, RunConfig
from tamis.runtime.judge import (
    ALPAGASUS,
    R_NOT_A_NUMBER,
    R_NOT_FINITE,
    R_TOO_LONG,
    first_lines,
    parse_first_line_score,
    rate,
)
from tamis.runtime.models import load_causal_lm

ROWS = [json.loads(line) for line in POOL_SMALL.read_text().splitlines()]


@pytest.mark.parametrize(("review", "want"), [
    ("4.5\nThe response is accurate.", (4.5, None)),
    ("5", (5.0, None)),
    (" 3 \nok", (3.0, None)),  # float() strips spaces, as get_scores.py's does
    ("4_5\n", (45.0, None)),  # Python's float accepts digit separators; the reference keeps 45
    ("Score: 4\nok", (None, R_NOT_A_NUMBER)),  # get_scores.py reads the first line only
    ("\n5", (None, R_NOT_A_NUMBER)),  # an empty first line
    ("", (None, R_NOT_A_NUMBER)),
    ("nan\n", (None, R_NOT_FINITE)),
])
def test_first_line_parse_is_get_scores_py(review, want):
    assert parse_first_line_score(review) == want


def test_messages_are_chatgpt_rating_py_s():
    system, user = ALPAGASUS.messages({"instruction": "Name a colour.", "input": "", "output": "Blue."})
    assert system == {"role": "system", "content": "We would like to request your feedback on the performance of AI "
                      "assistant in response to the instruction and the given input displayed following."}
    assert user["role"] == "user"
    assert user["content"].startswith("###Instruction:\nName a colour.\n\n### Input:\n\n\n### Response:\nBlue.\n\n"
                                       "Please rate according to the accuracy of the response")
    assert user["content"].endswith("avoiding any potential bias. \n\n")


def test_ratings_from_a_judge_that_writes_numbers(tiny_judge):
    lm = load_causal_lm(tiny_judge, dtype="fp32", device="cpu")
    table = rate(lm, ROWS, progress=False)
    assert table.value == [judge_reply(i)[1] for i in range(len(ROWS))]
    assert table.reason == [None] * len(ROWS)
    assert table.first_line == [judge_reply(i)[0].split("\n")[0] for i in range(len(ROWS))]
    # every row stopped at its newline: "5\n" is 2 tokens, "1.5\n" is 3 (the reference would go on to EOS)
    assert table.new_tokens == sum(len(lm.tokenizer(judge_reply(i)[0].split("\n")[0] + "\n")["input_ids"])
                                   for i in range(len(ROWS)))


def test_batched_first_lines_equal_greedy_generation_one_row_at_a_time(tiny_judge):
    """Rows the judge never saw (so it rambles): the batched, early-stopping decoder gives the
    first line of transformers' own greedy `generate` on each row alone, at any batch size."""
    import torch

    lm = load_causal_lm(tiny_judge, dtype="fp32", device="cpu")
    rows = [dict(r, output=r["output"] + extra) for r in ROWS[:5] for extra in ("", " Indeed.")][1::2]
    convs = [ALPAGASUS.messages(r) for r in rows]
    wide, _, _ = first_lines(lm, convs, max_tokens=24, progress=False)
    narrow, _, _ = first_lines(lm, convs, max_tokens=24, batch_tokens=1, progress=False)
    assert wide == narrow
    for conv, line in zip(convs, wide):
        ids = lm.tokenizer.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = lm.model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=lm.tokenizer.eos_token_id)
        said = lm.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert line == said.split("\n")[0]


def test_a_prompt_longer_than_the_judge_context_is_skipped_with_a_reason(tiny_judge):
    lm = load_causal_lm(tiny_judge, dtype="fp32", device="cpu")
    long_row = {"instruction": "Repeat.", "input": "", "output": "word " * 1100}  # > 1024 positions
    table = rate(lm, [long_row, ROWS[0]], progress=False)
    assert table.value == [None, 5.0] and table.reason == [R_TOO_LONG, None]


def test_no_chat_template_is_a_clear_error(tiny_gpt2_dir):
    from tamis.errors import ModelError

    lm = load_causal_lm(tiny_gpt2_dir, dtype="fp32", device="cpu")
    with pytest.raises(ModelError, match="no chat template, so it cannot serve as a judge"):
        rate(lm, ROWS[:1], progress=False)


ALPAGASUS_RECIPE = 'score rating using api("gpt-3.5-turbo") | where rating >= 4.5 | rank by rating desc'


def test_an_api_model_needs_a_local_binding_before_any_work():
    with pytest.raises(PlanError, match=r"--model gpt-3\.5-turbo=PATH"):
        LocalExecutor(compile_text(ALPAGASUS_RECIPE).graph, RunConfig(pool="does-not-matter.jsonl")).run()


def test_alpagasus_runs_with_a_local_judge_and_resumes_from_the_cache(tiny_judge, tmp_path):
    cfg = RunConfig(pool=str(POOL_SMALL), model_paths={"gpt-3.5-turbo": tiny_judge}, dtype="fp32",
                    cache_dir=str(tmp_path / "cache"), chunk_rows=3, progress=False)
    first = LocalExecutor(compile_text(ALPAGASUS_RECIPE).graph, cfg).run()
    assert first.selected["id"].to_list() == [r["id"] for i, r in enumerate(ROWS) if i % 2 == 0]
    assert first.scores["rating"].to_list() == [judge_reply(i)[1] for i in range(len(ROWS))]
    assert first.scores["rating_said"].to_list() == [judge_reply(i)[0].split("\n")[0] for i in range(len(ROWS))]
    score_stage = next(s for s in first.stages if s.label.startswith("score"))
    assert (score_stage.scored_rows, score_stage.cached_rows) == (8, 0)
    again = LocalExecutor(compile_text(ALPAGASUS_RECIPE).graph, cfg).run()
    score_stage = next(s for s in again.stages if s.label.startswith("score"))
    assert (score_stage.scored_rows, score_stage.cached_rows) == (0, 8)
    assert again.selected.equals(first.selected)


def test_the_builtin_alpagasus_recipe_through_the_cli(tiny_judge, tmp_path):
    out = tmp_path / "picked.jsonl"
    res = CliRunner().invoke(app, ["run", "alpagasus", "--pool", str(POOL_SMALL), "--model", f"gpt-3.5-turbo={tiny_judge}",
                                   "-o", str(out), "--no-cache", "--dtype", "fp32", "--no-progress"])
    assert res.exit_code == 0, res.output
    picked = pl.read_ndjson(out)
    assert picked["id"].to_list() == ["row-0", "row-2", "row-4", "row-6"]
    assert picked["rating"].to_list() == [5.0] * 4


@pytest.mark.slow
def test_smollm2_as_judge_first_lines_equal_generate(smollm2):
    """The real judge: SmolLM2 writes no number on the first line for these rows (so every
    rating is null, as the reference's -1), and the batched early-stopping decoder's first
    lines are exactly those of `generate` with the reference's 256 new tokens, row by row."""
    import torch

    from tamis.runtime.data import load_pool
    from tamis.runtime.models import smollm2_asset  # noqa: F401  (the fixture already checked it)

    rows = load_pool(str(POOL_SMALL)).frame.to_dicts()[:4]
    table = rate(smollm2, rows, progress=False)
    for row, line, value, reason in zip(rows, table.first_line, table.value, table.reason):
        ids = smollm2.tokenizer.apply_chat_template(ALPAGASUS.messages(row), add_generation_prompt=True,
                                                    return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = smollm2.model.generate(**ids, max_new_tokens=256, do_sample=False)
        review = smollm2.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert line == review.split("\n")[0]
        assert (value, reason) == parse_first_line_score(review)


@pytest.mark.parametrize("recipe", ["ifd_alpagasus_blend", "ifd_and_alpagasus"])
def test_the_api_hybrids_run_end_to_end(recipe, tiny_judge, tmp_path):
    """Warmup training, IFD and the judge's rating in one run (the tiny judge doubles as PFM)."""
    out = tmp_path / "picked.jsonl"
    res = CliRunner().invoke(app, ["run", recipe, "--pool", str(POOL_SMALL), "--pfm", tiny_judge,
                                   "--model", f"gpt-3.5-turbo={tiny_judge}", "-o", str(out), "--scores",
                                   str(tmp_path / "all.parquet"), "--cache-dir", str(tmp_path / "cache"),
                                   "--dtype", "fp32", "--no-progress"])
    assert res.exit_code == 0, res.output
    picked = pl.read_ndjson(out)
    scores = pl.read_parquet(tmp_path / "all.parquet")
    assert scores["rating"].to_list() == [judge_reply(i)[1] for i in range(len(ROWS))]
    assert scores["ifd"].null_count() < len(ROWS)
    # only rows the judge rated highly survive either hybrid's rating filter
    high = {r["id"] for i, r in enumerate(ROWS) if i % 2 == 0}
    assert set(picked["id"]) <= high
    if recipe == "ifd_alpagasus_blend":
        assert picked.height == 1  # top 10% of the 8-row pool
        assert picked["blend"].to_list() == sorted(picked["blend"].to_list(), reverse=True)
    else:  # IFD's top 10% of 8 rows is its single highest IFD below 1; kept only if the judge liked it
        ifd = scores.filter(pl.col("ifd") < 1).sort("ifd", descending=True)
        assert picked["id"].to_list() == [i for i in ifd["id"].head(1) if i in high]


def test_a_parked_straggler_resumes_to_the_same_first_line(tiny_judge):
    """Three rows the judge answers in 2-3 tokens and one it rambles on: once three are
    done, the fourth is parked with what it wrote; resumed alone (re-reading its partial
    reply as prompt) it ends with the first line `generate` gives."""
    import torch

    from tamis.runtime.judge import _decode_batch, _Row

    lm = load_causal_lm(tiny_judge, dtype="fp32", device="cpu")
    rambler = dict(ROWS[1], output=ROWS[1]["output"] + " Indeed.")
    convs = [ALPAGASUS.messages(r) for r in (ROWS[0], ROWS[2], ROWS[4], rambler)]
    prompts = [lm.tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=True)["input_ids"]
               for c in convs]
    rows = [_Row(list(p), 24) for p in prompts]
    _decode_batch(lm, rows, may_park=True)
    assert [r.done for r in rows] == [True, True, True, False]
    parked = rows[3]
    assert 0 < len(parked.written) < 24 and parked.left == 24 - len(parked.written)
    _decode_batch(lm, [parked], may_park=False)
    assert parked.done
    ids = torch.tensor([prompts[3]])
    with torch.inference_mode():
        out = lm.model.generate(input_ids=ids, max_new_tokens=24, do_sample=False, pad_token_id=lm.tokenizer.eos_token_id)
    said = lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert lm.tokenizer.decode(parked.written, skip_special_tokens=True).split("\n")[0] == said.split("\n")[0]


def test_a_sliding_window_judge_decodes_as_generate_does(gpt2_tokenizer):
    """A model whose cache is not plain (sliding-window attention) is decoded one row at a
    time; its first lines still equal `generate`'s, with replies that run past the window."""
    import copy

    import torch
    from conftest import TINY_CHAT_TEMPLATE
    from transformers import MistralConfig, MistralForCausalLM

    from tamis.runtime.lm_scoring import supports_plain_cache
    from tamis.runtime.models import LoadedLM

    tok = copy.deepcopy(gpt2_tokenizer)
    tok.chat_template = TINY_CHAT_TEMPLATE
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=96, max_position_embeddings=1024)
    lm = LoadedLM(MistralForCausalLM(config).eval(), tok, torch.device("cpu"), torch.float32, "sw", "sw")
    assert not supports_plain_cache(lm)
    convs = [ALPAGASUS.messages(r) for r in ROWS[:3]]
    got, _, _ = first_lines(lm, convs, max_tokens=20, progress=False)
    assert len(set(got)) == 3  # the rows' own text (inside the window) shapes each reply
    for conv, line in zip(convs, got):
        ids = tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = lm.model.generate(**ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.eos_token_id)
        assert line == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).split("\n")[0]

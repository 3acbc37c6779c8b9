"""DEITA's complexity and quality scores: checked against the model's own full logits."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from conftest import POOL_SMALL
from typer.testing import CliRunner

from tamis.cli import app
from tamis.errors import ModelError
from tamis.runtime.digit_scorers import DIGIT_TEMPLATES, R_TOO_LONG, digit_ids, digit_scores

ROWS = [json.loads(line) for line in POOL_SMALL.read_text().splitlines()]


def _direct(lm, text: str) -> float:
    """What DEITA's Scorer.infer_score computes: the first generated position's logits of
    the digit tokens, softmax, expectation over 1..6 (here from one full-vocabulary forward)."""
    ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
    with torch.inference_mode():
        logits = lm.model(input_ids=ids).logits[0, -1]
    p = torch.softmax(logits[digit_ids(lm.tokenizer)].float(), dim=-1)
    return float((p * torch.arange(1, 7)).sum())


def test_templates_are_deita_s():
    assert DIGIT_TEMPLATES["complexity"].format(instruction="Q") == (
        "You are a helpful assistant. Please identify the complexity score of the following user query. \n"
        "##Query: Q  \n##Complexity: ")
    assert DIGIT_TEMPLATES["quality"].format(instruction="Q", output="A").endswith("#Question#:\nQ\n#Response#:\nA \n##Quality: ")


def test_digit_tokens(gpt2_tokenizer):
    assert [gpt2_tokenizer.decode([i]) for i in digit_ids(gpt2_tokenizer)] == list("123456")


@pytest.mark.parametrize("kind", ["complexity", "quality"])
def test_scores_equal_the_full_logits_row_by_row(tiny_lm, kind):
    got = digit_scores(tiny_lm, ROWS, kind, batch_size=3)
    for row, value in zip(ROWS, got.value):
        query = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        text = DIGIT_TEMPLATES[kind].format(instruction=query, output=row["output"])
        assert value == pytest.approx(_direct(tiny_lm, text), abs=1e-5)
        assert 1.0 <= value <= 6.0
    assert got.reason == [None] * len(ROWS)
    assert len(set(round(v, 6) for v in got.value)) > 1  # rows really differ


def test_a_prompt_over_max_length_is_null_with_a_reason(tiny_lm):
    got = digit_scores(tiny_lm, ROWS[:2], "quality", max_length=60)
    assert got.value[0] is None and got.reason[0] == R_TOO_LONG


def test_a_tokenizer_without_digit_tokens_is_refused(tiny_lm):
    class NoDigits:
        unk_token_id = 0

        def convert_tokens_to_ids(self, token):
            return 0

    with pytest.raises(ModelError, match="no single token for the digit '1'"):
        digit_ids(NoDigits())


def test_deita_released_runs_end_to_end(tiny_gpt2_dir, tiny_lm, tmp_path):
    """Both scorers and the repr filter's embedder bound to the tiny model: the selection is
    the rows ranked by complexity × quality, as computed here directly."""
    out = tmp_path / "sel.jsonl"
    models = ["hkust-nlp/deita-complexity-scorer", "hkust-nlp/deita-quality-scorer", "mistralai/Mistral-7B-v0.1"]
    args = ["run", "deita_released", "--pool", str(POOL_SMALL), "-o", str(out), "--scores", str(tmp_path / "all.parquet"),
            "--cache-dir", str(tmp_path / "c"), "--dtype", "fp32", "--no-progress"]
    for m in models:
        args += ["--model", f"{m}={tiny_gpt2_dir}"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    scores = pl.read_parquet(tmp_path / "all.parquet")
    want_c = digit_scores(tiny_lm, ROWS, "complexity").value
    want_q = digit_scores(tiny_lm, ROWS, "quality").value
    assert scores["complexity"].to_list() == pytest.approx(want_c, abs=1e-5)
    assert scores["quality"].to_list() == pytest.approx(want_q, abs=1e-5)
    picked = pl.read_ndjson(out)
    evol = [c * q for c, q in zip(want_c, want_q)]
    order = sorted(range(len(ROWS)), key=lambda i: -evol[i])
    # the repr filter keeps rows in score order (the budget 6000 exceeds the pool; near-duplicates may drop)
    kept = picked["id"].to_list()
    assert kept == [ROWS[i]["id"] for i in order if ROWS[i]["id"] in kept] and len(kept) >= 1


@pytest.mark.slow
def test_smollm2_scores_equal_generate_output_scores(smollm2):
    """The reference's own call: generate(max_new_tokens=2, output_scores=True), scores[0][0]."""
    got = digit_scores(smollm2, ROWS[:3], "complexity")
    tok = smollm2.tokenizer
    for row, value in zip(ROWS[:3], got.value):
        query = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        ids = tok.encode(DIGIT_TEMPLATES["complexity"].format(instruction=query), return_tensors="pt")
        with torch.inference_mode():
            out = smollm2.model.generate(ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                                         output_scores=True, pad_token_id=tok.eos_token_id)
        p = torch.softmax(out.scores[0][0][digit_ids(tok)].float(), dim=-1)
        assert value == pytest.approx(float((p * torch.arange(1, 7)).sum()), abs=1e-5)

"""`score unieval` (UniEval's dialogue indicators, as maszhongming/UniEval computes them) against
the reference's prompt strings and a direct computation.

The evaluator is a tiny random T5 (d_model 32, 2 layers) with a word-level tokenizer built here
("Yes", "No" and "</s>" single tokens, pad 0, eos 1), saved as a safetensors folder: no downloads.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from tamis.dsl.compile import compile_text
from tamis.runtime.executor import LocalExecutor, RunConfig
from tamis.runtime.unieval import UniEvalScorer, unieval_input, unieval_rows
from tiny_encoders import build_tiny_t5

POOL = Path(__file__).parent / "fixtures" / "data" / "pool_small.jsonl"


# --------------------------------------------------------------------------- prompts (reference strings)

def test_unieval_input_reproduces_add_question_dialogue():
    out = "i do too . did you know the 3 horizontal line menu on apps and websites is called the hamburger button ?"
    src = ("hi , do you know much about the internet ? \n i know a lot about different sites and some "
           "website design , how about you ? \n\n")
    assert unieval_input("naturalness", out, src) == (
        "question: Is this a natural response in the dialogue? </s> response: " + out)
    assert unieval_input("coherence", out, src) == (
        "question: Is this a coherent response given the dialogue history? </s> response: " + out
        + " </s> dialogue history: " + src)
    assert unieval_input("understandability", out, src) == (
        "question: Is this an understandable response in the dialogue? </s> response: " + out)
    with pytest.raises(ValueError):
        unieval_input("engagingness", out, src)


def test_rows_map_to_history_and_response():
    rows = pl.DataFrame({"instruction": ["Say hi.", "Translate.", "Q"], "input": ["", "Le chat.", None],
                         "output": ["hi", "The cat.", None]})
    outputs, histories = unieval_rows(rows)
    assert outputs == ["hi", "The cat.", ""]
    assert histories == ["Say hi.\n\n", "Translate.\nLe chat.\n\n", "Q\n\n"]


# --------------------------------------------------------------------------- a tiny T5

@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> Path:
    texts = pl.read_ndjson(POOL).select("instruction", "input", "output").to_numpy().ravel()
    return build_tiny_t5(tmp_path_factory.mktemp("tiny_unieval"), texts)


def test_tiny_tokenizer_has_single_yes_no_and_eos(tiny_t5):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_t5)
    assert tok("Yes")["input_ids"] == [3, 1] and tok("No")["input_ids"] == [4, 1]
    assert tok("response: </s> hi")["input_ids"].count(1) == 2  # "</s>" in the text is the eos token


@functools.lru_cache(maxsize=None)
def _load(folder: Path):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    return AutoTokenizer.from_pretrained(folder), T5ForConditionalGeneration.from_pretrained(folder).eval()


def _alone(folder: Path, inputs: list[str]) -> list[float]:
    """The reference's computation, one input at a time (no padding)."""
    tok, model = _load(folder)
    pos, neg = tok("Yes")["input_ids"][0], tok("No")["input_ids"][0]
    got = []
    with torch.no_grad():
        for t in inputs:
            enc = tok(t, max_length=1024, truncation=True, return_tensors="pt")
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                           decoder_input_ids=torch.tensor([[model.config.decoder_start_token_id]])).logits
            p = torch.softmax(logits.view(-1, model.config.vocab_size), dim=1)[0]
            got.append(p[pos].item() / (p[pos].item() + p[neg].item()))
    return got


@pytest.mark.parametrize("dimension", ["naturalness", "coherence", "understandability"])
def test_batched_scores_equal_each_row_alone(tiny_t5, dimension):
    rows = pl.read_ndjson(POOL)
    outputs, histories = unieval_rows(rows)
    inputs = [unieval_input(dimension, o, h) for o, h in zip(outputs, histories)]
    assert len({len(t) for t in inputs}) > 3  # rows of different lengths share batches
    ue = UniEvalScorer.from_path(str(tiny_t5), "cpu")
    assert UniEvalScorer.from_path(str(tiny_t5), "cpu") is ue  # loaded once per folder and device
    got = ue.score(dimension, outputs, histories, batch_size=3)
    np.testing.assert_allclose(got, _alone(tiny_t5, inputs), atol=1e-6, rtol=0)
    assert all(0.0 < g < 1.0 for g in got) and np.ptp(got) > 0


def test_long_inputs_are_truncated_to_1024_tokens(tiny_t5):
    ue = UniEvalScorer.from_path(str(tiny_t5), "cpu")
    long = "word " * 1500
    assert len(ue.tokenizer(unieval_input("coherence", long, "Echo.\n\n"), max_length=1024,
                            truncation=True)["input_ids"]) == 1024
    got = ue.score("coherence", ["hi", long], ["Say hi.\n\n", "Echo.\n\n"], batch_size=8)
    np.testing.assert_allclose(got, _alone(tiny_t5, [unieval_input("coherence", "hi", "Say hi.\n\n"),
                                                     unieval_input("coherence", long, "Echo.\n\n")]),
                               atol=1e-6, rtol=0)


def test_unieval_end_to_end(tiny_t5, tmp_path):
    cfg = RunConfig(pool=str(POOL), model_paths={"UE": str(tiny_t5)}, no_cache=True, progress=False,
                    cache_dir=str(tmp_path), device="cpu")
    recipe = 'score unieval using encoder("UE") with dimension="naturalness" | rank | top 2'
    result = LocalExecutor(compile_text(recipe).graph, cfg).run()
    rows = pl.read_ndjson(POOL)
    outputs, histories = unieval_rows(rows)
    want = dict(zip(rows["id"].to_list(), _alone(tiny_t5, [unieval_input("naturalness", o, h)
                                                            for o, h in zip(outputs, histories)])))
    scores = dict(zip(result.scores["id"].to_list(), result.scores["unieval"].to_list()))
    assert scores == pytest.approx(want, abs=1e-6)
    best = sorted(want, key=want.get, reverse=True)[:2]
    assert result.selected["id"].to_list() == best

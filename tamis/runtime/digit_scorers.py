"""DEITA's complexity and quality scores: the expected digit at the next position.

DEITA (hkust-nlp/deita ``src/deita/selection/scorer/base.py`` and ``llama_scorer.py``)
fills a prompt template, encodes it with the tokenizer's special tokens
(``tokenizer.encode``), lets its scorer model ``generate`` two tokens with
``output_scores=True``, and reads the first position's logits of the tokens "1" … "6":

    score = Σ_{k=1..6} k · softmax(logit("1"), …, logit("6"))_k

tamis computes exactly that number without generating: the final hidden state at the
prompt's last token (length-sorted, right-padded batches, which a causal model cannot
see) times the six rows of the LM head for those digits, not the whole vocabulary.

Two deliberate differences, both about failures rather than values:

* the reference returns 3.0 when a lookup fails (its issue #36: "all scores are 3");
  here a tokenizer whose digits are not single tokens is an error before any work;
* the reference never truncates; a prompt longer than `max_length` gets a null score
  with a reason (the reference would run past the model's context).

The reference reads ``generate``'s *processed* scores; with the released scorers'
generation settings (greedy) those equal the raw logits used here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from tamis.errors import ModelError
from tamis.runtime.data import rows_of
from tamis.runtime.embeddings import last_token_states
from tamis.runtime.lm_scoring import split_model
from tamis.runtime.models import LoadedLM
from tamis.runtime.templates import row_text, user_query

__all__ = ["DIGIT_TEMPLATES", "DigitScores", "digit_ids", "digit_scores"]

Kind = Literal["complexity", "quality"]

# llama_scorer.py / mistral_scorer.py (the two share these texts, spaces included)
DIGIT_TEMPLATES: dict[str, str] = {
    "complexity": ("You are a helpful assistant. Please identify the complexity score of the following user query. \n"
                   "##Query: {instruction}  \n##Complexity: "),
    "quality": ("You are a helpful assistant. Please identify the quality score of the Response corresponding to the "
                "Question. \n #Question#:\n{instruction}\n#Response#:\n{output} \n##Quality: "),
}
R_TOO_LONG = "prompt longer than max_length"
_SCORES = torch.arange(1, 7, dtype=torch.float32)


@dataclass
class DigitScores:
    value: list[float | None]
    reason: list[str | None]
    seconds: float


def digit_ids(tokenizer: Any) -> list[int]:
    """Token ids of "1" … "6" as single tokens (what the reference's id2score tables hold)."""
    ids = []
    for d in "123456":
        found = tokenizer.convert_tokens_to_ids(d)
        if found is None or found == tokenizer.unk_token_id or tokenizer.decode([found]) != d:
            raise ModelError(f"the scorer's tokenizer has no single token for the digit {d!r}; "
                             "DEITA's scores are read from the logits of the tokens '1'..'6'")
        ids.append(int(found))
    return ids


@torch.inference_mode()
def digit_scores(lm: LoadedLM, examples: Any, kind: Kind, *, max_length: int = 2048, batch_size: int = 8,
                 progress: bool = False) -> DigitScores:
    """DEITA's `kind` score ("complexity" or "quality") of every row, in input order."""
    if kind not in DIGIT_TEMPLATES:
        raise ModelError(f"unknown DEITA score {kind!r}: use complexity or quality")
    rows = rows_of(examples, "digit_scores", ModelError)
    started = time.perf_counter()
    tok = lm.tokenizer
    digits = digit_ids(tok)
    texts = [DIGIT_TEMPLATES[kind].format(instruction=user_query(r), output=row_text(r, "output")) for r in rows]
    ids = list(tok(texts)["input_ids"]) if texts else []
    fits = [i for i, x in enumerate(ids) if len(x) <= max_length]
    values: list[float | None] = [None] * len(rows)
    reasons: list[str | None] = [R_TOO_LONG] * len(rows)
    if fits:
        states = last_token_states(lm, [ids[i] for i in fits], batch_size, progress)
        _, head, softcap = split_model(lm)
        weight = head.weight[digits].float()
        logits = states @ weight.T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[digits].float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        expected = (torch.softmax(logits, dim=-1).cpu() * _SCORES).sum(-1).tolist()
        for i, v in zip(fits, expected):
            values[i], reasons[i] = float(v), None
    return DigitScores(values, reasons, time.perf_counter() - started)

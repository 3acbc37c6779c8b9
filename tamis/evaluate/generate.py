"""Greedy answers of a fine-tuned model to the evaluation questions, for the pairwise judge.

The prompt is the one the model was trained on (the training template's prompt for the row's
first turn, as `tamis.runtime.training` encodes it), decoded greedily until end-of-sequence or
`max_new_tokens`, as Cherry LLM's `eva_generation.py` generates (greedy `generate` with the Alpaca
prompt). Decoding reuses the judge's batched decoder (`tamis.runtime.judge`): rows of similar length
decode together from left-padded caches and leave the batch when done.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from tamis.runtime.templates import answer_texts, get_template

R_PROMPT_TOO_LONG = "prompt reaches max_length"


def prompt_ids(lm: Any, rows: Sequence[Mapping[str, Any]], template: str, max_length: int) -> list[list[int] | None]:
    """Token ids of each row's first-turn prompt, as training encodes it (None: the prompt reaches
    `max_length`, so the model was never trained to answer one that long; or no answer turn)."""
    from tamis.runtime.lm_scoring import AnswerEncoder

    tmpl = get_template(template)
    enc = AnswerEncoder(lm.tokenizer, tmpl.add_special_tokens)
    texts = [answer_texts(tmpl, row, lm.tokenizer) for row in rows]
    ids = enc.encode_many([t[0].prompt for t in texts if t])
    out: list[list[int] | None] = []
    it = iter(ids)
    for t in texts:
        if not t:
            out.append(None)
            continue
        full = [*enc.pre, *next(it)]
        out.append(full if len(full) < max_length else None)
    return out


def greedy_answers(lm: Any, prompts: Sequence[list[int] | None], *, max_new_tokens: int = 256,
                   batch_tokens: int | None = None, progress: bool = True, desc: str = "answering") -> list[str | None]:
    """The decoded answer to each prompt (None where the prompt is None)."""
    from tamis.runtime.judge import decode_ids

    replies, _ = decode_ids(lm, prompts, max_tokens=max_new_tokens, batch_tokens=batch_tokens, progress=progress,
                            desc=desc)
    return [r.strip() if r is not None else None for r in replies]

"""Judge-model scores: AlpaGasus' accuracy rating, from a local chat model.

AlpaGasus (gpt4life/alpagasus: ``rating/chatgpt_rating.py``, ``get_scores.py``,
``filter.py``) sends every row to gpt-3.5-turbo as a system message and a user message
(the instruction, input and response, then the rating request), at temperature 0 with at
most 256 new tokens; the score is ``float(review.split('\\n')[0])``, or -1 when that
raises; ``filter.py`` keeps the rows scored at least 4.5.

Here the same two messages go to a judge that runs on this machine (an `api("…")` model
bound to a local chat model with ``--model NAME=PATH``, or any `hf(...)`/`pfm` model):

* **Greedy decoding** (temperature 0) through the judge's own chat template.
* **Stops at the end of the first line.** The score depends on the first line only, so
  each row stops generating as soon as a newline appears (or at end-of-sequence, or after
  `max_tokens`, the reference's 256). The tokens the reference would go on to generate
  cannot change the score; this is most of the time saved.
* **Batched** by prompt length with left padding, under a token budget.
* A review whose first line is not a number gets a **null** value with a reason (the
  reference's -1), so ``where rating >= 4.5`` drops exactly the rows ``filter.py`` drops.
  The first line is kept beside the score, so a user can see what the judge said.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from tamis.errors import ModelError
from tamis.runtime.data import rows_of
from tamis.runtime.lm_scoring import cache_keyword
from tamis.runtime.models import LoadedLM
from tamis.runtime.templates import render_chat

__all__ = ["JUDGE_DECODING", "JUDGE_PROMPTS", "JudgePrompt", "RatingTable", "first_lines", "parse_first_line_score", "rate"]

# Part of every cached rating's key: bump it when the decoding changes what a judge says.
JUDGE_DECODING = "greedy-first-line-v1"

# Reasons a row gets no rating (shared wording, so reports can count them).
R_NOT_A_NUMBER = "judge's first line is not a number"
R_NOT_FINITE = "judge's first line is not a finite number"
R_TOO_LONG = "prompt does not fit the judge's context"


@dataclass(frozen=True)
class JudgePrompt:
    """A judge's two messages for one row, as the reference builds them."""

    name: str
    system: str
    row_template: str  # str.format_map over the row's instruction, input, output
    request: str  # appended after the row

    def messages(self, row: Mapping[str, Any]) -> list[dict[str, str]]:
        fields = {k: "" if row.get(k) is None else str(row.get(k)) for k in ("instruction", "input", "output")}
        return [{"role": "system", "content": self.system},
                {"role": "user", "content": self.row_template.format_map(fields) + self.request}]


# rating/chatgpt_rating.py, the accuracy prompt (the one the paper's 9k selection used).
# The input section is present even when the input is empty, and "###Instruction:" has no
# space: both as in the reference.
ALPAGASUS = JudgePrompt(
    name="alpagasus",
    system=("We would like to request your feedback on the performance of AI assistant in response to the "
            "instruction and the given input displayed following."),
    row_template="###Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}\n\n",
    request=("Please rate according to the accuracy of the response to the instruction and the input. Each "
             "assistant receives a score on a scale of 0 to 5, where a higher score indicates higher level of the "
             "accuracy. Please first output a single line containing value indicating the scores. In the "
             "subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any "
             "potential bias. \n\n"),
)
JUDGE_PROMPTS: dict[str, JudgePrompt] = {ALPAGASUS.name: ALPAGASUS}


def parse_first_line_score(review: str) -> tuple[float | None, str | None]:
    """(score, None) or (None, reason): Python's ``float`` of the review's first line, as
    get_scores.py computes it (so " 4.5 " is 4.5 and "Score: 4" is not a number)."""
    first = review.split("\n")[0]
    try:
        value = float(first)
    except ValueError:
        return None, R_NOT_A_NUMBER
    if not math.isfinite(value):  # "nan"/"inf" parse, but no threshold can keep them
        return None, R_NOT_FINITE
    return value, None


@dataclass
class RatingTable:
    """Per-row ratings in input order; `value` is null exactly when `reason` is set."""

    value: list[float | None]
    reason: list[str | None]
    first_line: list[str | None]  # what the judge wrote before its first newline
    new_tokens: int  # tokens generated in all
    seconds: float


def rate(
    lm: LoadedLM,
    examples: Any,
    *,
    prompt: str = "alpagasus",
    max_tokens: int = 256,
    batch_tokens: int | None = None,
    progress: bool = True,
) -> RatingTable:
    """Rate every row's response with the judge `lm` (greedy, first line, see the module note)."""
    if prompt not in JUDGE_PROMPTS:
        raise ModelError(f"unknown judge prompt {prompt!r}: use one of {', '.join(JUDGE_PROMPTS)}")
    if max_tokens < 1:
        raise ModelError(f"max_tokens must be at least 1, got {max_tokens}")
    rows = rows_of(examples, "rate", ModelError)
    started = time.perf_counter()
    conversations = [JUDGE_PROMPTS[prompt].messages(row) for row in rows]
    lines, new_tokens, too_long = first_lines(lm, conversations, max_tokens=max_tokens,
                                              batch_tokens=batch_tokens, progress=progress)
    values: list[float | None] = []
    reasons: list[str | None] = []
    for line, skipped in zip(lines, too_long):
        value, reason = (None, R_TOO_LONG) if skipped else parse_first_line_score(line or "")
        values.append(value)
        reasons.append(reason)
    return RatingTable(values, reasons, [None if s else line for line, s in zip(lines, too_long)], new_tokens,
                       time.perf_counter() - started)


# --------------------------------------------------------------------------- generation


def first_lines(
    lm: LoadedLM,
    conversations: Sequence[Sequence[Mapping[str, str]]],
    *,
    max_tokens: int = 256,
    batch_tokens: int | None = None,
    progress: bool = True,
) -> tuple[list[str], int, list[bool]]:
    """Greedy replies of the judge, each cut at its first newline.

    Returns (first lines, new tokens generated, whether each prompt was too long for the
    judge's context and so not run).
    """
    tok = lm.tokenizer
    if not getattr(tok, "chat_template", None):
        raise ModelError(f"{lm.name} has no chat template, so it cannot serve as a judge (use an instruction-tuned chat model)")
    texts = [render_chat(tok, c, add_generation_prompt=True) for c in conversations]
    ids = list(tok(texts, add_special_tokens=False)["input_ids"]) if texts else []
    context = getattr(lm.model.config, "max_position_embeddings", None)
    too_long = [context is not None and len(x) >= context for x in ids]
    lines = [""] * len(ids)
    # KV cache ≈ budget × layers × 2 × kv width; decoding is bound by reading the weights, so
    # wide batches are what make it fast
    budget = batch_tokens or (131072 if lm.device.type == "cuda" else 16384)
    order = sorted((i for i in range(len(ids)) if not too_long[i]), key=lambda i: -len(ids[i]))
    new_tokens = 0
    from tqdm.auto import tqdm

    bar = tqdm(total=len(order), unit="row", desc="judging", disable=not progress, smoothing=0.1)
    start = 0
    while start < len(order):
        # rows in a batch share the longest prompt's length (left padding) plus the new tokens
        longest = len(ids[order[start]])
        limit = max_tokens if context is None else min(max_tokens, context - longest)
        per_row = longest + limit
        size = max(1, min(64, budget // per_row))
        batch = order[start:start + size]
        try:
            got, generated = _generate_batch(lm, [ids[i] for i in batch], limit)
        except torch.OutOfMemoryError:
            if lm.device.type != "cuda" or budget <= per_row:
                raise ModelError(f"out of memory judging a {longest}-token prompt on {lm.device}; "
                                 "pass a smaller --batch-tokens or use a smaller judge") from None
            torch.cuda.empty_cache()
            budget //= 2
            continue
        for i, line in zip(batch, got):
            lines[i] = line
        new_tokens += generated
        bar.update(len(batch))
        start += len(batch)
    bar.close()
    return lines, new_tokens, too_long


def _generate_batch(lm: LoadedLM, prompts: list[list[int]], max_new: int) -> tuple[list[str], int]:
    """Greedy-decode a left-padded batch until every row has a newline, EOS or `max_new` tokens.

    A row that is done leaves the batch (its cache rows are dropped), so one long-winded
    row does not keep the others decoding.
    """
    tok = lm.tokenizer
    eos = _eos_ids(lm)
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        input_ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    input_ids, mask = input_ids.to(lm.device), mask.to(lm.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    pieces: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))  # batch row -> prompt index
    cache = None
    cache_arg = cache_keyword(lm.model)
    generated = 0
    with torch.inference_mode():
        for _ in range(max_new):
            out = lm.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                           use_cache=True, logits_to_keep=1, **{cache_arg: cache})
            cache = out.past_key_values
            nxt = out.logits[:, -1, :].float().argmax(-1).cpu().tolist()
            generated += len(active)
            keep: list[int] = []
            for r, t in enumerate(nxt):
                if t in eos:
                    continue
                pieces[active[r]].append(t)
                if "\n" not in tok.decode([t]):
                    keep.append(r)
            if not keep:
                break
            step = torch.tensor([nxt[r] for r in keep], dtype=torch.long, device=lm.device)[:, None]
            if len(keep) < len(active):
                index = torch.tensor(keep, device=lm.device)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                active = [active[r] for r in keep]
            input_ids = step
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            positions = positions[:, -1:] + 1
    return [tok.decode(p, skip_special_tokens=True).split("\n")[0] for p in pieces], generated


def _eos_ids(lm: LoadedLM) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(lm.model, "generation_config", None), lm.model.config, lm.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    if not ids:
        raise ModelError(f"{lm.name} declares no end-of-sequence token; cannot tell where a judge's reply ends")
    return ids

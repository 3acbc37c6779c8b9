"""Judge-model scores: AlpaGasus' accuracy rating, from a local chat model or an endpoint.

AlpaGasus (gpt4life/alpagasus: ``rating/chatgpt_rating.py``, ``get_scores.py``,
``filter.py``) sends every row to gpt-3.5-turbo as a system message and a user message
(the instruction, input and response, then the rating request), at temperature 0 with at
most 256 new tokens; the score is ``float(review.split('\\n')[0])``, or -1 when that
raises; ``filter.py`` keeps the rows scored at least 4.5.

Here the same two messages go to an OpenAI-compatible endpoint (`tamis.runtime.api_client`),
or to a judge that runs on this machine (an `api("…")` model bound to a local chat model
with ``--model NAME=PATH``, or any `hf(...)`/`pfm` model). Locally:

* **Greedy decoding** (temperature 0) through the judge's own chat template.
* **Stops at the end of the first line.** The score depends on the first line only, so
  each row stops generating as soon as a newline appears (or at end-of-sequence, or after
  `max_tokens`, the reference's 256). The tokens the reference would go on to generate
  cannot change the score; this is most of the time saved.
* **Batched** by length under a token budget: each prompt runs alone, then the rows
  decode together from left-padded caches; finished rows leave the batch, and
  long-winded ones are parked and regrouped (`first_lines`).
* A review whose first line is not a number gets a **null** value with a reason (the
  reference's -1), so ``where rating >= 4.5`` drops exactly the rows ``filter.py`` drops.
  The first line is kept beside the score, so a user can see what the judge said.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tamis.errors import ModelError
from tamis.runtime.api_client import ChatEndpoint
from tamis.runtime.data import rows_of
from tamis.runtime.lm_scoring import cache_keyword, supports_plain_cache
from tamis.runtime.models import LoadedLM
from tamis.runtime.judge_prompts import (ALPAGASUS, JUDGE_DECODING, JUDGE_PROMPTS, R_NOT_A_NUMBER, R_NOT_FINITE, R_TOO_LONG, JudgePrompt,
                                         parse_first_line_score)
from tamis.runtime.templates import render_chat, row_text

__all__ = ["ALPAGASUS", "JUDGE_DECODING", "R_NOT_A_NUMBER", "R_NOT_FINITE", "R_TOO_LONG", "JUDGE_PROMPTS", "JudgePrompt", "RatingTable", "TagTable", "first_lines", "parse_first_line_score", "rate", "tag", "vicuna_v1_1"]

@dataclass
class RatingTable:
    """Per-row ratings in input order; `value` is null exactly when `reason` is set."""

    value: list[float | None]
    reason: list[str | None]
    first_line: list[str | None]  # what the judge wrote before its first newline
    new_tokens: int | None  # tokens generated in all (None from an endpoint)
    seconds: float


def rate(
    judge: "LoadedLM | ChatEndpoint",
    examples: Any,
    *,
    prompt: str = "alpagasus",
    max_tokens: int = 256,
    batch_tokens: int | None = None,
    progress: bool = True,
) -> RatingTable:
    """Rate every row's response with `judge`: a local chat model (greedy, first line, see
    the module note) or an OpenAI-compatible endpoint (`tamis.runtime.api_client`)."""
    if prompt not in JUDGE_PROMPTS:
        raise ModelError(f"unknown judge prompt {prompt!r}: use one of {', '.join(JUDGE_PROMPTS)}")
    if max_tokens < 1:
        raise ModelError(f"max_tokens must be at least 1, got {max_tokens}")
    rows = rows_of(examples, "rate", ModelError)
    started = time.perf_counter()
    conversations = [JUDGE_PROMPTS[prompt].messages(row) for row in rows]
    if isinstance(judge, ChatEndpoint):
        lines, new_tokens, too_long = endpoint_first_lines(judge, conversations, max_tokens, progress)
    else:
        lines, new_tokens, too_long = first_lines(judge, conversations, max_tokens=max_tokens,
                                                  batch_tokens=batch_tokens, progress=progress)
    values: list[float | None] = []
    reasons: list[str | None] = []
    for line, skipped in zip(lines, too_long):
        value, reason = (None, R_TOO_LONG) if skipped else JUDGE_PROMPTS[prompt].parse(line or "")
        values.append(value)
        reasons.append(reason)
    return RatingTable(values, reasons, [None if s else line for line, s in zip(lines, too_long)], new_tokens,
                       time.perf_counter() - started)


# InsTag's tagging request (OFA-Sys/InsTagger's training prompt, as its users port it); the query is the
# instruction and, when there is one, the input on the next line.
INSTAG_REQUEST = ("Please identify tags of user intentions in the following user query and provide an explanation "
                  "for each tag. Please respond in the JSON format {\"tag\": str, \"explanation\": str}.\n"
                  "User query: ")
TAG_DECODING = "greedy-whole-reply-v1"
R_NO_TAGS = "tagger's reply holds no tags"


def tag_conversation(row: Mapping[str, Any]) -> list[dict[str, str]]:
    query = row_text(row, "instruction") + ("\n" + row_text(row, "input") if row_text(row, "input") else "")
    return [{"role": "user", "content": INSTAG_REQUEST + query}]


@dataclass
class TagTable:
    """Per-row tags in input order; `value` is null exactly when `reason` is set."""

    value: list[list[str] | None]
    reason: list[str | None]
    reply: list[str | None]  # what the tagger wrote (kept: a reader can see why a row has no tags)
    new_tokens: int | None
    seconds: float


def tag(tagger: "LoadedLM | ChatEndpoint", examples: Any, *, max_tokens: int = 512, batch_tokens: int | None = None,
        progress: bool = True) -> TagTable:
    """InsTag: each row's query tagged with open-set intention tags by `tagger` (a local chat model,
    batched greedy decoding of whole replies, or an endpoint). The reply's JSON list is read by
    `tamis.runtime.instag.parse_tags` (code fences, prose around it, single quotes); a reply with no
    tags gets null and a reason, counted in the run report — never a silent empty list."""
    from tamis.runtime.instag import parse_tags

    if max_tokens < 1:
        raise ModelError(f"max_tokens must be at least 1, got {max_tokens}")
    rows = rows_of(examples, "tag", ModelError)
    started = time.perf_counter()
    conversations = [tag_conversation(row) for row in rows]
    if isinstance(tagger, ChatEndpoint):
        replies, new_tokens, too_long = endpoint_first_lines(tagger, conversations, max_tokens, progress,
                                                              first_line=False, desc="tagging")
    else:
        replies, new_tokens, too_long = first_lines(tagger, conversations, max_tokens=max_tokens,
                                                    batch_tokens=batch_tokens, progress=progress, first_line=False,
                                                    desc="tagging")
    values: list[list[str] | None] = []
    reasons: list[str | None] = []
    for reply, skipped in zip(replies, too_long):
        if skipped:
            values.append(None)
            reasons.append(R_TOO_LONG)
            continue
        tags, why = parse_tags(reply or "")
        if not tags:
            values.append(None)
            reasons.append(f"{R_NO_TAGS} ({why})" if why else R_NO_TAGS)
        else:
            values.append(tags)
            reasons.append(None)
    return TagTable(values, reasons, [None if s else r for r, s in zip(replies, too_long)], new_tokens,
                    time.perf_counter() - started)


# --------------------------------------------------------------------------- generation


def endpoint_first_lines(endpoint: ChatEndpoint, conversations: list[list[dict[str, str]]], max_tokens: int,
                          progress: bool, first_line: bool = True,
                          desc: str = "judging") -> tuple[list[str], None, list[bool]]:
    """The endpoint's replies, cut at the first newline (`first_line=False`: whole), with a bar."""
    from tqdm.auto import tqdm

    with tqdm(total=len(conversations), unit="row", desc=desc, disable=not progress) as bar:
        on_retry, advance = _retry_notices(bar)
        replies = endpoint.complete_many(conversations, max_tokens=max_tokens, stop=["\n"] if first_line else None,
                                         progress=advance, on_retry=on_retry)
    return [r.split("\n")[0] if first_line else r for r in replies], None, [False] * len(replies)


def _retry_notices(bar: Any) -> tuple[Callable[[str, float, int], None], Callable[[int], None]]:
    """(on_retry, progress) for an endpoint: retries show on the bar, so a waiting run is not
    mistaken for a hung one; the note goes once a row is rated again. Without a bar (--no-progress)
    each retry is a line on stderr, because a silent wait of minutes looks like a hang."""
    import sys

    shown = threading.Event()

    def on_retry(status: str, wait_seconds: float, attempt: int) -> None:
        note = f"{status}, retry {attempt} in {wait_seconds:.0f} s"
        if bar.disable:
            bar.write(f"judging: {note}", file=sys.stderr)
        else:
            bar.set_postfix_str(note)
            shown.set()

    def advance(n: int) -> None:
        bar.update(n)
        if shown.is_set():
            shown.clear()
            bar.set_postfix_str("")

    return on_retry, advance


def first_lines(
    lm: LoadedLM,
    conversations: Sequence[Sequence[Mapping[str, str]]],
    *,
    max_tokens: int = 256,
    batch_tokens: int | None = None,
    progress: bool = True,
    first_line: bool = True,
    desc: str = "judging",
) -> tuple[list[str], int, list[bool]]:
    """Greedy replies of the judge, each cut at its first newline (`first_line=False`: whole
    replies, up to EOS or `max_tokens`, as a tagger's JSON list needs).

    Returns (replies, new tokens generated, whether each prompt was too long for the
    judge's context and so not run). Rows are decoded in batches of similar length; a
    batch whose rows are three-quarters done *parks* the rest (they re-enter the queue
    with what they have written so far, see `_Row`), so a few long-winded rows are decoded
    together instead of one by one. A model without a chat template (a Vicuna-style tagger
    such as OFA-Sys/InsTagger) gets the Vicuna v1.1 conversation format it was trained on.
    """
    tok = lm.tokenizer
    if getattr(tok, "chat_template", None):
        texts = [render_chat(tok, c, add_generation_prompt=True) for c in conversations]
    elif not first_line:
        texts = [vicuna_v1_1(c) for c in conversations]
    else:
        raise ModelError(f"{lm.name} has no chat template, so it cannot serve as a judge (use an instruction-tuned chat model)")
    ids = list(tok(texts, add_special_tokens=False)["input_ids"]) if texts else []
    context = getattr(lm.model.config, "max_position_embeddings", None) or 10**9
    too_long = [len(x) >= context for x in ids]
    replies, new_tokens = decode_ids(lm, [None if t else x for x, t in zip(ids, too_long)], max_tokens=max_tokens,
                                     batch_tokens=batch_tokens, progress=progress, first_line=first_line, desc=desc)
    return [r if r is not None else "" for r in replies], new_tokens, too_long


def decode_ids(
    lm: LoadedLM,
    prompts: Sequence[list[int] | None],
    *,
    max_tokens: int = 256,
    batch_tokens: int | None = None,
    progress: bool = True,
    first_line: bool = False,
    desc: str = "decoding",
) -> tuple[list[str | None], int]:
    """Greedy replies to prompts given as token ids (None: skipped, reply None), each up to EOS or
    `max_tokens` (or the model's context), cut at the first newline with `first_line`; and the new
    tokens generated. Rows decode in batches of similar length; a batch whose rows are three-quarters
    done *parks* the rest (they re-enter the queue with what they have written, see `_Row`), so a few
    long-winded rows are decoded together instead of one by one."""
    from tqdm.auto import tqdm

    context = getattr(lm.model.config, "max_position_embeddings", None) or 10**9
    rows = {i: _Row(list(p), max(1, min(max_tokens, context - len(p)))) for i, p in enumerate(prompts) if p is not None}
    # KV cache ≈ budget × layers × 2 × kv width; decoding is bound by memory traffic, so a
    # moderate batch is as fast per row as a wide one on CPU
    budget = batch_tokens or (131072 if lm.device.type == "cuda" else 8192)
    queue = sorted(rows, key=lambda i: -rows[i].length)
    # per-row caches are left-padded into a batch; a sliding-window cache cannot be
    max_batch = 64 if supports_plain_cache(lm) else 1
    bar = tqdm(total=len(rows), unit="row", desc=desc, disable=not progress, smoothing=0.1)
    while queue:
        # rows in a batch share the longest row's length (left padding) plus its new tokens
        per_row = rows[queue[0]].length + max(rows[i].left for i in queue[:max_batch])
        size = max(1, min(max_batch, budget // per_row))
        batch, queue = queue[:size], queue[size:]
        try:
            _decode_batch(lm, [rows[i] for i in batch], may_park=bool(queue), first_line=first_line)
        except torch.OutOfMemoryError:
            if lm.device.type != "cuda" or budget <= per_row:
                raise ModelError(f"out of memory decoding a {per_row}-token row on {lm.device}; "
                                 "pass a smaller --batch-tokens or use a smaller model") from None
            torch.cuda.empty_cache()
            budget //= 2
            # rows finished before the error stay finished; the rest resume from what they wrote
        parked = [i for i in batch if not rows[i].done]
        bar.update(len(batch) - len(parked))
        queue = sorted(queue + parked, key=lambda i: -rows[i].length)
    bar.close()
    new_tokens = sum(r.limit - r.left for r in rows.values())
    replies: list[str | None] = [lm.tokenizer.decode(rows[i].written, skip_special_tokens=True) if i in rows else None
                                 for i in range(len(prompts))]
    if first_line:
        replies = [r.split("\n")[0] if r is not None else None for r in replies]
    return replies, new_tokens


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the human's questions.")


def vicuna_v1_1(conversation: Sequence[Mapping[str, str]]) -> str:
    """FastChat's vicuna_v1.1 format (system, "USER: …", "ASSISTANT:"), for chat models whose
    tokenizer carries no template, as OFA-Sys/InsTagger (a Vicuna fine-tune)."""
    system = next((m["content"] for m in conversation if m["role"] == "system"), VICUNA_SYSTEM)
    out = system + " "
    for m in conversation:
        if m["role"] == "user":
            out += "USER: " + m["content"] + " "
        elif m["role"] == "assistant":
            out += "ASSISTANT: " + m["content"] + "</s>"
    return out + "ASSISTANT:"


@dataclass
class _Row:
    """One reply being decoded: its prompt, the tokens written so far, how many more it may write."""

    prompt: list[int]
    left: int
    written: list[int] = field(default_factory=list)
    done: bool = False
    limit: int = field(init=False)  # `left` at the start: limit - left tokens were generated

    def __post_init__(self) -> None:
        self.limit = self.left

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.written)


def _decode_batch(lm: LoadedLM, rows: list[_Row], may_park: bool, first_line: bool = True) -> None:
    """Greedy-decode a batch; each row stops at a newline (`first_line`), EOS or its token limit.

    Each row's text is first run alone (no padding, so the causal attention fast path),
    and the caches are left-padded into one batch for decoding. A row that is done leaves
    the batch (its cache rows are dropped), so it costs nothing more. With `may_park`, once
    three-quarters of the batch are done the rest stop early and come back later with what
    they have written (re-reading it as prompt gives the same next tokens as decoding on);
    that lets stragglers of several batches share one.
    """
    tok = lm.tokenizer
    eos = _eos_ids(lm)
    cache_arg = cache_keyword(lm.model)
    park_at = len(rows) // 4 if may_park else 0
    with torch.inference_mode():
        texts = [r.prompt + r.written for r in rows]
        capacity = max(len(t) for t in texts) + max(r.left for r in rows)
        nxt, cache, mask, positions = _prefill_each(lm, texts, capacity)
        active = list(range(len(rows)))  # batch row -> index into rows
        while True:
            keep: list[int] = []
            for r, t in enumerate(nxt):
                row = rows[active[r]]
                row.left -= 1
                if t not in eos:
                    row.written.append(t)
                if t in eos or (first_line and "\n" in tok.decode([t])) or row.left <= 0:
                    row.done = True
                else:
                    keep.append(r)
            if len(keep) <= park_at:
                return  # the rest (if any) are parked: not done, they go back to the queue
            if len(keep) < len(active):
                index = torch.tensor(keep, device=lm.device)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                active = [active[r] for r in keep]
            step = torch.tensor([nxt[r] for r in keep], dtype=torch.long, device=lm.device)[:, None]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            positions = positions + 1
            out = lm.model(input_ids=step, attention_mask=mask, position_ids=positions,
                           use_cache=True, logits_to_keep=1, **{cache_arg: cache})
            cache = out.past_key_values
            nxt = out.logits[:, -1, :].float().argmax(-1).cpu().tolist()


def _prefill_each(lm: LoadedLM, texts: list[list[int]], capacity: int) -> tuple[list[int], Any, torch.Tensor, torch.Tensor]:
    """(first greedy tokens, the batch's cache, attention mask, last positions): each text run
    alone, its cache written left-padded (padding zeroed and masked out) into buffers with
    room for `capacity` tokens."""
    width = max(len(t) for t in texts)
    firsts: list[int] = []
    buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
    for b, t in enumerate(texts):
        out = lm.model(input_ids=torch.tensor([t], device=lm.device), use_cache=True, logits_to_keep=1)
        firsts.append(int(out.logits[0, -1].float().argmax()))
        for i, layer in enumerate(out.past_key_values.layers):
            if b == 0:
                room = (len(texts), max(capacity, width))
                buffers.append(tuple(x.new_zeros((room[0], x.shape[1], room[1], x.shape[3]))
                                     for x in (layer.keys, layer.values)))
            n = layer.keys.shape[2]
            buffers[i][0][b, :, width - n:width] = layer.keys[0]
            buffers[i][1][b, :, width - n:width] = layer.values[0]
    cache = DynamicCache()
    cache.layers = [_GrowingLayer(k, v, width) for k, v in buffers]
    mask = torch.zeros((len(texts), width), dtype=torch.long, device=lm.device)
    for b, t in enumerate(texts):
        mask[b, width - len(t):] = 1
    positions = torch.tensor([[len(t) - 1] for t in texts], dtype=torch.long, device=lm.device)
    return firsts, cache, mask, positions


class _GrowingLayer(DynamicLayer):
    """A decoding cache layer with room reserved up front, so appending a token writes one
    slot instead of copying the whole cache (transformers' layer concatenates, which made
    every step cost as much as copying the batch's cache)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, filled: int) -> None:
        """`keys`/`values`: the whole buffers, of which the first `filled` positions hold the cache."""
        super().__init__()
        self._k, self._v, self._n = keys, values, filled
        self.lazy_initialization(keys, values)
        self._expose()

    def _expose(self) -> None:
        self.keys, self.values = self._k[:, :, :self._n], self._v[:, :, :self._n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        m = key_states.shape[2]
        if self._n + m > self._k.shape[2]:  # out of room (not expected): grow by doubling
            grow = max(self._k.shape[2], m)
            self._k = torch.cat([self._k, self._k.new_empty(self._k.shape[:2] + (grow, self._k.shape[3]))], dim=2)
            self._v = torch.cat([self._v, self._v.new_empty(self._v.shape[:2] + (grow, self._v.shape[3]))], dim=2)
        self._k[:, :, self._n:self._n + m] = key_states
        self._v[:, :, self._n:self._n + m] = value_states
        self._n += m
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._n

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self._expose()


def _eos_ids(lm: LoadedLM) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(lm.model, "generation_config", None), lm.model.config, lm.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    if not ids:
        raise ModelError(f"{lm.name} declares no end-of-sequence token; cannot tell where a judge's reply ends")
    return ids

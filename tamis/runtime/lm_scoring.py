"""The fast answer-loss scorer: loss, perplexity and IFD (both published forms).

For every answer it computes

* ``cond_loss``   — mean token cross-entropy of the answer given its prompt,
* ``direct_loss`` — mean token cross-entropy of the answer alone (IFD only),

and from them ``value``: the loss, the perplexity ``exp(cond)``, or IFD as Cherry LLM
computes it (``cond / direct``, a ratio of mean losses, ``ifd_form="loss_ratio"``) or as
Superfiltering does (``exp(cond) / exp(direct)``, a ratio of perplexities,
``ifd_form="ppl_ratio"``). Which texts and truncation rules are used comes from the
template (see `tamis.runtime.templates`). A sample the reference skips gets a null value
and a `reason`; nothing is ever scored as a silent 0. Whether IFD > 1 is kept is the
recipe's business, not the scorer's.

Why it is fast, and still equal to the one-at-a-time computation:

* **Length-bucketed batches.** All sequences (conditioned and direct) are sorted by
  length and cut into batches under a token budget, so padding stays within a bucket.
  Padding is on the right and the model is causal, so real tokens never see it and no
  attention mask is needed (the fused causal attention path stays available).
* **Answer-only logits.** The base model runs to the final hidden states; only the rows
  that predict answer tokens go through the LM head, in chunks, with the cross-entropy
  taken there in fp32. No full-vocabulary logits for prompt tokens, none kept around.
* **Shared template header computed once.** Every Alpaca prompt starts with the same
  ≈30 tokens ("Below is an instruction..."). Their keys/values are computed once and
  reused for every batch of that prompt form. Exact: a sequence uses the shared header
  only if its own token ids start with the header's ids (checked per sequence), and a
  causal model's states for those positions do not depend on what follows.
* ``torch.inference_mode``; the model's dtype (`choose_dtype`: bf16 where it is really
  faster, fp32 for the exact mode); on CUDA an out-of-memory batch halves the token
  budget and is retried.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F

from tamis.errors import ModelError
from tamis.runtime.data import rows_of
from tamis.runtime.models import LoadedLM, dtype_name
from tamis.runtime.templates import (
    Combine,
    ScoringText,
    Template,
    answer_texts,
    chat_assistant_header,
    chat_static_header,
    combine_values,
    get_template,
)

__all__ = ["IfdForm", "Metric", "ScoreTable", "TurnScore", "score_answers"]

Metric = Literal["ifd", "loss", "ppl"]
IfdForm = Literal["loss_ratio", "ppl_ratio"]
METRICS: tuple[str, ...] = ("ifd", "loss", "ppl")
IFD_FORMS: tuple[str, ...] = ("loss_ratio", "ppl_ratio")

# Rows of hidden states sent through the LM head at once (CPU): bounds the fp32 logits
# buffer (rows × vocab × 4 bytes; 256 × 50k ≈ 50 MB, as much as the reference's full
# logits for one 256-token text) while keeping the matrix product large enough.
_HEAD_CHUNK = 256
# A shared header shorter than this is not worth a separate prefix pass.
_MIN_SHARED_PREFIX = 8
_MAX_BATCH_SEQS = 512
_CHUNK_ROWS = 4096

# Reasons a sample gets no value (shared wording, so reports can count them).
R_EMPTY = "empty answer"
R_PROMPT_TOO_LONG = "prompt reaches max_length"
R_NO_ANSWER_TOKENS = "no answer tokens within max_length"
R_TRUNCATED = "answer truncated at max_length"
R_TOO_SHORT = "answer too short to score alone"
R_DIRECT_ZERO = "direct loss is 0 (IFD undefined)"
R_NO_TURN = "no assistant turn"


# --------------------------------------------------------------------------- results


@dataclass
class TurnScore:
    """One answer's numbers (single-turn rows have exactly one)."""

    cond_loss: float | None = None
    direct_loss: float | None = None
    value: float | None = None
    reason: str | None = None
    n_tokens: int = 0  # answer tokens scored in the conditioned text
    truncated: bool = False  # the answer was cut by max_length (scored on what was kept)


@dataclass
class ScoreStats:
    """What the run cost: for benchmarks and the run report."""

    sequences: int = 0
    tokens: int = 0  # tokens run through the model (after header sharing), padding excluded
    padded_tokens: int = 0  # tokens including padding
    shared_prefix_tokens_saved: int = 0
    head_rows: int = 0  # rows that went through the LM head
    batches: int = 0
    oom_retries: int = 0
    seconds: float = 0.0


@dataclass
class ScoreTable:
    """Per-row scores, in the input order. `value` is null exactly when `reason` is set."""

    metric: str
    ifd_form: str | None
    template: str
    max_length: int
    combine: str
    model: str
    fingerprint: str
    dtype: str
    cond_loss: list[float | None]
    direct_loss: list[float | None]
    value: list[float | None]
    reason: list[str | None]
    n_answer_tokens: list[int]
    truncated: list[bool]
    turns: list[list[TurnScore]]
    stats: ScoreStats = field(default_factory=ScoreStats)

    def __len__(self) -> int:
        return len(self.value)

    def to_frame(self, prefix: str = "") -> Any:
        """A Polars frame: cond_loss, direct_loss, value, reason, n_answer_tokens, truncated,
        turn_values, turn_reasons (column names prefixed with `prefix`)."""
        import polars as pl

        cols: dict[str, Any] = {
            "cond_loss": pl.Series(self.cond_loss, dtype=pl.Float64),
            "direct_loss": pl.Series(self.direct_loss, dtype=pl.Float64),
            "value": pl.Series(self.value, dtype=pl.Float64),
            "reason": pl.Series(self.reason, dtype=pl.String),
            "n_answer_tokens": pl.Series(self.n_answer_tokens, dtype=pl.Int64),
            "truncated": pl.Series(self.truncated, dtype=pl.Boolean),
            "turn_values": pl.Series([[t.value for t in ts] for ts in self.turns], dtype=pl.List(pl.Float64)),
            "turn_reasons": pl.Series([[t.reason for t in ts] for ts in self.turns], dtype=pl.List(pl.String)),
        }
        return pl.DataFrame({prefix + k: v for k, v in cols.items()})


# --------------------------------------------------------------------------- entry point


def score_answers(
    lm: LoadedLM,
    examples: Any,
    *,
    metric: Metric = "ifd",
    ifd_form: IfdForm = "loss_ratio",
    template: str | Template = "alpaca",
    max_length: int = 512,
    batch_tokens: int | None = None,
    combine: Combine = "mean",
    share_prefix: bool = True,
    progress: bool = True,
) -> ScoreTable:
    """Score every row's answer(s) with `lm`.

    `examples`: a Polars frame or a sequence of mappings with ``instruction``, ``input``,
    ``output`` (and ``messages`` for multi-turn rows under the chat template).
    `batch_tokens`: padded tokens per batch (default: 4096 on CPU, 32768 on CUDA).
    `combine`: how a multi-turn row's per-turn values become one ("mean", "first",
    "last", "sum"). `share_prefix=False` turns off the shared-header reuse (for checks).
    """
    if metric not in METRICS:
        raise ModelError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    if ifd_form not in IFD_FORMS:
        raise ModelError(f"unknown ifd_form {ifd_form!r}: use one of {', '.join(IFD_FORMS)}")
    if max_length < 2:
        raise ModelError(f"max_length must be at least 2, got {max_length}")
    tmpl = get_template(template)
    rows = _rows(examples)
    started = time.perf_counter()
    headers = _header_ids(lm, tmpl) if share_prefix else []
    budget = batch_tokens or (32768 if lm.device.type == "cuda" else 4096)
    engine = _Engine(lm, budget, share_prefix)
    bar = _progress_bar(len(rows), progress)
    turns: list[list[TurnScore]] = []
    # Chunks of rows bound the token lists held at once (Python ints are ~36 bytes each);
    # a few thousand rows are plenty for length buckets to fill without padding.
    for start in range(0, len(rows), _CHUNK_ROWS):
        chunk = rows[start : start + _CHUNK_ROWS]
        plan = _plan(lm, chunk, tmpl, max_length, need_direct=(metric == "ifd"))
        losses = engine.mean_losses(plan, headers, len(chunk), bar)
        turns.extend(_finish_turns(answers, losses, metric, ifd_form) for answers in plan.answers)
    bar.close()
    engine.stats.seconds = time.perf_counter() - started
    return _table(lm, tmpl, metric, ifd_form, max_length, combine, turns, engine.stats)



def _rows(examples: Any) -> list[Mapping[str, Any]]:
    return rows_of(examples, "score_answers", ModelError)


# --------------------------------------------------------------------------- planning (tokens only)


@dataclass
class _Seq:
    """One token sequence to run, and the spans of it to score.

    A span [first, end) scores tokens ids[first:end], each predicted from the token
    before it (so first >= 1). One sequence carries several spans when several answers
    are exactly this text up to their end: the earlier turns of a conversation inside a
    later turn's text, or duplicate rows. A causal model's prediction at a position does
    not depend on what follows it, so each span's loss is the one its own text gives.
    """

    ids: list[int]
    spans: list[int]  # indices into _Plan.spans

    def first(self, plan: "_Plan") -> int:
        return min(plan.spans[i].first for i in self.spans)


@dataclass(frozen=True)
class _Span:
    seq: int
    first: int
    end: int
    row: int


@dataclass
class _Answer:
    """One answer's plan: the spans holding its two losses, or the reason it is skipped."""

    reason: str | None = None
    cond: int | None = None
    direct: int | None = None
    n_tokens: int = 0
    truncated: bool = False


@dataclass
class _Plan:
    sequences: list[_Seq] = field(default_factory=list)
    spans: list[_Span] = field(default_factory=list)
    answers: list[list[_Answer]] = field(default_factory=list)  # per row, per assistant turn
    # hash of a sequence's ids → its index, to find exact duplicates (verified on a hit,
    # so a hash collision costs a second sequence, never a wrong score).
    by_hash: dict[int, int] = field(default_factory=dict)

    def add(self, row: int, ids: list[int], first: int, carriers: list[int]) -> int:
        """The span scoring ids[first:] — on an existing sequence when one holds exactly
        these ids (or, among `carriers`, begins with them), else on a new one."""
        key = hash(tuple(ids))
        seq_index = self.by_hash.get(key)
        if seq_index is not None and self.sequences[seq_index].ids != ids:
            seq_index = None
        if seq_index is None:
            seq_index = next((c for c in carriers if self.sequences[c].ids[: len(ids)] == ids), None)
        if seq_index is None:
            seq_index = len(self.sequences)
            self.sequences.append(_Seq(ids, []))
            self.by_hash.setdefault(key, seq_index)
            carriers.append(seq_index)
        self.spans.append(_Span(seq_index, first, len(ids), row))
        self.sequences[seq_index].spans.append(len(self.spans) - 1)
        return len(self.spans) - 1


class AnswerEncoder:
    """Tokenises like the references' ``tokenizer.encode(text, truncation=True, max_length=m)``.

    Truncation drops content tokens from the end and keeps the tokenizer's special tokens,
    as transformers does; the special prefix/suffix is read once from a probe.
    """

    def __init__(self, tokenizer: Any, add_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.add_special = add_special_tokens
        self.pre, self.suf = self._special_frame() if add_special_tokens else ([], [])

    def _special_frame(self) -> tuple[list[int], list[int]]:
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        for i in range(len(full) - len(plain) + 1):
            if full[i : i + len(plain)] == plain:
                return full[:i], full[i + len(plain) :]
        raise ModelError("cannot tell this tokenizer's special tokens apart from its content tokens")

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """Content ids (no special tokens) of many texts, in one call to the fast tokenizer."""
        if not texts:
            return []
        return list(self.tokenizer(list(texts), add_special_tokens=False)["input_ids"])

    def full(self, content: list[int]) -> list[int]:
        return [*self.pre, *content, *self.suf]

    def truncated(self, content: list[int], max_length: int) -> list[int]:
        keep = max(0, max_length - len(self.pre) - len(self.suf))
        return self.full(content[:keep])


def _plan(lm: LoadedLM, rows: Sequence[Mapping[str, Any]], tmpl: Template, max_length: int, *, need_direct: bool) -> _Plan:
    header = chat_assistant_header(lm.tokenizer) if tmpl.is_chat else None
    texts = [answer_texts(tmpl, row, lm.tokenizer, assistant_header=header) for row in rows]
    flat = [t for ts in texts for t in ts]
    enc = AnswerEncoder(lm.tokenizer, tmpl.add_special_tokens)
    prompts = enc.encode_many([t.prompt for t in flat])
    wholes = enc.encode_many([t.prompt + t.answer for t in flat])
    prefixes = {p: enc.full(ids) for p, ids in zip(*_unique_encoded(enc, [t.direct_prefix for t in flat]))}
    directs = enc.encode_many([t.direct_prefix + t.answer for t in flat]) if need_direct or tmpl.rules == "cherry" else []
    plan = _Plan()
    k = 0
    for row_index, ts in enumerate(texts):
        answers: list[_Answer | None] = [None] * len(ts)
        carriers: list[int] = []  # this row's conditioned sequences, longest first
        # Last turn first: its text holds the earlier turns' texts when the chat template
        # renders consistently, so they become spans of one sequence (checked on tokens).
        for j in reversed(range(len(ts))):
            t = ts[j]
            direct = directs[k + j] if directs else None
            answers[j] = _plan_answer(
                plan, row_index, carriers, t, enc, prompts[k + j], wholes[k + j], prefixes[t.direct_prefix],
                direct, tmpl, max_length, need_direct,
            )
        k += len(ts)
        plan.answers.append([a for a in answers if a is not None])
    return plan


def _unique_encoded(enc: AnswerEncoder, texts: list[str]) -> tuple[list[str], list[list[int]]]:
    unique = sorted(set(texts))
    return unique, enc.encode_many(unique) if unique else []


def _plan_answer(
    plan: _Plan,
    row_index: int,
    carriers: list[int],
    text: ScoringText,
    enc: AnswerEncoder,
    prompt_content: list[int],
    whole_content: list[int],
    direct_prefix_ids: list[int],
    direct_content: list[int] | None,
    tmpl: Template,
    max_length: int,
    need_direct: bool,
) -> _Answer:
    """Token arithmetic of one answer, following the template's reference exactly."""
    if text.answer == "":
        return _Answer(reason=R_EMPTY)
    prompt_full_len = len(enc.full(prompt_content))  # len(encode(prompt)): where the answer starts
    prompt_len = min(prompt_full_len, max_length)  # len(encode(prompt, truncation=True, max_length))
    cond_ids = enc.truncated(whole_content, max_length)
    n_cond = len(cond_ids) - prompt_full_len  # may be <= 0 when truncation ate the answer
    truncated = len(enc.full(whole_content)) > max_length
    direct_ids: list[int] | None = None
    n_direct = 0
    if direct_content is not None:
        slack = tmpl.direct_slack
        budget = max_length if slack is None else max_length - prompt_len + slack
        direct_ids = enc.truncated(direct_content, budget)
        n_direct = len(direct_ids) - len(direct_prefix_ids)
    reason = _skip_reason(tmpl, max_length, prompt_len, n_cond, n_direct, truncated, direct_ids is not None)
    if reason is None and len(cond_ids) - max(prompt_full_len, 1) <= 0:
        reason = R_TOO_SHORT  # an empty prompt without BOS: the answer's only token has no predictor
    if reason is None and need_direct and direct_ids is not None and len(direct_ids) - max(len(direct_prefix_ids), 1) <= 0:
        reason = R_TOO_SHORT  # e.g. a one-token answer with no BOS: nothing to predict it from
    if reason is not None:
        return _Answer(reason=reason, truncated=truncated)
    answer = _Answer(n_tokens=n_cond, truncated=truncated)
    answer.cond = plan.add(row_index, cond_ids, max(prompt_full_len, 1), carriers)
    if need_direct and direct_ids is not None:
        answer.direct = plan.add(row_index, direct_ids, max(len(direct_prefix_ids), 1), [])
    return answer


def _skip_reason(
    tmpl: Template, max_length: int, prompt_len: int, n_cond: int, n_direct: int, truncated: bool, has_direct: bool
) -> str | None:
    if tmpl.rules == "cherry":
        # data_by_IFD.py: skip unless max_length - prompt_len > 0; skip len <= 0 in either
        # text; skip prompt_len + direct answer length > max_length.
        if max_length - prompt_len <= 0:
            return R_PROMPT_TOO_LONG
        if n_cond <= 0 or (has_direct and n_direct <= 0):
            return R_NO_ANSWER_TOKENS
        if has_direct and prompt_len + n_direct > max_length:
            return R_TRUNCATED
        return None
    if tmpl.rules in ("superfiltering", "nuggets"):
        # The references score truncated answers on what is left; a text with nothing to
        # score gives a NaN loss (Superfiltering's selection drops it) or a log-probability
        # sum of 0 that never wins (Nuggets).
        return R_NO_ANSWER_TOKENS if n_cond <= 0 else None
    if prompt_len >= max_length:
        return R_PROMPT_TOO_LONG
    return R_TRUNCATED if truncated else None


def _header_ids(lm: LoadedLM, tmpl: Template) -> list[list[int]]:
    """Token ids of the template's shared headers (as they begin a full encoding)."""
    enc = AnswerEncoder(lm.tokenizer, tmpl.add_special_tokens)
    heads = tmpl.static_headers()
    if tmpl.is_chat:
        heads = [chat_static_header(lm.tokenizer)]
    ids = [enc.pre + content for content in enc.encode_many([h for h in heads if h])]
    return [h for h in ids if len(h) >= _MIN_SHARED_PREFIX]


# --------------------------------------------------------------------------- results per answer


def _finish_turns(answers: list[_Answer], losses: list[float], metric: str, ifd_form: str) -> list[TurnScore]:
    return [_finish(a, losses, metric, ifd_form) for a in answers]


def _finish(a: _Answer, losses: list[float], metric: str, ifd_form: str) -> TurnScore:
    if a.reason is not None or a.cond is None:
        return TurnScore(reason=a.reason, truncated=a.truncated)
    cond = losses[a.cond]
    direct = losses[a.direct] if a.direct is not None else None
    score = TurnScore(cond_loss=cond, direct_loss=direct, n_tokens=a.n_tokens, truncated=a.truncated)
    if metric == "loss":
        score.value = cond
    elif metric == "ppl":
        score.value = math.exp(cond)
    elif ifd_form == "loss_ratio":
        assert direct is not None
        if direct == 0.0:
            score.reason = R_DIRECT_ZERO
        else:
            score.value = cond / direct
    else:
        assert direct is not None
        score.value = math.exp(cond - direct)  # = exp(cond) / exp(direct), without overflow
    return score


def _table(
    lm: LoadedLM,
    tmpl: Template,
    metric: str,
    ifd_form: str,
    max_length: int,
    combine: Combine,
    turns: list[list[TurnScore]],
    stats: ScoreStats,
) -> ScoreTable:
    cond, direct, value, reason, n_tok, trunc = [], [], [], [], [], []
    for ts in turns:
        v = combine_values([t.value for t in ts], combine)
        value.append(v)
        cond.append(combine_values([t.cond_loss for t in ts], combine))
        direct.append(combine_values([t.direct_loss for t in ts], combine))
        reason.append(None if v is not None else _row_reason(ts, combine))
        n_tok.append(sum(t.n_tokens for t in ts))
        trunc.append(any(t.truncated for t in ts))
    return ScoreTable(
        metric=metric,
        ifd_form=ifd_form if metric == "ifd" else None,
        template=tmpl.name,
        max_length=max_length,
        combine=combine,
        model=lm.name,
        fingerprint=lm.fingerprint,
        dtype=dtype_name(lm.dtype),
        cond_loss=cond,
        direct_loss=direct,
        value=value,
        reason=reason,
        n_answer_tokens=n_tok,
        truncated=trunc,
        turns=turns,
        stats=stats,
    )


def _row_reason(ts: list[TurnScore], combine: str) -> str:
    if not ts:
        return R_NO_TURN
    if len(ts) == 1:
        return ts[0].reason or R_NO_ANSWER_TOKENS
    if combine in ("first", "last"):
        t = ts[0] if combine == "first" else ts[-1]
        return f"{combine} turn: {t.reason}"
    reasons = sorted({t.reason for t in ts if t.reason})
    return "no turn scored: " + "; ".join(reasons)


# --------------------------------------------------------------------------- the model runs


class _Engine:
    """Runs sequences through the model in length-bucketed batches; returns mean answer losses."""

    def __init__(self, lm: LoadedLM, budget: int, share_prefix: bool) -> None:
        self.lm = lm
        self.budget = budget
        self.base, self.head, self.softcap = split_model(lm)
        self.cache_kw = cache_keyword(self.base)
        self.share_prefix = share_prefix and supports_plain_cache(lm)
        # A batch's fixed cost in token-equivalents: on a CPU a padded token costs about
        # as much as a real one and a forward call little, so batches follow lengths
        # closely; on a GPU each call costs thousands of tokens' worth, so batches grow.
        self.batch_overhead = 2048 if lm.device.type == "cuda" else 32
        self.head_chunk = 4096 if lm.device.type == "cuda" else _HEAD_CHUNK
        self.prefix_cache: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.stats = ScoreStats()

    # ---- orchestration

    def mean_losses(self, plan: _Plan, headers: list[list[int]], n_rows: int, bar: Any) -> list[float]:
        """Mean cross-entropy of every span of `plan`, indexed like plan.spans."""
        seqs = plan.sequences
        losses = [math.nan] * len(plan.spans)
        groups = self._groups(plan, headers if self.share_prefix else [])
        remaining = [0] * n_rows
        for span in plan.spans:
            remaining[span.row] += 1
        bar.update(sum(1 for c in remaining if c == 0))  # rows with nothing to run
        with torch.inference_mode():
            for header, members in groups:
                prefix_kv = self._prefix_kv(tuple(header)) if header else None
                todo = sorted(members, key=lambda i: -len(seqs[i].ids))
                lengths = [len(seqs[i].ids) - len(header) for i in todo]
                done = 0
                while done < len(todo):
                    for size in _partition(lengths[done:], self.budget, self.batch_overhead):
                        batch = todo[done : done + size]
                        try:
                            values = self._run_batch(plan, [seqs[i] for i in batch], header, prefix_kv)
                        except torch.OutOfMemoryError:
                            self._back_off(lengths[done])
                            break  # partition the rest again under the smaller budget
                        done += size
                        for span_index, v in values.items():
                            losses[span_index] = v
                            row = plan.spans[span_index].row
                            remaining[row] -= 1
                            if remaining[row] == 0:
                                bar.update(1)
        return losses

    def _groups(self, plan: _Plan, headers: list[list[int]]) -> list[tuple[list[int], list[int]]]:
        """Sequences grouped by the longest shared header they start with ([] for none)."""
        by_header: dict[int, list[int]] = {}
        ordered = sorted(range(len(headers)), key=lambda h: -len(headers[h]))
        for i, s in enumerate(plan.sequences):
            key = -1
            first = s.first(plan)
            for h in ordered:
                head = headers[h]
                # The header must end before the first scored position's predictor.
                if len(head) <= first - 1 and s.ids[: len(head)] == head:
                    key = h
                    break
            by_header.setdefault(key, []).append(i)
        return [(headers[h] if h >= 0 else [], members) for h, members in sorted(by_header.items())]

    def _back_off(self, longest: int) -> None:
        self.budget = halved_budget(self.lm.device, self.budget, longest, "lower max_length or use a smaller model")
        self.stats.oom_retries += 1

    # ---- one batch

    def _prefix_kv(self, header: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of a shared header, computed once per scoring call."""
        if header in self.prefix_cache:
            return self.prefix_cache[header]
        self.stats.tokens += len(header)
        self.prefix_cache[header] = prefix_kv(self.base, self.cache_kw, header, self.lm.device)
        return self.prefix_cache[header]

    def _run_batch(
        self,
        plan: _Plan,
        batch: list[_Seq],
        header: list[int],
        prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> dict[int, float]:
        """Mean loss of every span of the batch's sequences, by span index."""
        h = len(header)
        width = max(len(s.ids) for s in batch) - h
        ids = torch.zeros((len(batch), width), dtype=torch.long)  # right padding: never attended to
        for b, s in enumerate(batch):
            ids[b, : len(s.ids) - h] = torch.tensor(s.ids[h:])
        ids = ids.to(self.lm.device)
        hidden = hidden_after(self.base, self.cache_kw, ids, prefix_kv)
        spans = [(b, plan.spans[i], i) for b, s in enumerate(batch) for i in s.spans]
        rows, targets, owner = self._answer_rows(batch, [(b, sp) for b, sp, _ in spans], width, h)
        totals = answer_losses(hidden, self.head, self.softcap, rows, targets, owner, len(spans), self.head_chunk)
        self._count(batch, h, width, rows.numel())
        return {i: float(t) / (sp.end - sp.first) for (_, sp, i), t in zip(spans, totals.tolist())}


    def _answer_rows(
        self, batch: list[_Seq], spans: list[tuple[int, _Span]], width: int, h: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(flat hidden-row index, target id, owning span) of every scored token."""
        rows: list[int] = []
        targets: list[int] = []
        owner: list[int] = []
        for k, (b, sp) in enumerate(spans):
            n = sp.end - sp.first
            # Token t is predicted by the state at position t-1 (in suffix coordinates t-1-h).
            base = b * width + sp.first - 1 - h
            rows.extend(range(base, base + n))
            targets.extend(batch[b].ids[sp.first : sp.end])
            owner.extend([k] * n)
        dev = self.lm.device
        return (torch.tensor(rows, device=dev), torch.tensor(targets, device=dev), torch.tensor(owner, device=dev))


    def _count(self, batch: list[_Seq], h: int, width: int, head_rows: int) -> None:
        self.stats.batches += 1
        self.stats.head_rows += head_rows
        self.stats.sequences += len(batch)
        self.stats.tokens += sum(len(s.ids) - h for s in batch)
        self.stats.padded_tokens += width * len(batch)
        self.stats.shared_prefix_tokens_saved += h * len(batch)


def prefix_kv(base: Any, cache_kw: str, ids: Sequence[int], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of one token sequence, per layer ([1, heads, len, dim] each), to be
    shared by every sequence that continues it (`hidden_after`)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    base(input_ids=torch.tensor([list(ids)], device=device), use_cache=True, **{cache_kw: cache})
    return [(layer.keys, layer.values) for layer in cache.layers]


def hidden_after(base: Any, cache_kw: str, ids: torch.Tensor,
                 prefix: list[tuple[torch.Tensor, torch.Tensor]] | None) -> torch.Tensor:
    """Final hidden states of a right-padded batch `ids` [n, width], each row continuing the
    shared `prefix` (`prefix_kv`; None: no prefix). Right padding is never attended to by a
    real token of a causal model, so no attention mask is needed."""
    if prefix is None:
        return base(input_ids=ids, use_cache=False).last_hidden_state
    from transformers import DynamicCache

    n, h = ids.shape[0], prefix[0][0].shape[2]
    # Expanded views: the cache concatenates new keys onto them, never writes into them.
    cache = DynamicCache(ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in prefix])
    positions = torch.arange(h, h + ids.shape[1], device=ids.device).unsqueeze(0).expand(n, -1)
    return base(input_ids=ids, position_ids=positions, use_cache=True, **{cache_kw: cache}).last_hidden_state


def answer_losses(hidden: torch.Tensor, head: Any, softcap: float | None, rows: torch.Tensor, targets: torch.Tensor,
                  owner: torch.Tensor, n: int, chunk: int) -> torch.Tensor:
    """Summed cross-entropy (fp64) of `n` spans: flat hidden row `rows[i]` predicts `targets[i]`
    for span `owner[i]`. Only those rows go through the LM head, `chunk` at a time, in fp32."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    totals = torch.zeros(n, dtype=torch.float64, device=hidden.device)
    for start in range(0, rows.numel(), chunk):
        sl = slice(start, start + chunk)
        logits = head(flat.index_select(0, rows[sl])).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        totals.index_add_(0, owner[sl], F.cross_entropy(logits, targets[sl], reduction="none").double())
    return totals


def _partition(lengths: Sequence[int], budget: int, overhead: int) -> list[int]:
    """Batch sizes splitting `lengths` (sorted longest first) into consecutive batches.

    Minimises the padded tokens plus `overhead` per batch, subject to each batch's padded
    size (its first length × its size) staying within `budget` (a single sequence is
    always allowed). Exact dynamic programming over the sorted order, vectorised per end.
    """
    import numpy as np

    n = len(lengths)
    if n == 0:
        return []
    lens = np.asarray(lengths, dtype=np.int64)
    best = np.zeros(n + 1, dtype=np.float64)
    start_of = np.zeros(n + 1, dtype=np.int64)
    lo = 0
    for j in range(1, n + 1):
        # Feasible starts i form a suffix [lo, j): lens[i] * (j - i) grows as i moves left.
        lo = max(lo, j - _MAX_BATCH_SEQS)
        while lo < j - 1 and lens[lo] * (j - lo) > budget:
            lo += 1
        starts = np.arange(lo, j)
        cost = best[lo:j] + lens[lo:j] * (j - starts) + overhead
        k = int(np.argmin(cost))
        best[j], start_of[j] = cost[k], lo + k
    sizes: list[int] = []
    j = n
    while j > 0:
        sizes.append(int(j - start_of[j]))
        j = int(start_of[j])
    return sizes[::-1]


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="row", desc="scoring", disable=not enabled, smoothing=0.1)


# --------------------------------------------------------------------------- model anatomy


_VERIFIED: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def halved_budget(device: torch.device, budget: int, longest: int, advice: str) -> int:
    """The token budget after a CUDA out-of-memory error: half, unless one sequence alone does not fit."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if budget <= longest:
        raise ModelError(f"out of memory on {device} with a single sequence of {longest} tokens; {advice}")
    return budget // 2


def split_model(lm: LoadedLM) -> tuple[Any, Any, float | None]:
    """(base model, LM head, logit soft-cap) — checked once against the model's own logits."""
    model = lm.model
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model or head is None:
        raise ModelError(f"{lm.name}: cannot separate the base model from the LM head of {type(model).__name__}")
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if model not in _VERIFIED:
        _verify_split(lm, base, head, softcap)
        _VERIFIED[model] = True
    return base, head, softcap


def _verify_split(lm: LoadedLM, base: Any, head: Any, softcap: float | None) -> None:
    """The answer-only path must give the model's own logits; a model that post-processes
    logits in a way tamis does not know is refused rather than scored wrongly."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]], device=lm.device) % lm.model.config.vocab_size
    with torch.inference_mode():
        want = lm.model(input_ids=ids, use_cache=False).logits.float()
        got = head(base(input_ids=ids, use_cache=False).last_hidden_state).float()
        if softcap is not None:
            got = torch.tanh(got / softcap) * softcap
    tol = 1e-4 if lm.dtype == torch.float32 else 5e-2
    if not torch.allclose(want, got, atol=tol, rtol=tol):
        raise ModelError(
            f"{lm.name}: {type(lm.model).__name__} transforms its logits beyond the LM head; "
            "tamis' answer-only scoring does not support this architecture"
        )


def cache_keyword(base: Any) -> str:
    import inspect

    params = inspect.signature(base.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise ModelError(f"{type(base).__name__}.forward takes no key/value cache argument")


def supports_plain_cache(lm: LoadedLM) -> bool:
    """Whether every layer caches plainly (no sliding window): header sharing and the judge's
    left-padded decode batches need that."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        layers = DynamicCache(config=lm.model.config).layers
    except Exception:  # a config the cache cannot read: do not share rather than guess
        return False
    return all(type(layer) is DynamicLayer for layer in layers)

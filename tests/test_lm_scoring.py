"""The fast answer-loss scorer against plain one-at-a-time computations.

The plain versions below follow the references' procedure step by step (encode the
whole text, locate the answer by encoding the text before it, run the model on one
sequence, take full-vocabulary logits, average the answer tokens' cross-entropy), so
the fast path's batching, answer-only head and shared-header cache are checked for
exactness, not just plausibility.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tamis.errors import ModelError
from tamis.runtime.lm_scoring import (
    R_EMPTY,
    R_NO_ANSWER_TOKENS,
    R_PROMPT_TOO_LONG,
    R_TOO_SHORT,
    R_TRUNCATED,
    score_answers,
)
from tamis.runtime.models import LoadedLM
from tamis.runtime.templates import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, get_template

EXAMPLES = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well.\n2. Sleep.\n3. Move every day."},
    {"instruction": "Translate to French.", "input": "Good morning, my friend.", "output": "Bonjour, mon ami."},
    {"instruction": "What is 2+2?", "input": "", "output": "4"},
    {"instruction": "  Indented instruction with spaces", "input": "", "output": " An answer starting with a space."},
    {"instruction": "Summarise the text.", "input": "Cats sleep a lot. Dogs bark. " * 6, "output": "Animals do animal things, " * 5},
    {"instruction": "Write a haiku about autumn leaves falling.", "input": "", "output": "Red leaves drift and fall\nquiet paths of amber light\nthe year exhales slow"},
    {"instruction": "Unicode: résumé naïve café 東京", "input": "", "output": "Ça marche — très bien! 🎉"},
]


# --------------------------------------------------------------------------- plain references


def _token_losses(lm: LoadedLM, ids: list[int]) -> list[float]:
    """Loss of predicting ids[i] from ids[:i], for i = 1..n-1, from full logits, batch 1."""
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0].float()
    logp = F.log_softmax(logits, dim=-1)
    return [-logp[i - 1, ids[i]].item() for i in range(1, len(ids))]


def _encode(tok: Any, text: str, max_length: int | None = None) -> list[int]:
    if max_length is None:
        return tok.encode(text)
    return tok.encode(text, truncation=True, max_length=max_length)


def cherry_plain(lm: LoadedLM, row: dict[str, str], max_length: int) -> tuple[float, float] | None:
    """Cherry LLM's data_analysis.py + data_by_IFD.py for one row: (cond, direct) mean losses, or None if skipped."""
    tok = lm.tokenizer
    fmt = ALPACA_PROMPT_INPUT if row["input"] else ALPACA_PROMPT_NO_INPUT
    prompt = fmt.format_map(row)
    output = row["output"]
    whole = prompt + output
    direct = "### Response:" + output
    prompt_len = len(_encode(tok, prompt, max_length))

    def part(text: str, m: int) -> tuple[int, list[float]]:
        ids = _encode(tok, text, m)
        start = len(_encode(tok, text[: text.rfind(output)]))
        losses = _token_losses(lm, ids)[start - 1 : len(ids) - 1]
        return len(ids) - start, losses

    if max_length - prompt_len <= 0:
        return None
    n1, l1 = part(direct, max_length - prompt_len + 4)
    n2, l2 = part(whole, max_length)
    if n1 <= 0 or n2 <= 0 or prompt_len + n1 > max_length:
        return None
    return sum(l2) / len(l2), sum(l1) / len(l1)


def superfiltering_plain(lm: LoadedLM, row: dict[str, str], max_length: int) -> tuple[float, float] | None:
    """Superfiltering's code_ifd/data_analysis.py for one row: (cond, direct) mean losses."""
    tok = lm.tokenizer
    prompt = f"{row['instruction']}\n{row['input']}\n" if row["input"] else f"{row['instruction']}\n"
    output = row["output"]
    if output == "":
        return None
    prompt_len = len(_encode(tok, prompt, max_length))
    direct_ids = _encode(tok, output, max_length - prompt_len + 1)
    direct = _token_losses(lm, direct_ids)  # labels = input_ids: every token after the first
    whole = prompt + output
    ids = _encode(tok, whole, max_length)
    start = len(_encode(tok, whole[: whole.rfind(output)]))
    cond = _token_losses(lm, ids)[start - 1 :]
    if not cond or not direct:
        return None
    return sum(cond) / len(cond), sum(direct) / len(direct)


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("batch_tokens", [16, 256, 100_000])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_cherry_ifd_equals_plain_computation(tiny_lm, batch_tokens, share_prefix):
    table = score_answers(
        tiny_lm, EXAMPLES, metric="ifd", template="alpaca", max_length=512,
        batch_tokens=batch_tokens, share_prefix=share_prefix, progress=False,
    )
    for i, row in enumerate(EXAMPLES):
        want = cherry_plain(tiny_lm, row, 512)
        assert want is not None
        assert table.reason[i] is None
        assert table.cond_loss[i] == pytest.approx(want[0], abs=1e-5)
        assert table.direct_loss[i] == pytest.approx(want[1], abs=1e-5)
        assert table.value[i] == pytest.approx(want[0] / want[1], abs=1e-5)
    if share_prefix:
        assert table.stats.shared_prefix_tokens_saved > 0


@pytest.mark.parametrize("max_length", [24, 40, 64, 1024])
def test_superfiltering_ifd_equals_plain_computation(tiny_lm, max_length):
    table = score_answers(
        tiny_lm, EXAMPLES, metric="ifd", ifd_form="ppl_ratio", template="bare",
        max_length=max_length, batch_tokens=200, progress=False,
    )
    for i, row in enumerate(EXAMPLES):
        want = superfiltering_plain(tiny_lm, row, max_length)
        if want is None:
            assert table.value[i] is None and table.reason[i] is not None
            continue
        assert table.reason[i] is None, table.reason[i]
        assert table.cond_loss[i] == pytest.approx(want[0], abs=1e-5)
        assert table.direct_loss[i] == pytest.approx(want[1], abs=1e-5)
        assert table.value[i] == pytest.approx(math.exp(want[0]) / math.exp(want[1]), rel=1e-5)


@pytest.mark.parametrize("max_length", [30, 45, 60, 80])
def test_cherry_truncation_and_skips_follow_the_reference(tiny_lm, max_length):
    table = score_answers(tiny_lm, EXAMPLES, template="alpaca", max_length=max_length, progress=False)
    for i, row in enumerate(EXAMPLES):
        want = cherry_plain(tiny_lm, row, max_length)
        if want is None:
            assert table.value[i] is None and table.reason[i] in {R_PROMPT_TOO_LONG, R_NO_ANSWER_TOKENS, R_TRUNCATED}
        else:
            assert table.reason[i] is None
            assert table.value[i] == pytest.approx(want[0] / want[1], abs=1e-5)


def test_loss_and_ppl_metrics_are_the_conditioned_loss(tiny_lm):
    ifd = score_answers(tiny_lm, EXAMPLES, metric="ifd", progress=False)
    loss = score_answers(tiny_lm, EXAMPLES, metric="loss", progress=False)
    ppl = score_answers(tiny_lm, EXAMPLES, metric="ppl", progress=False)
    for i in range(len(EXAMPLES)):
        assert loss.value[i] == pytest.approx(ifd.cond_loss[i], abs=1e-6)
        assert ppl.value[i] == pytest.approx(math.exp(ifd.cond_loss[i]), rel=1e-6)
        assert loss.direct_loss[i] is None  # the direct pass is not run for loss/ppl
    assert loss.stats.sequences == len(EXAMPLES)


def test_ifd_forms_relate_by_exp(tiny_lm):
    a = score_answers(tiny_lm, EXAMPLES, ifd_form="loss_ratio", template="bare", progress=False)
    b = score_answers(tiny_lm, EXAMPLES, ifd_form="ppl_ratio", template="bare", progress=False)
    assert a.reason == b.reason and a.reason.count(None) == len(EXAMPLES) - 1  # "4": too short alone
    for i in range(len(EXAMPLES)):
        if a.reason[i] is not None:
            continue
        assert a.cond_loss[i] == b.cond_loss[i] and a.direct_loss[i] == b.direct_loss[i]
        assert a.value[i] == pytest.approx(a.cond_loss[i] / a.direct_loss[i], rel=1e-12)
        assert b.value[i] == pytest.approx(math.exp(b.cond_loss[i]) / math.exp(b.direct_loss[i]), rel=1e-9)


def test_frame_input_and_output(tiny_lm):
    pl = pytest.importorskip("polars")
    frame = pl.DataFrame(EXAMPLES[:3])
    table = score_answers(tiny_lm, frame, progress=False)
    out = table.to_frame(prefix="ifd_")
    assert out.columns[:4] == ["ifd_cond_loss", "ifd_direct_loss", "ifd_value", "ifd_reason"]
    assert out.height == 3 and len(table) == 3
    assert (out["ifd_value"].is_null() == out["ifd_reason"].is_not_null()).all()


# --------------------------------------------------------------------------- reasons


def test_empty_answer_gets_a_reason_not_a_zero(tiny_lm):
    rows = [{"instruction": "Say nothing.", "input": "", "output": ""}]
    for template in ("alpaca", "bare", "none"):
        table = score_answers(tiny_lm, rows, template=template, progress=False)
        assert table.value == [None] and table.reason == [R_EMPTY]


def test_cherry_skips_an_answer_that_would_be_truncated(tiny_lm):
    row = {"instruction": "Talk.", "input": "", "output": "word " * 200}
    table = score_answers(tiny_lm, [row], template="alpaca", max_length=128, progress=False)
    assert table.value == [None] and table.reason == [R_TRUNCATED] and table.truncated == [True]
    assert cherry_plain(tiny_lm, row, 128) is None


def test_cherry_skips_a_prompt_that_fills_max_length(tiny_lm):
    row = {"instruction": "long " * 300, "input": "", "output": "ok"}
    table = score_answers(tiny_lm, [row], template="alpaca", max_length=64, progress=False)
    assert table.reason == [R_PROMPT_TOO_LONG]


def test_superfiltering_scores_a_truncated_answer_on_what_is_kept(tiny_lm):
    row = {"instruction": "Talk.", "input": "", "output": "word " * 200}
    table = score_answers(tiny_lm, [row], template="bare", ifd_form="ppl_ratio", max_length=64, progress=False)
    assert table.reason == [None] and table.truncated == [True]
    want = superfiltering_plain(tiny_lm, row, 64)
    assert want is not None and table.cond_loss[0] == pytest.approx(want[0], abs=1e-5)


def test_superfiltering_one_token_answer_cannot_be_scored_alone(tiny_lm):
    # GPT-2 adds no BOS, so the answer's only token has nothing to be predicted from in
    # the direct text; the reference gets a NaN loss there. Here: null with a reason.
    row = {"instruction": "What is 2+2?", "input": "", "output": "4"}
    table = score_answers(tiny_lm, [row], template="bare", progress=False)
    assert table.value == [None] and table.reason == [R_TOO_SHORT]


def test_strict_rules_skip_truncated_answers(tiny_lm):
    row = {"instruction": "Talk.", "input": "", "output": "word " * 200}
    table = score_answers(tiny_lm, [row], template="none", max_length=64, progress=False)
    assert table.reason == [R_TRUNCATED]


def test_bad_arguments_are_model_errors(tiny_lm):
    with pytest.raises(ModelError, match="metric"):
        score_answers(tiny_lm, EXAMPLES, metric="nope", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="ifd_form"):
        score_answers(tiny_lm, EXAMPLES, ifd_form="ratio", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="template"):
        score_answers(tiny_lm, EXAMPLES, template="vicuna", progress=False)
    with pytest.raises(ModelError, match="chat template"):
        score_answers(tiny_lm, EXAMPLES, template="chat", progress=False)


# --------------------------------------------------------------------------- a model with known logits


class _CharTokenizer:
    """One token per character of a tiny alphabet; no special tokens."""

    def __init__(self, alphabet: str) -> None:
        self.alphabet = alphabet

    def __call__(self, texts: Any, add_special_tokens: bool = True) -> dict[str, Any]:
        if isinstance(texts, str):
            return {"input_ids": [self.alphabet.index(c) for c in texts]}
        return {"input_ids": [[self.alphabet.index(c) for c in t] for t in texts]}


class _BigramOutput:
    def __init__(self, **kw: torch.Tensor) -> None:
        self.__dict__.update(kw)


class _OneHotBase(torch.nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor, cache: Any = None, use_cache: bool = False, **_: Any) -> _BigramOutput:
        return _BigramOutput(last_hidden_state=F.one_hot(input_ids, self.vocab).float())


class _BigramLM(torch.nn.Module):
    """logits(next | current token c) = W[c]: every loss is a number one can work out by hand."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        vocab = table.shape[0]
        self.config = type("Cfg", (), {"vocab_size": vocab})()
        self.base = _OneHotBase(vocab)
        self.head = torch.nn.Linear(vocab, vocab, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(table.T)

    @property
    def base_model(self) -> torch.nn.Module:
        return self.base

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, **_: Any) -> _BigramOutput:
        return _BigramOutput(logits=self.head(self.base(input_ids).last_hidden_state))


def test_ifd_on_a_model_with_hand_computable_logits():
    # Alphabet a, b, newline. From "\n" every next token is equally likely: p(a|\n) = 1/3.
    # From "a", logits (0, ln 2, 0): p(b|a) = 2/4 = 1/2.
    alphabet = "ab\n"
    table = torch.zeros(3, 3)
    table[0, 1] = math.log(2.0)
    lm = LoadedLM(_BigramLM(table), _CharTokenizer(alphabet), torch.device("cpu"), torch.float32, "bigram", "bigram")
    row = {"instruction": "a", "input": "", "output": "ab"}
    # bare: conditioned "a\n" + "ab" scores a|\n and b|a: (ln 3 + ln 2) / 2.
    # Direct "ab" alone (no BOS): only b|a is scored: ln 2.
    cond, direct = (math.log(3) + math.log(2)) / 2, math.log(2)
    loss_ratio = score_answers(lm, [row], template="bare", ifd_form="loss_ratio", progress=False)
    ppl_ratio = score_answers(lm, [row], template="bare", ifd_form="ppl_ratio", progress=False)
    assert loss_ratio.cond_loss[0] == pytest.approx(cond, abs=1e-6)
    assert loss_ratio.direct_loss[0] == pytest.approx(direct, abs=1e-6)
    assert loss_ratio.value[0] == pytest.approx(math.log(6) / (2 * math.log(2)), abs=1e-6)  # ≈ 1.2925
    assert ppl_ratio.value[0] == pytest.approx(math.sqrt(6) / 2, abs=1e-6)  # ≈ 1.2247
    assert loss_ratio.n_answer_tokens == [2]


# --------------------------------------------------------------------------- multi-turn


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def chat_lm(tiny_lm):
    import copy

    tok = copy.deepcopy(tiny_lm.tokenizer)  # the shared fixture stays untouched
    tok.chat_template = CHATML
    return replace(tiny_lm, tokenizer=tok)


CONVERSATION = {
    "messages": [
        {"role": "user", "content": "Hi! Can you help me plan a trip?"},
        {"role": "assistant", "content": "Of course. Where would you like to go?"},
        {"role": "user", "content": "Somewhere warm in winter."},
        {"role": "assistant", "content": "The Canary Islands are mild all year."},
    ]
}


def _chat_turn_plain(lm: LoadedLM, history: list[dict[str, str]], answer: str) -> tuple[float, float]:
    tok = lm.tokenizer
    prompt = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(prompt + answer)
    start = len(tok.encode(prompt))
    cond = _token_losses(lm, ids)[start - 1 :]
    header = "<|im_start|>assistant\n"
    dids = tok.encode(header + answer)
    direct = _token_losses(lm, dids)[len(tok.encode(header)) - 1 :]
    return sum(cond) / len(cond), sum(direct) / len(direct)


def test_multi_turn_scores_each_assistant_turn_given_its_history(chat_lm):
    msgs = CONVERSATION["messages"]
    want = [_chat_turn_plain(chat_lm, msgs[:1], msgs[1]["content"]), _chat_turn_plain(chat_lm, msgs[:3], msgs[3]["content"])]
    values = [c / d for c, d in want]
    table = score_answers(chat_lm, [CONVERSATION], template="chat", combine="mean", progress=False)
    turns = table.turns[0]
    assert len(turns) == 2
    for t, (c, d), v in zip(turns, want, values):
        assert t.cond_loss == pytest.approx(c, abs=1e-5) and t.direct_loss == pytest.approx(d, abs=1e-5)
        assert t.value == pytest.approx(v, abs=1e-5)
    assert table.value[0] == pytest.approx(sum(values) / 2, abs=1e-5)
    for how, expect in (("first", values[0]), ("last", values[1]), ("sum", sum(values))):
        other = score_answers(chat_lm, [CONVERSATION], template="chat", combine=how, progress=False)
        assert other.value[0] == pytest.approx(expect, abs=1e-5)
    assert table.to_frame()["turn_values"].to_list()[0] == pytest.approx(values, abs=1e-5)


def test_earlier_turns_are_scored_inside_the_last_turns_sequence(chat_lm):
    # Turn 1's conditioned text is a prefix of turn 2's: one model run scores both.
    table = score_answers(chat_lm, [CONVERSATION], template="chat", progress=False)
    assert table.stats.sequences == 3  # one conditioned (both turns) + two direct
    alone = score_answers(chat_lm, [CONVERSATION], template="chat", metric="loss", progress=False)
    assert alone.stats.sequences == 1


def test_duplicate_rows_run_once(tiny_lm):
    rows = [EXAMPLES[0], EXAMPLES[1], dict(EXAMPLES[0])]
    table = score_answers(tiny_lm, rows, progress=False)
    assert table.stats.sequences == 4
    assert table.value[0] == table.value[2] and table.value[0] is not None


def test_chat_template_on_single_turn_rows(chat_lm):
    row = EXAMPLES[0]
    table = score_answers(chat_lm, [row], template="chat", progress=False)
    c, d = _chat_turn_plain(chat_lm, [{"role": "user", "content": row["instruction"]}], row["output"])
    assert table.value[0] == pytest.approx(c / d, abs=1e-5)


def test_multi_turn_truncated_turn_is_reported_per_turn(chat_lm):
    long = dict(CONVERSATION)
    long["messages"] = [*CONVERSATION["messages"][:3], {"role": "assistant", "content": "warm " * 300}]
    table = score_answers(chat_lm, [long], template="chat", combine="last", max_length=128, progress=False)
    assert [t.reason for t in table.turns[0]] == [None, R_TRUNCATED]
    assert table.value == [None] and table.reason == [f"last turn: {R_TRUNCATED}"]
    first = score_answers(chat_lm, [long], template="chat", combine="first", max_length=128, progress=False)
    assert first.value[0] is not None


def test_chat_header_is_shared_exactly(chat_lm):
    # The chat template here has no system preamble: nothing long enough to share, and
    # the results must not depend on the switch either way.
    a = score_answers(chat_lm, [CONVERSATION], template="chat", share_prefix=True, progress=False)
    b = score_answers(chat_lm, [CONVERSATION], template="chat", share_prefix=False, progress=False)
    assert a.value[0] == pytest.approx(b.value[0], abs=1e-6)


# --------------------------------------------------------------------------- templates


def test_template_texts_are_the_references():
    alpaca = get_template("alpaca")
    assert alpaca.prompt("Do X.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nDo X.\n\n### Response:"
    )
    assert alpaca.prompt("Do X.", "data").endswith("### Instruction:\nDo X.\n\n### Input:\ndata\n\n### Response:")
    assert alpaca.direct_prefix == "### Response:"
    bare = get_template("bare")
    assert bare.prompt("Do X.") == "Do X.\n" and bare.prompt("Do X.", "data") == "Do X.\ndata\n"
    assert bare.direct_prefix == ""


# --------------------------------------------------------------------------- the real model (slow)


SMOL_ROWS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat a balanced diet, exercise regularly and sleep well."},
    {"instruction": "Translate to French.", "input": "Good morning.", "output": "Bonjour."},
    {"instruction": "Write a short poem about the sea.", "input": "", "output": "Waves roll in and out,\nsalt and foam and light."},
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
]


def test_smollm2_cherry_ifd_equals_plain_computation(smollm2):
    table = score_answers(smollm2, SMOL_ROWS, template="alpaca", max_length=512, progress=False)
    for i, row in enumerate(SMOL_ROWS):
        want = cherry_plain(smollm2, row, 512)
        assert want is not None
        assert table.value[i] == pytest.approx(want[0] / want[1], abs=1e-4)
    assert table.stats.shared_prefix_tokens_saved > 0
    # An instruction-tuned model finds the answers easier with their instruction.
    assert all(v < 1.0 for v in table.value)


def test_smollm2_chat_multi_turn(smollm2):
    table = score_answers(smollm2, [CONVERSATION], template="chat", progress=False)
    assert len(table.turns[0]) == 2 and all(t.value is not None for t in table.turns[0])
    # The default system prompt of SmolLM2's chat template is shared across rows.
    assert table.stats.shared_prefix_tokens_saved > 0


# --------------------------------------------------------------------------- batching


def test_out_of_memory_halves_the_budget_and_retries(tiny_lm, monkeypatch):
    from tamis.runtime import lm_scoring

    want = score_answers(tiny_lm, EXAMPLES, batch_tokens=4096, progress=False)
    real = lm_scoring._Engine._run_batch
    calls = {"n": 0}

    def flaky(self, plan, batch, header, prefix_kv):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("simulated")
        return real(self, plan, batch, header, prefix_kv)

    monkeypatch.setattr(lm_scoring._Engine, "_run_batch", flaky)
    got = score_answers(tiny_lm, EXAMPLES, batch_tokens=4096, progress=False)
    assert got.stats.oom_retries == 1
    assert got.value == pytest.approx(want.value, abs=1e-6)


def test_out_of_memory_on_a_single_sequence_is_a_model_error(tiny_lm, monkeypatch):
    from tamis.runtime import lm_scoring

    def always(self, plan, batch, header, prefix_kv):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(lm_scoring._Engine, "_run_batch", always)
    with pytest.raises(ModelError, match="out of memory"):
        score_answers(tiny_lm, EXAMPLES, batch_tokens=4096, progress=False)


def test_partition_keeps_batches_in_budget_and_follows_lengths():
    from tamis.runtime.lm_scoring import _partition

    lengths = sorted([500, 480, 470, 120, 118, 117, 116, 30, 29, 28, 27, 26, 5], reverse=True)
    sizes = _partition(lengths, budget=1024, overhead=32)
    assert sum(sizes) == len(lengths)
    at = 0
    for size in sizes:
        assert lengths[at] * size <= 1024 or size == 1
        at += size
    # The long ones do not share a batch with the short ones.
    assert sizes[0] <= 2 and lengths[sum(sizes[:2])] < 200
    assert _partition([], 100, 1) == []
    assert _partition([2000], 100, 1) == [1]  # a sequence over budget still runs, alone


def test_progress_bar_counts_rows(tiny_lm, capsys):
    score_answers(tiny_lm, EXAMPLES, progress=True)
    err = capsys.readouterr().err
    assert f"{len(EXAMPLES)}/{len(EXAMPLES)}" in err and "row" in err


def test_rows_are_planned_in_chunks_with_the_same_results(tiny_lm, monkeypatch):
    from tamis.runtime import lm_scoring

    want = score_answers(tiny_lm, EXAMPLES, progress=False)
    monkeypatch.setattr(lm_scoring, "_CHUNK_ROWS", 2)
    got = score_answers(tiny_lm, EXAMPLES, progress=False)
    assert got.reason == want.reason
    assert got.value == pytest.approx(want.value, abs=1e-6)

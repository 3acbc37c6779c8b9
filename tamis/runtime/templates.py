"""Prompt templates, as data, and how each reference forms its two IFD texts.

An IFD-style score needs two token sequences per answer: the *conditioned* text
(prompt followed by the answer) and the *direct* text (the answer with at most a short
marker before it). The references differ in both, and in how they truncate, so a
template here carries all of it:

``alpaca`` — Cherry LLM (tianyi-lab/Cherry_LLM, cherry_seletion/data_analysis.py and
data_by_IFD.py). Prompt: Stanford Alpaca's PROMPT_DICT (with / without input), the
answer appended directly after "### Response:". Direct text: ``"### Response:" + answer``,
scored from the first answer token. Truncation: the conditioned text at ``max_length``;
the direct text at ``max_length - prompt_len + 4``; a sample is skipped when the prompt
alone reaches ``max_length``, when no answer token is left in either text, or when
``prompt_len + direct answer tokens > max_length`` (the answer does not fit after the
prompt).

``bare`` — Superfiltering (tianyi-lab/Superfiltering, code_ifd/data_analysis.py). Prompt:
``"{instruction}\\n{input}\\n"`` or ``"{instruction}\\n"``. Direct text: the answer alone,
its loss taken over the whole text — so without a BOS token its first token is never
scored. Truncation: conditioned at ``max_length``, direct at ``max_length - prompt_len +
1``; only empty answers are skipped (the reference writes an empty record for them).

``chat`` — the tokenizer's own chat template; multi-turn conversations score each
assistant turn given the whole history before it. Direct text: the assistant header the
template adds for a generation prompt (e.g. ``"<|im_start|>assistant\\n"``, the analogue of
"### Response:") followed by the answer. Rules ``strict``: a turn whose answer would be cut
by ``max_length`` is skipped with a reason, never scored on a fragment.

``none`` — no template: the instruction (and the input after a newline) followed
directly by the answer; the direct text is the answer alone. Rules ``strict``.

``nuggets`` — Nuggets (pldlgb/nuggets, tasks/alpaca.py ``multiple_gen_promptify``,
tasks/loader.py). Prompt: ``"Instruction:\n{instruction}\nInput:\n{input}\nResponse:\n"``
(no input: without the Input part), fields stripped of surrounding whitespace, encoded
without special tokens. Truncation: the whole text at ``max_length``; a truncated answer
is scored on what is left, one with nothing left is skipped (the reference's sum over no
tokens, 0, never wins). No direct text.

In every case the conditioned text is ``prompt + answer`` and the answer's tokens are
those after ``len(encode(prompt))`` — how both references locate the answer
(``text.rfind(answer)`` then encoding the text before it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

from tamis.errors import ModelError

__all__ = [
    "ALPACA_PROMPT_INPUT",
    "ALPACA_PROMPT_NO_INPUT",
    "TEMPLATES",
    "Combine",
    "ScoringText",
    "Template",
    "answer_texts",
    "chat_assistant_header",
    "chat_static_header",
    "combine_values",
    "get_template",
    "render_chat",
    "row_text",
    "user_query",
]

Rules = Literal["cherry", "superfiltering", "strict", "nuggets"]
Combine = Literal["mean", "first", "last", "sum"]
COMBINES: tuple[str, ...] = ("mean", "first", "last", "sum")

# Stanford Alpaca's PROMPT_DICT as Cherry LLM uses it (cherry_seletion/data_analysis.py).
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
# Superfiltering's PROMPT_DICT_NONE (code_ifd/data_analysis.py).
BARE_PROMPT_INPUT = "{instruction}\n{input}\n"
BARE_PROMPT_NO_INPUT = "{instruction}\n"
NONE_PROMPT_INPUT = "{instruction}\n{input}"
NONE_PROMPT_NO_INPUT = "{instruction}"
# Nuggets' prompt ("sp" version, tasks/alpaca.py multiple_gen_promptify).
NUGGETS_PROMPT_INPUT = "Instruction:\n{instruction}\nInput:\n{input}\nResponse:\n"
NUGGETS_PROMPT_NO_INPUT = "Instruction:\n{instruction}\nResponse:\n"


@dataclass(frozen=True)
class Template:
    """How one reference turns a row into its conditioned and direct texts.

    `direct_prefix` precedes the answer in the direct text (``None`` for chat: the
    tokenizer's assistant header). `direct_slack` sets the direct text's token budget,
    ``max_length - prompt_len + direct_slack`` (``None``: plain ``max_length``).
    `add_special_tokens` is how texts are encoded (False for chat: the template already
    holds its special tokens).
    """

    name: str
    prompt_input: str | None
    prompt_no_input: str | None
    direct_prefix: str | None
    direct_slack: int | None
    rules: Rules
    add_special_tokens: bool = True
    reference: str = ""
    strip: bool = False  # fields stripped of surrounding whitespace first (Nuggets' dataset_preprocess)

    @property
    def is_chat(self) -> bool:
        return self.prompt_no_input is None

    def prompt(self, instruction: str, input: str = "") -> str:
        """The prompt for a single-turn row (not for chat: see `answer_texts`)."""
        if self.prompt_no_input is None or self.prompt_input is None:
            raise ModelError(f"template {self.name!r} renders through the tokenizer's chat template")
        fmt = self.prompt_input if input else self.prompt_no_input
        return fmt.format_map({"instruction": instruction, "input": input})

    def static_headers(self) -> list[str]:
        """Text every prompt of this template starts with (one per prompt form), if any.

        The scorer computes these once per batch and reuses their keys and values, after
        checking at the token level that each sequence really starts with them.
        """
        if self.is_chat:
            return []
        heads = {fmt.split("{instruction}", 1)[0] for fmt in (self.prompt_input, self.prompt_no_input) if fmt}
        return sorted(h for h in heads if h)


TEMPLATES: dict[str, Template] = {
    "alpaca": Template(
        "alpaca",
        ALPACA_PROMPT_INPUT,
        ALPACA_PROMPT_NO_INPUT,
        direct_prefix="### Response:",
        direct_slack=4,
        rules="cherry",
        reference="tianyi-lab/Cherry_LLM cherry_seletion/data_analysis.py, data_by_IFD.py",
    ),
    "bare": Template(
        "bare",
        BARE_PROMPT_INPUT,
        BARE_PROMPT_NO_INPUT,
        direct_prefix="",
        direct_slack=1,
        rules="superfiltering",
        reference="tianyi-lab/Superfiltering code_ifd/data_analysis.py",
    ),
    "chat": Template("chat", None, None, direct_prefix=None, direct_slack=None, rules="strict", add_special_tokens=False),
    "none": Template("none", NONE_PROMPT_INPUT, NONE_PROMPT_NO_INPUT, direct_prefix="", direct_slack=None, rules="strict"),
    "nuggets": Template(
        "nuggets",
        NUGGETS_PROMPT_INPUT,
        NUGGETS_PROMPT_NO_INPUT,
        direct_prefix="",
        direct_slack=None,
        rules="nuggets",
        add_special_tokens=False,
        reference="pldlgb/nuggets tasks/alpaca.py, tasks/loader.py",
        strip=True,
    ),
}


def get_template(name: str | Template) -> Template:
    if isinstance(name, Template):
        return name
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ModelError(f"unknown template {name!r}: use one of {', '.join(TEMPLATES)}") from None


@dataclass(frozen=True)
class ScoringText:
    """One answer to score: conditioned text = prompt + answer; direct text = direct_prefix + answer."""

    prompt: str
    answer: str
    direct_prefix: str
    turn: int  # index among the row's assistant turns (0 for single-turn rows)


def answer_texts(
    template: Template, row: Mapping[str, Any], tokenizer: Any = None, *, assistant_header: str | None = None
) -> list[ScoringText]:
    """The answers of one row, each with its prompt and direct prefix.

    Single-turn templates read ``instruction``/``input``/``output``. The chat template
    reads ``messages`` (list of {role, content}) when present — one ScoringText per
    assistant turn, given its history — else builds one user turn from instruction and
    input (joined by a blank line). `assistant_header`: `chat_assistant_header(tokenizer)`,
    when the caller has it already (it renders the template twice).
    """
    if not template.is_chat:
        instruction, extra, answer = (row_text(row, f) for f in ("instruction", "input", "output"))
        if template.strip:
            instruction, extra, answer = instruction.strip(), extra.strip(), answer.strip()
        prompt = template.prompt(instruction, extra)
        return [ScoringText(prompt, answer, template.direct_prefix or "", 0)]
    if tokenizer is None:
        raise ModelError("the chat template needs the model's tokenizer")
    messages = _messages(row)
    header = assistant_header if assistant_header is not None else chat_assistant_header(tokenizer)
    out: list[ScoringText] = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        out.append(ScoringText(prompt, msg["content"], header, len(out)))
    return out


def row_text(row: Mapping[str, Any], key: str) -> str:
    """A row's text field, "" when it is absent or null."""
    value = row.get(key)
    return "" if value is None else str(value)


def user_query(row: Mapping[str, Any]) -> str:
    """What the user asked: the instruction, and the input after a blank line when there is one."""
    instruction, extra = row_text(row, "instruction"), row_text(row, "input")
    return f"{instruction}\n\n{extra}" if extra else instruction


def _messages(row: Mapping[str, Any]) -> list[dict[str, str]]:
    msgs = row.get("messages")
    if msgs:
        return [{"role": str(m["role"]), "content": "" if m["content"] is None else str(m["content"])} for m in msgs]
    return [{"role": "user", "content": user_query(row)}, {"role": "assistant", "content": row_text(row, "output")}]


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool) -> str:
    """`messages` rendered as text by the tokenizer's own chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("template 'chat' needs a tokenizer with a chat template; this one has none (use 'alpaca' or 'bare')")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_assistant_header(tokenizer: Any) -> str:
    """What the chat template appends for a generation prompt, e.g. "<|im_start|>assistant\\n"."""
    probe = [{"role": "user", "content": "x"}]
    with_prompt = render_chat(tokenizer, probe, add_generation_prompt=True)
    without = render_chat(tokenizer, probe, add_generation_prompt=False)
    if not with_prompt.startswith(without) or with_prompt == without:
        raise ModelError("cannot find the assistant header in this chat template (generation prompt is not a suffix)")
    return with_prompt[len(without):]


def chat_static_header(tokenizer: Any) -> str:
    """What every chat prompt that opens with a user turn begins with (often a default
    system prompt): the rendering of a probe conversation up to the user's text."""
    probe = "\x00tamis-probe\x00"
    text = render_chat(tokenizer, [{"role": "user", "content": probe}], add_generation_prompt=True)
    return text.split(probe, 1)[0]


def combine_values(values: Sequence[float | None], how: Combine) -> float | None:
    """Combine per-turn values: "first"/"last" take that turn (None if it was not scored);
    "mean"/"sum" run over the scored turns (None if none was)."""
    if how not in COMBINES:
        raise ModelError(f"unknown combine {how!r}: use one of {', '.join(COMBINES)}")
    if not values:
        return None
    if how == "first":
        return values[0]
    if how == "last":
        return values[-1]
    scored = [v for v in values if v is not None]
    if not scored:
        return None
    total = float(sum(scored))
    return total / len(scored) if how == "mean" else total

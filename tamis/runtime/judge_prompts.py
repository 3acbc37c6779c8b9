"""Judge prompts: the messages a judge model gets for one row, and how its reply becomes a score.

Built-in: AlpaGasus' accuracy rating. Plug-ins add their own (`tamis.judge_prompt`); the
`rating` scorer's `prompt=` parameter names one. A judge stops at the end of its first line
(see `tamis.runtime.judge`), so a prompt asks for the score first and its parse rule reads
that line. Kept free of torch so that checking a recipe never loads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from tamis.runtime.templates import row_text

# Part of every cached rating's key: bump it when the decoding changes what a judge says.
JUDGE_DECODING = "greedy-first-line-v1"

# Reasons a row gets no rating (shared wording, so reports can count them).
R_NOT_A_NUMBER = "judge's first line is not a number"
R_NOT_FINITE = "judge's first line is not a finite number"
R_TOO_LONG = "prompt does not fit the judge's context"


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


@dataclass(frozen=True)
class JudgePrompt:
    """A judge's two messages for one row, as the reference builds them, and its parse rule."""

    name: str
    system: str
    row_template: str  # str.format_map over the row's instruction, input, output
    request: str  # appended after the row
    # the judge's first line -> (score, None) or (None, why there is none)
    parse: Callable[[str], tuple[float | None, str | None]] = field(default=parse_first_line_score, compare=False)
    version: str | None = None  # plug-ins: digest of the defining file (keys cached ratings)
    source: str = "tamis.runtime.judge_prompts"

    def messages(self, row: Mapping[str, Any]) -> list[dict[str, str]]:
        fields = {k: row_text(row, k) for k in ("instruction", "input", "output")}
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


# --------------------------------------------------------------------------- pairwise comparison
# The wins-rate papers (Cherry LLM, AlpaGasus, Superfiltering, …) judge two models' answers to one
# question with the Vicuna/Koala pairwise prompt (FastChat's first review prompt), asked in both
# orders; tianyi-lab/Cherry_LLM evaluation/generation/eval.py (`gen_prompt`, `parse_score`).

R_NOT_A_PAIR = "judge's first line is not two numbers"


def parse_score_pair(review: str) -> tuple[tuple[float, float] | None, str | None]:
    """((score of assistant 1, score of assistant 2), None) or (None, why): the first line with
    commas read as spaces, split on single spaces into exactly two numbers, as `parse_score` does
    (the reference then uses [-1, -1], a tie; the caller counts the verdict as a tie too)."""
    parts = review.split("\n")[0].replace(",", " ").split(" ")
    if len(parts) != 2:
        return None, R_NOT_A_PAIR
    try:
        pair = (float(parts[0]), float(parts[1]))
    except ValueError:
        return None, R_NOT_A_PAIR
    if not all(math.isfinite(v) for v in pair):
        return None, R_NOT_FINITE
    return pair, None


@dataclass(frozen=True)
class PairwisePrompt:
    """A judge's two messages comparing two answers to one question, and how its reply is read."""

    name: str
    system: str
    template: str  # str.format_map over question, answer_1, answer_2, criteria
    criteria: str
    parse: Callable[[str], tuple[tuple[float, float] | None, str | None]] = field(default=parse_score_pair,
                                                                                  compare=False)
    version: str = "1"  # part of every cached verdict's key

    def messages(self, question: str, answer_1: str, answer_2: str) -> list[dict[str, str]]:
        user = self.template.format_map({"question": question, "answer_1": answer_1, "answer_2": answer_2,
                                         "criteria": self.criteria})
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


VICUNA_PAIRWISE = PairwisePrompt(
    name="vicuna_pairwise",
    system="You are a helpful and precise assistant for checking the quality of the answer.",
    template=("[Question]\n{question}\n\n[The Start of Assistant 1's Answer]\n{answer_1}\n\n"
              "[The End of Assistant 1's Answer]\n\n[The Start of Assistant 2's Answer]\n{answer_2}\n\n"
              "[The End of Assistant 2's Answer]\n\n[System]\n{criteria}\n\n"),
    criteria=("We would like to request your feedback on the performance of two AI assistants in response to the "
              "user question displayed above.\nPlease rate the helpfulness, relevance, accuracy, level of details "
              "of their responses. Each assistant receives an overall score on a scale of 1 to 10, where a higher "
              "score indicates better overall performance.\nPlease first output a single line containing only two "
              "values indicating the scores for Assistant 1 and 2, respectively. The two scores are separated by a "
              "space. In the subsequent line, please provide a comprehensive explanation of your evaluation, "
              "avoiding any potential bias and ensuring that the order in which the responses were presented does "
              "not affect your judgment."),
)
PAIRWISE_PROMPTS: dict[str, PairwisePrompt] = {VICUNA_PAIRWISE.name: VICUNA_PAIRWISE}

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

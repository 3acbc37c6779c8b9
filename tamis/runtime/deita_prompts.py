"""DEITA's data-generation prompts, as data, and the parsing of the judge's rank-and-score replies.

Sources (prompt texts are data; quoted, not code):

* **In-depth evolving** (complexity): WizardLM's Evol-Instruct ``Evol_Instruct/depth.py`` (nlpxucan/WizardLM),
  which DEITA (Liu et al. 2024, arXiv 2312.15685, §2.3 and its appendix) uses to evolve each seed
  instruction: add constraints, deepen, concretise, increase reasoning steps. The source builds the text
  with Python line continuations that leak tab characters and ``\\r\\n`` line ends into the prompt; here the
  same words with plain newlines.
* **Response enhancement** (quality): DEITA's appendix prompt ("I want you to act as a Response Rewriter …")
  with its five methods (helpfulness, relevance, depth, creativity, details), as transcribed by
  argilla-io/distilabel ``steps/tasks/evol_quality/utils.py``.
* **Rank & score**: DEITA's appendix prompts that show ChatGPT all variants of one seed at once and ask for a
  score per variant, in the form distilabel's ``complexity-scorer.jinja2`` / ``quality-scorer.jinja2`` give
  them for n variants ("Score 1-n", n+1 reserved). With DEITA's five variants (a seed and four evolutions)
  the scores run 1-6: the six digits its scorers read.

Generation is greedy (the judge backend's decoding), so each evolution is deterministic and cacheable; the
reference samples ChatGPT at its defaults.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

__all__ = ["COMPLEXITY_METHODS", "MAX_VARIANTS", "PROMPTS_VERSION", "QUALITY_METHODS", "RankScores",
           "clean_rewrite", "enhance_response_prompt", "evolve_instruction_prompt", "method_for",
           "parse_rank_scores", "rank_complexity_prompt", "rank_quality_prompt", "rank_reply_scaffold"]

# --------------------------------------------------------------------------- in-depth evolving (complexity)

IN_DEPTH_BASE = (
    "I want you act as a Prompt Rewriter.\n"
    "Your objective is to rewrite a given prompt into a more complex version to make those famous AI systems "
    "(e.g., chatgpt and GPT4) a bit harder to handle.\n"
    "But the rewritten prompt must be reasonable and must be understood and responded by humans.\n"
    "Your rewriting cannot omit the non-text parts such as the table and code in #The Given Prompt#:. Also, "
    "please do not omit the input in #The Given Prompt#. \n"
    "You SHOULD complicate the given prompt using the following method: \n"
    "{method} \n"
    "You should try your best not to make the #Rewritten Prompt# become verbose, #Rewritten Prompt# can only "
    "add 10 to 20 words into #The Given Prompt#. \n"
    "'#The Given Prompt#', '#Rewritten Prompt#', 'given prompt' and 'rewritten prompt' are not allowed to "
    "appear in #Rewritten Prompt#\n"
)
COMPLEXITY_METHODS: dict[str, str] = {
    "constraints": "Please add one more constraints/requirements into #The Given Prompt#'",
    "deepen": "If #The Given Prompt# contains inquiries about certain issues, the depth and breadth of the inquiry "
              "can be increased.",
    "concretize": "Please replace general concepts with more specific concepts.",
    "reasoning": "If #The Given Prompt# can be solved with just a few simple thinking processes, you can rewrite it "
                 "to explicitly request multiple-step reasoning.",
}


def evolve_instruction_prompt(query: str, method: str) -> str:
    """depth.py's create*Prompt: the base instruction with one method, the given prompt, the answer slot."""
    return (IN_DEPTH_BASE.format(method=COMPLEXITY_METHODS[method])
            + f"#The Given Prompt#: \n {query} \n" + "#Rewritten Prompt#:\n")


# --------------------------------------------------------------------------- response enhancement (quality)

RESPONSE_REWRITE_BASE = (
    "I want you to act as a Response Rewriter.\n"
    "Your goal is to enhance the quality of the response given by an AI assistant to the #Given Prompt# through "
    "rewriting.\n"
    "But the rewritten prompt must be reasonable and must be understood and responded by humans.\n"
    "Your rewriting cannot omit the non-text parts such as the table and code in #Given Prompt# and #Given "
    "Response#. Also, please do not omit the input in #Given Prompt#.\n"
    "You Should enhance the quality of the response using the following method: \n{method}\n"
    "You should try your best not to make the #Rewritten Response# become verbose, #Rewritten Response# can only "
    "add 10 to 20 words into #Given Response#.\n"
    "'#Given Response#', '#Rewritten Response#', 'given response' and 'rewritten response' are not allowed to "
    "appear in #Rewritten Response#\n"
)
QUALITY_METHODS: dict[str, str] = {
    "helpfulness": "Please make the Response more helpful to the user.",
    "relevance": "Please make the Response more relevant to #Given Prompt#.",
    "depth": "Please make the Response more in-depth.",
    "creativity": "Please increase the creativity of the response.",
    "details": "Please increase the detail level of Response.",
}


def enhance_response_prompt(query: str, response: str, method: str) -> str:
    return (RESPONSE_REWRITE_BASE.format(method=QUALITY_METHODS[method])
            + f"#Given Prompt#:\n{query}\n#Given Response#:\n{response}\n#Rewritten Response#:\n")


def method_for(kind: str, seed_key: str, round_: int) -> str:
    """The evolution method of a seed's round: the methods in turn, from an offset drawn from the seed's
    content (WizardLM draws one at random per round; a content hash keeps the choice reproducible and
    independent of batching), so R rounds use min(R, #methods) different methods."""
    methods = list(COMPLEXITY_METHODS if kind == "complexity" else QUALITY_METHODS)
    offset = int.from_bytes(hashlib.blake2b(seed_key.encode("utf-8"), digest_size=4).digest(), "big")
    return methods[(offset + round_ - 1) % len(methods)]


# --------------------------------------------------------------------------- rank & score

# Scores above 6 cannot be a digit DEITA's scorers read ("1".."6"): n variants are scored 1..n+1, so n ≤ 5.
MAX_VARIANTS = 5


def rank_complexity_prompt(instructions: list[str]) -> str:
    n = len(instructions)
    head = (f"Ranking the following questions according to the difficulty and complexity. Score 1-{n}.\n"
            f"You can give a score of {n + 1} if the question is too complex for you to answer it. You should "
            "respond with the format:\n[1] Score: 1\n[2] Score: 2\n...\n")
    return head + "\n".join(f"[{i}] {text}" for i, text in enumerate(instructions, 1)) + "\n"


def rank_quality_prompt(query: str, responses: list[str]) -> str:
    n = len(responses)
    head = ("Rank the following pair of instructions and responses according to their quality. Your evaluation "
            "should consider factors such as helpfulness, relevance, accuracy, depth, creativity, and level of "
            f"detail of the response. Score 1-{n}.\n"
            f"Score each response from 1 to {n}, with {n + 1} reserved for responses that are already very well "
            "written and cannot be improved further. You should respond with the format:\n"
            "[1] Score: 1\n[2] Score: 2\n...\n")
    return (head + f"#Question#: {query}\n#Response List#:\n"
            + "\n".join(f"[{i}] {text}" for i, text in enumerate(responses, 1)) + "\n")


def rank_reply_scaffold(n: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The reply both rank prompts ask for, as fixed texts and slots: "[1] Score: ", "\\n[2] Score: ", …, each
    slot one of "1" … "n+1" (what `evolve(..., ranking="constrained")` holds a local judge to)."""
    texts = tuple(("" if k == 1 else "\n") + f"[{k}] Score: " for k in range(1, n + 1))
    return texts, tuple(str(s) for s in range(1, n + 2))


@dataclass(frozen=True)
class RankScores:
    """One score per variant shown (null exactly when its reason is set)."""

    scores: list[int | None]
    reasons: list[str | None]


# "[2] Score: 4", "[2]: 4", "[2] 4/6", "2. Score: 4", "Response 2: score 4", "Question 2 - Score = 4"
_SEP = r"[\s*:=\-]*"  # what may sit between the parts: spaces, markdown bold, ":", "=", "-"
_BRACKETED = re.compile(r"\[\s*(\d{1,2})\s*\]" + _SEP + r"(?:score|rating)?" + _SEP + r"(\d+(?:\.\d+)?)", re.IGNORECASE)
_NAMED = re.compile(r"(?:^|\n)[\s*#-]*(?:question|response|instruction|query|variant)?\s*#?(\d{1,2})\s*[.):\-]"
                    + _SEP + r"(?:score|rating)" + _SEP + r"(\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_rank_scores(text: str, n: int) -> RankScores:
    """The judge's score of each of `n` variants from its reply ("[k] Score: s" lines, as the prompt asks,
    or near variants of that form). A variant gets null with a reason when the reply gives it no score, a
    score outside 1..n+1, a fraction, or two different scores; never a default value. Never raises."""
    if not isinstance(text, str) or not text.strip():
        return RankScores([None] * n, ["empty reply"] * n)
    found: dict[int, set[str]] = {}
    for pattern in (_BRACKETED, _NAMED):
        for m in pattern.finditer(text):
            found.setdefault(int(m.group(1)), set()).add(m.group(2))
        if any(1 <= k <= n for k in found):
            break  # the first form that names a shown variant is the reply's form
    scores: list[int | None] = []
    reasons: list[str | None] = []
    for k in range(1, n + 1):
        said = found.get(k)
        value, reason = None, None
        if not said:
            reason = f"no score for variant [{k}] in the reply"
        elif len({float(s) for s in said}) > 1:
            reason = f"conflicting scores for variant [{k}]: {', '.join(sorted(said))}"
        else:
            v = float(next(iter(said)))
            if v != int(v):
                reason = f"score {next(iter(said))} for variant [{k}] is not a whole number"
            elif not 1 <= v <= n + 1:
                reason = f"score {int(v)} for variant [{k}] is outside 1-{n + 1}"
            else:
                value = int(v)
        scores.append(value)
        reasons.append(reason)
    return RankScores(scores, reasons)


# --------------------------------------------------------------------------- cleaning a rewrite

_LABEL = re.compile(r"^[\s*#]*rewritten\s+(?:prompt|response)[\s*#]*:?\s*",
                    re.IGNORECASE)
_MARKERS = ("#The Given Prompt#", "#Given Prompt#", "#Given Response#")


def clean_rewrite(reply: str, before: str) -> tuple[str | None, str | None]:
    """A rewrite as DEITA keeps it: stripped, a leading "#Rewritten Prompt#:" label removed (models often
    repeat the slot's name). (None, reason) when nothing usable is left: an empty reply, the text unchanged,
    or a reply that echoes the prompt's own markers (WizardLM's elimination rules)."""
    text = (reply or "").strip()
    text = _LABEL.sub("", text, count=1).strip()
    if not text:
        return None, "empty rewrite"
    if text == before.strip():
        return None, "rewrite is unchanged"
    if any(m in text for m in _MARKERS):
        return None, "rewrite copies the prompt's markers"
    return text, None


def _version() -> str:
    texts = [IN_DEPTH_BASE, COMPLEXITY_METHODS, RESPONSE_REWRITE_BASE, QUALITY_METHODS,
             rank_complexity_prompt(["a", "b"]), rank_quality_prompt("q", ["a", "b"])]
    return hashlib.blake2b(json.dumps(texts, sort_keys=True).encode("utf-8"), digest_size=8).hexdigest()


# keys every cached generation: editing a prompt's text regenerates
PROMPTS_VERSION = _version()

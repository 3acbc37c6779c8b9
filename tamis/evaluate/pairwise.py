"""Pairwise wins-ties-losses, as the wins-rate papers compute them.

Each question is judged twice, SEM's answer first and then second (tianyi-lab/Cherry_LLM
evaluation/generation/eval.py, `reverse` 0 and 1). Per order, the answer with the higher score
wins that order; a verdict whose first line is not two numbers is the reference's [-1, -1], a tie.
The two orders combine as `review_eval_score.py`'s `get_scores_all` tabulates them: win in both,
or win in one and tie in the other, is a win; win in one and lose in the other, or tie in both,
is a tie; the rest are losses. That is the sign of the sum of the two orders' signs, which is how
it is computed here. A judge that always prefers whichever answer comes first therefore makes every
question a tie. Wins-rate = (wins − losses) / n + 1 (`cal_rate`): 1.0 is parity, 2.0 all wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tamis.errors import TamisError
from tamis.runtime.judge_prompts import PairwisePrompt, VICUNA_PAIRWISE

WIN, TIE, LOSS = "win", "tie", "loss"


@dataclass(frozen=True)
class Verdict:
    """One order's verdict: what the judge wrote on its first line and the two scores read from it
    (None: not two numbers, or the prompt did not fit the judge, counted as a tie)."""

    line: str | None
    scores: tuple[float, float] | None
    reason: str | None = None


@dataclass(frozen=True)
class WinTieLoss:
    wins: int
    ties: int
    losses: int

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def wins_rate(self) -> float:
        """(wins − losses) / n + 1, as Cherry LLM's `cal_rate` computes it."""
        if self.n == 0:
            raise TamisError("no judged questions: a wins-rate needs at least one")
        return (self.wins - self.losses) / self.n + 1

    def __add__(self, other: "WinTieLoss") -> "WinTieLoss":
        return WinTieLoss(self.wins + other.wins, self.ties + other.ties, self.losses + other.losses)

    def to_json(self) -> dict:
        return {"wins": self.wins, "ties": self.ties, "losses": self.losses, "n": self.n,
                "wins_rate": self.wins_rate if self.n else None}


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def outcome(a_first: Verdict, a_second: Verdict) -> str:
    """A's outcome from the verdict with A as assistant 1 and the one with A as assistant 2."""
    first = _sign(a_first.scores[0] - a_first.scores[1]) if a_first.scores else 0
    second = _sign(a_second.scores[1] - a_second.scores[0]) if a_second.scores else 0
    total = first + second
    return WIN if total > 0 else LOSS if total < 0 else TIE


def tally(outcomes: Sequence[str]) -> WinTieLoss:
    return WinTieLoss(sum(o == WIN for o in outcomes), sum(o == TIE for o in outcomes),
                      sum(o == LOSS for o in outcomes))


def pair_conversations(questions: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str],
                       prompt: PairwisePrompt = VICUNA_PAIRWISE) -> list[list[dict[str, str]]]:
    """Both orders for every question: A first for all questions, then B first (the reference's two passes)."""
    if not len(questions) == len(answers_a) == len(answers_b):
        raise TamisError(f"pairwise judging needs one answer of each model per question: {len(questions)} "
                         f"questions, {len(answers_a)} and {len(answers_b)} answers")
    return ([prompt.messages(q, a, b) for q, a, b in zip(questions, answers_a, answers_b)]
            + [prompt.messages(q, b, a) for q, a, b in zip(questions, answers_a, answers_b)])


def read_verdicts(lines: Sequence[str | None], prompt: PairwisePrompt = VICUNA_PAIRWISE) -> list[Verdict]:
    """Judge replies (None: the prompt did not fit the judge) read with the prompt's parse rule."""
    from tamis.runtime.judge_prompts import R_TOO_LONG

    out = []
    for line in lines:
        if line is None:
            out.append(Verdict(None, None, R_TOO_LONG))
            continue
        scores, reason = prompt.parse(line)
        out.append(Verdict(line.split("\n")[0], scores, reason))
    return out


def combine(verdicts: Sequence[Verdict]) -> list[str]:
    """Outcomes of A from `pair_conversations`' order of verdicts (n with A first, then n with B first)."""
    n = len(verdicts) // 2
    if len(verdicts) != 2 * n:
        raise TamisError(f"expected two verdicts per question, got {len(verdicts)}")
    return [outcome(verdicts[i], verdicts[n + i]) for i in range(n)]


def judge_pair(judge, questions: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str],
               prompt: PairwisePrompt = VICUNA_PAIRWISE, progress: bool = False) -> tuple[list[str], list[Verdict]]:
    """A's outcome on every question against B, judged by `judge` (`tamis.evaluate.judges.Judge`) in both orders."""
    verdicts = read_verdicts(judge.first_lines(pair_conversations(questions, answers_a, answers_b, prompt), progress),
                             prompt)
    return combine(verdicts), verdicts

"""Held-out answer loss: the mean token cross-entropy of the reference answers given their prompts.

Scored by `tamis.runtime.lm_scoring.score_answers` (metric "loss", the training template, answer
tokens only) and averaged over answer *tokens* (each turn's mean loss weighted by its token count),
so long answers weigh as much as the tokens they hold. Every model sees the same rows and the same
tokenisation, so their rows scored and skipped are the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HeldOutLoss:
    loss: float  # token-weighted mean answer cross-entropy (nats)
    tokens: int
    rows_scored: int
    rows_skipped: dict[str, int]

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)

    def to_json(self) -> dict:
        return {"loss": self.loss, "ppl": self.ppl, "tokens": self.tokens, "rows_scored": self.rows_scored,
                "rows_skipped": self.rows_skipped}


def heldout_loss(lm: Any, rows: Any, *, template: str, max_length: int, batch_tokens: int | None = None,
                 progress: bool = True) -> HeldOutLoss:
    from tamis.errors import TamisError
    from tamis.runtime.lm_scoring import score_answers

    table = score_answers(lm, rows, metric="loss", template=template, max_length=max_length,
                          batch_tokens=batch_tokens, progress=progress)
    total, tokens, skipped = 0.0, 0, {}
    for turns, reason in zip(table.turns, table.reason):
        scored = [t for t in turns if t.cond_loss is not None and t.n_tokens > 0]
        if not scored:
            skipped[reason or "nothing to score"] = skipped.get(reason or "nothing to score", 0) + 1
        for t in scored:
            total += t.cond_loss * t.n_tokens
            tokens += t.n_tokens
    if tokens == 0:
        raise TamisError(f"no evaluation row has an answer to score within max_length {max_length} (skipped: {skipped})")
    return HeldOutLoss(total / tokens, tokens, len(table.turns) - sum(skipped.values()), skipped)

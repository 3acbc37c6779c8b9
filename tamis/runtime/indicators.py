"""Instruction-Mining indicators: the math behind `score knn` and `score reward`.

* `knn_mean_distance` — for each row, the mean Euclidean distance to its k nearest *other* rows
  (Instruction-Mining's KNN-6 is k=6 over SentenceBERT embeddings; tamis gives it the engine's
  L2-normalised embeddings, so distances lie in [0, 2]). Computed a (chunk × chunk) block at a time
  with a running `torch.topk`, never an N × N matrix.
* `RewardModel` — a sequence-classification reward model read from a local folder (the OpenAssistant
  DeBERTa reward models' form): `tokenizer(question, answer, truncation=True, max_length=512)`,
  the score is the single logit (`logits[0, 0]`); for a two-logit head, `logit[1] − logit[0]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tamis.errors import ModelError

# Part of `score reward`'s cache key: bump when the input format, truncation or head rule changes.
REWARD_VERSION = "1:pair(instruction[\\ninput], output):longest_first@512:logit0|logit1-logit0"
REWARD_MAX_LENGTH = 512
EMPTY_RESPONSE = "empty response"


# --------------------------------------------------------------------------- knn

def knn_mean_distance(emb: np.ndarray, k: int, chunk: int = 4096, device: Any = "cpu") -> np.ndarray:
    """Mean Euclidean distance from each row of `emb` (n × d) to its k nearest other rows (float64, n).

    The row itself is excluded; identical rows are other rows, at distance 0. With fewer than k + 1
    rows, the mean is over all the other rows; a lone row has no neighbour, so its value is NaN.
    Candidates are picked on squared distances from matrix products (‖a‖² + ‖b‖² − 2a·b) a
    (chunk × chunk) block at a time, keeping a running top-k per row; the k picked distances are then
    recomputed exactly as ‖a − b‖ (the expansion loses precision near 0: duplicates must give 0).
    """
    emb = np.asarray(emb)
    n = emb.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    if n == 1:
        return np.full(1, np.nan, dtype=np.float64)
    kk = min(int(k), n - 1)
    if kk < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    chunk = max(1, int(chunk))
    dev = torch.device(device)
    x = torch.tensor(np.asarray(emb, dtype=np.float32), device=dev)  # a copy: the input may be read-only
    sq = (x * x).sum(dim=1)
    out = np.empty(n, dtype=np.float64)
    with torch.inference_mode():
        for r0 in range(0, n, chunk):
            rows = x[r0:r0 + chunk]
            m = rows.shape[0]
            best_d = torch.full((m, kk), float("inf"), device=dev)
            best_i = torch.zeros((m, kk), dtype=torch.long, device=dev)
            row_ids = torch.arange(r0, r0 + m, device=dev)
            for c0 in range(0, n, chunk):
                cols = x[c0:c0 + chunk]
                d2 = sq[r0:r0 + m, None] + sq[None, c0:c0 + cols.shape[0]] - 2.0 * rows @ cols.T
                col_ids = torch.arange(c0, c0 + cols.shape[0], device=dev)
                d2 = d2.masked_fill(row_ids[:, None] == col_ids[None, :], float("inf"))  # not itself
                take = min(kk, cols.shape[0])
                bd, bi = torch.topk(d2, take, dim=1, largest=False)
                cand_d = torch.cat([best_d, bd], dim=1)
                cand_i = torch.cat([best_i, bi + c0], dim=1)
                best_d, pos = torch.topk(cand_d, kk, dim=1, largest=False)
                best_i = torch.gather(cand_i, 1, pos)
            exact = (rows[:, None, :] - x[best_i]).norm(dim=-1)  # m × kk, exact near 0
            out[r0:r0 + m] = exact.double().mean(dim=1).cpu().numpy()
    return out


# --------------------------------------------------------------------------- reward

_REWARD_MODELS: dict[tuple[str, str], "RewardModel"] = {}


@dataclass
class RewardModel:
    """A sequence-classification reward model and its tokenizer, from one local folder."""

    path: str
    device: torch.device
    model: Any
    tokenizer: Any

    @classmethod
    def from_path(cls, path: str, device: Any = "cpu") -> "RewardModel":
        """Loaded once per (folder, device) and kept for the process (a module-level cache)."""
        dev = torch.device(device)
        key = (str(Path(path).resolve()), str(dev))
        if key not in _REWARD_MODELS:
            from transformers import AutoModelForSequenceClassification

            from tamis.runtime.models import load_local_pretrained

            model, tok = load_local_pretrained(path, dev, AutoModelForSequenceClassification,
                                               "a sequence-classification reward model")
            labels = int(model.config.num_labels)
            if labels not in (1, 2):
                raise ModelError(f"{path}: a reward model has one output (or two: score = logit 1 − logit 0), "
                                 f"this one has {labels}")
            _REWARD_MODELS[key] = cls(path, dev, model, tok)
        return _REWARD_MODELS[key]

    def _head(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]

    def score(self, questions: list[str], answers: list[str], max_length: int = REWARD_MAX_LENGTH,
              batch_size: int = 16) -> np.ndarray:
        """One score per (question, answer) pair (float64). A pair longer than `max_length` tokens is
        truncated (longest first, as `tokenizer(q, a, truncation=True)` does). Batched in length order
        with padding and an attention mask; a tokenizer with no pad token scores one pair at a time."""
        tok = self.tokenizer
        enc = [tok(q, a, truncation=True, max_length=max_length) for q, a in zip(questions, answers)]
        out = np.empty(len(enc), dtype=np.float64)
        if tok.pad_token is None:
            batch_size = 1
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]["input_ids"]))
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                feats = [dict(enc[i]) for i in idx]
                if len(feats) == 1:
                    batch = {k: torch.tensor([v]) for k, v in feats[0].items()}
                else:
                    batch = tok.pad(feats, padding=True, return_tensors="pt")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                out[idx] = self._head(self.model(**batch).logits).double().cpu().numpy()
        return out


def reward_pairs(rows) -> tuple[list[str], list[str]]:
    """(question, answer) per row: "instruction[\\ninput]" (the input line only when there is one), "output"."""
    from tamis.runtime.embeddings import texts_for

    questions = [q or "" for q in texts_for(rows, "instruction")]
    answers = rows["output"].fill_null("").to_list()
    return questions, answers


def reward_scores(model: RewardModel, rows, max_length: int = REWARD_MAX_LENGTH,
                  batch_size: int = 16) -> tuple[list[float | None], list[str | None]]:
    """(value, reason) per row: the reward, or null with a reason when the row has no response."""
    questions, answers = reward_pairs(rows)
    ok = [i for i, a in enumerate(answers) if a.strip()]
    values: list[float | None] = [None] * len(answers)
    reasons: list[str | None] = [None if a.strip() else EMPTY_RESPONSE for a in answers]
    if ok:
        got = model.score([questions[i] for i in ok], [answers[i] for i in ok], max_length, batch_size)
        for i, v in zip(ok, got):
            values[i] = float(v)
    return values, reasons

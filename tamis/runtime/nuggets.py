"""Nuggets (pldlgb/nuggets): anchors and one-shot losses.

**Anchors** (`kmeans_sample.py`, `embedding_of_ins.py`): every row as Nuggets prompts it
("Instruction:\\n…\\nResponse:\\n" + answer), embedded by the PFM as the mean of its last
hidden state (≤512 tokens), KMeans(k, random_state=seed), and for each centroid the
nearest real row (squared distance). Duplicates stay, as in the reference.
One deviation: the reference pads every text to 512 tokens with a freshly added, randomly
initialised `[PAD]` embedding and averages over the padding too; here the mean runs over
the real tokens only (equal for a text that fills 512 tokens), so an embedding does not
depend on an untrained vector.

**One-shot losses** (`instruction_main.py`): for a candidate row, its Nuggets text
encoded *with* special tokens (`tokenize_demonstration`) is the one-shot prefix; each
anchor follows it, encoded without special tokens and truncated to `max_length`, and its
answer tokens are scored. The golden score compares these with the zero-shot losses of
the same anchor tokens (`score loss … with template="nuggets"`): `win_rate`.

Why it is fast, and still equal to scoring each (candidate, anchor) text on its own:

* the candidate's keys and values are computed once (base model only: no LM head over
  the prefix) and shared, as expanded views, by every anchor batch;
* anchors are tokenised and planned once per call, sorted by length and cut into
  batches under a token budget (no padding to 200 as the reference does);
* only the answer positions go through the LM head, with the cross-entropy taken in
  fp32 chunk by chunk (no full-vocabulary log-softmax over every position).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from tamis.errors import ModelError
from tamis.runtime.lm_scoring import answer_losses, hidden_after, prefix_kv
from tamis.runtime.models import LoadedLM
from tamis.runtime.templates import TEMPLATES, answer_texts

TEMPLATE = TEMPLATES["nuggets"]
EMBED_MAX_LENGTH = 512  # embedding_of_ins.py: truncation=True, max_length=512
R_PREFIX_TOO_LONG = "demonstration too long for the model's context"
# Attention scores of one anchor batch (batch × heads × anchor width × context × 4 bytes):
# a long demonstration shrinks the batch so this stays bounded.
_ATTN_BYTES = 512 << 20


def nuggets_texts(rows: Any) -> list[str]:
    """Each row as Nuggets writes it: prompt followed by the answer (fields stripped)."""
    from tamis.runtime.data import rows_of

    out = []
    for row in rows_of(rows, "nuggets_texts", ModelError):
        t = answer_texts(TEMPLATE, row)[0]
        out.append(t.prompt + t.answer)
    return out


# --------------------------------------------------------------------------- anchors


def anchor_indices(lm: LoadedLM, rows: Any, k: int, seed: int, *, batch_tokens: int | None = None,
                   progress: bool = True) -> list[int]:
    """Positions of the k anchor rows (kmeans_sample.py): nearest row to each KMeans centroid."""
    from sklearn.cluster import KMeans

    from tamis.runtime.warmup_sampling import instruction_embeddings_and_perplexity

    texts = nuggets_texts(rows)
    if k > len(texts):
        raise ModelError(f"anchors(k={k}) needs at least {k} rows; there are {len(texts)} (lower k)")
    emb, _ = instruction_embeddings_and_perplexity(lm, texts, add_special_tokens=True, max_length=EMBED_MAX_LENGTH,
                                                   batch_tokens=batch_tokens, progress=progress, perplexity=False,
                                                   desc="anchor embeddings")
    emb = emb.astype(np.float64)
    # n_init=10: sklearn's default when the reference was written (1.2/1.3); 'auto' came in 1.4
    centers = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(emb).cluster_centers_
    return [int(((emb - c) ** 2).sum(axis=1).argmin()) for c in centers]


# --------------------------------------------------------------------------- one-shot losses


@dataclass
class AnchorPlan:
    """The anchors' token sequences (distinct ones once) and, per anchor, the span scored."""

    seqs: list[list[int]]
    spans: list[tuple[int, int, int] | None]  # (sequence, first, end) per anchor; None: nothing to score


def plan_anchors(lm: LoadedLM, anchors: Any, max_length: int) -> AnchorPlan:
    """Token arithmetic shared with `score loss … with template="nuggets"` (the zero-shot side),
    so both score exactly the same anchor tokens."""
    from tamis.runtime.data import rows_of
    from tamis.runtime.lm_scoring import _plan

    rows = rows_of(anchors, "one_shot_losses", ModelError)
    plan = _plan(lm, rows, TEMPLATE, max_length, need_direct=False)
    spans: list[tuple[int, int, int] | None] = []
    for answers in plan.answers:
        a = answers[0]
        if a.reason is not None or a.cond is None:
            spans.append(None)
        else:
            sp = plan.spans[a.cond]
            spans.append((sp.seq, sp.first, sp.end))
    return AnchorPlan([s.ids for s in plan.sequences], spans)


def demonstration_ids(lm: LoadedLM, rows: Any) -> list[list[int]]:
    """Each candidate as a one-shot prefix: its Nuggets text with the tokenizer's special tokens, untruncated."""
    texts = nuggets_texts(rows)
    return list(lm.tokenizer(texts, add_special_tokens=True)["input_ids"]) if texts else []


class OneShotScorer:
    """One-shot mean answer losses of a fixed anchor set, for any number of candidates."""

    def __init__(self, lm: LoadedLM, anchors: Any, *, max_length: int = 200, batch_tokens: int | None = None) -> None:
        from tamis.runtime.lm_scoring import _HEAD_CHUNK, cache_keyword, split_model, supports_plain_cache

        if not supports_plain_cache(lm):
            raise ModelError(f"{lm.name}: one-shot scoring reuses a demonstration's keys and values, which this "
                             "model's cache (sliding-window layers) does not allow")
        self.lm = lm
        self.base, self.head, self.softcap = split_model(lm)
        self.cache_kw = cache_keyword(self.base)
        self.plan = plan_anchors(lm, anchors, max_length)
        self.budget = batch_tokens or (32768 if lm.device.type == "cuda" else 4096)
        self.head_chunk = 4096 if lm.device.type == "cuda" else _HEAD_CHUNK
        self.order = sorted(range(len(self.plan.seqs)), key=lambda i: -len(self.plan.seqs[i]))
        cfg = lm.model.config
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        self.heads = getattr(cfg, "num_attention_heads", 16)
        self.longest = max((len(s) for s in self.plan.seqs), default=0)
        # per distinct sequence, the spans (anchor index, first, end) scored on it
        self.by_seq: dict[int, list[tuple[int, int, int]]] = {}
        for a, sp in enumerate(self.plan.spans):
            if sp is not None:
                self.by_seq.setdefault(sp[0], []).append((a, sp[1], sp[2]))

    @property
    def n_anchors(self) -> int:
        return len(self.plan.spans)

    def losses(self, prefix: Sequence[int]) -> np.ndarray | None:
        """Mean loss of each anchor's answer after `prefix` (NaN: nothing to score); None when
        the prefix and the longest anchor do not fit the model's context."""
        out = np.full(self.n_anchors, np.nan)
        if not self.by_seq:
            return out
        p = len(prefix)
        if self.max_positions and p + self.longest > self.max_positions:
            return None
        with torch.inference_mode():
            kv = prefix_kv(self.base, self.cache_kw, prefix, self.lm.device)
            todo = [i for i in self.order if i in self.by_seq]
            done = 0
            while done < len(todo):
                width = len(self.plan.seqs[todo[done]])
                by_tokens = max(1, self.budget // width)
                by_attention = max(1, _ATTN_BYTES // (self.heads * width * (p + width) * 4))
                batch = todo[done : done + min(by_tokens, by_attention)]
                self._run(batch, kv, out)
                done += len(batch)
        return out

    def _run(self, batch: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]], out: np.ndarray) -> None:
        seqs = [self.plan.seqs[i] for i in batch]
        n, width = len(seqs), max(len(s) for s in seqs)
        dev = self.lm.device
        ids = torch.zeros((n, width), dtype=torch.long)  # right padding: no real token attends to it
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s)
        hidden = hidden_after(self.base, self.cache_kw, ids.to(dev), kv)
        rows: list[int] = []
        targets: list[int] = []
        owner: list[int] = []
        anchors: list[tuple[int, int]] = []  # (anchor, tokens) per span
        for b, i in enumerate(batch):
            for a, first, end in self.by_seq[i]:
                rows.extend(range(b * width + first - 1, b * width + end - 1))  # t is predicted at t-1
                targets.extend(self.plan.seqs[i][first:end])
                owner.extend([len(anchors)] * (end - first))
                anchors.append((a, end - first))
        r, t, o = (torch.tensor(x, dtype=torch.long, device=dev) for x in (rows, targets, owner))
        totals = answer_losses(hidden, self.head, self.softcap, r, t, o, len(anchors), self.head_chunk)
        for (a, n_tok), total in zip(anchors, totals.tolist()):
            out[a] = total / n_tok


def one_shot_losses(lm: LoadedLM, candidates: Any, anchors: Any, *, max_length: int = 200,
                    batch_tokens: int | None = None, progress: bool = False,
                    scorer: OneShotScorer | None = None) -> tuple[list[np.ndarray | None], list[str | None]]:
    """Per candidate: the anchors' one-shot mean losses (None with a reason when it cannot be scored)."""
    from tqdm.auto import tqdm

    scorer = scorer or OneShotScorer(lm, anchors, max_length=max_length, batch_tokens=batch_tokens)
    values: list[np.ndarray | None] = []
    reasons: list[str | None] = []
    for prefix in tqdm(demonstration_ids(lm, candidates), unit="row", desc="one-shot", disable=not progress):
        v = scorer.losses(prefix)
        values.append(v)
        reasons.append(None if v is not None else R_PREFIX_TOO_LONG)
    return values, reasons

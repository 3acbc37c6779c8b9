"""Which rows a warmup model is trained on.

* `random_subset` — LESS (princeton-nlp/LESS, less/data_selection/get_training_dataset.py,
  ``load_raw_dataset``): ``np.random.seed(seed); np.random.permutation(n)[:int(n * p)]``,
  and the whole pool unshuffled when the sample is the whole pool. The same legacy
  Mersenne-Twister stream is used here, so the same pool order and seed give LESS's rows.
* `cherry_subset` — Cherry LLM's pre-experienced samples (tianyi-lab/Cherry_LLM,
  ``cherry_seletion/data_analysis.py --mod pre`` then ``data_by_cluster.py``):

  1. the *instruction* text is the template's prompt without the answer (for ``alpaca``
     the full Alpaca prompt ending in "### Response:");
  2. its embedding is the mean of the last hidden state over all its tokens, and its
     perplexity ``exp`` of the mean next-token loss over the whole text (the HF
     ``labels=input_ids`` loss), truncated at 512 tokens;
  3. ``KMeans(n_clusters, random_state=0)`` on the embeddings;
  4. in each cluster: fewer than ``per_cluster`` rows → all of them; otherwise the rows
     whose perplexity lies within the cluster's [25th, 75th] percentiles (numpy's linear
     interpolation, bounds inclusive), then — if at least ``per_cluster`` remain — every
     ``len(band) // per_cluster``-th of them **in pool order** (not perplexity order:
     the reference steps through the band's indices as they come), the first
     ``per_cluster`` taken.

  Batched here (length-sorted, right padding, one forward pass gives both the embedding
  and the loss) where the reference runs one row at a time.

  Two places where the reference is silent or breaks, and the rule taken here:

  * **Small pools.** KMeans cannot make more clusters than rows. A pool with at most
    ``n_clusters`` rows is returned whole (every row would be its own cluster, and a
    cluster smaller than ``per_cluster`` is returned whole by the reference's own rule);
    no model pass is made. The result's ``rule`` says so.
  * **Empty clusters / undefined perplexity.** Clusters are the labels KMeans actually
    used (the reference assumes 0..k-1 all occur). A text of a single token has no
    next-token loss: its perplexity is NaN, it can still be clustered, and it is never
    inside a band (the reference would get NaN thresholds for the whole cluster; here
    the band is computed over the defined values).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tamis.errors import ModelError, TamisError
from tamis.runtime.data import rows_of
from tamis.runtime.models import LoadedLM
from tamis.runtime.templates import Template, answer_texts, get_template

__all__ = [
    "CherrySubset",
    "SamplingError",
    "band_and_spread",
    "cherry_measure",
    "cherry_pick",
    "cherry_subset",
    "instruction_embeddings_and_perplexity",
    "random_subset",
    "subset_size",
]

# Rows of hidden states sent through the LM head at once (bounds the fp32 logits buffer).
_HEAD_CHUNK = 1024


class SamplingError(TamisError):
    """The warmup sample cannot be drawn as asked (bad size, empty pool)."""


# --------------------------------------------------------------------------- random (LESS)


def subset_size(n: int, fraction_or_count: float | int) -> int:
    """Rows a warmup sample takes from a pool of `n`.

    A float in (0, 1] is a fraction: ``int(n * f)`` as LESS floors it, but at least one row
    of a non-empty pool (5 % of 10 rows trains on 1 row, not on nothing). An int is a
    count and must not exceed the pool.
    """
    if isinstance(fraction_or_count, bool) or not isinstance(fraction_or_count, numbers.Real):
        raise SamplingError(f"warmup sample size must be a fraction or a count, got {fraction_or_count!r}")
    if n <= 0:
        raise SamplingError("cannot sample a warmup set from an empty pool")
    if isinstance(fraction_or_count, numbers.Integral):
        count = int(fraction_or_count)
        if not 1 <= count <= n:
            raise SamplingError(f"warmup sample of {count} rows asked from a pool of {n}")
        return count
    frac = float(fraction_or_count)
    if not 0 < frac <= 1:
        raise SamplingError(f"warmup fraction must be in (0, 1], got {frac}")
    return max(1, int(n * frac))


def random_subset(ids: Sequence[Any], fraction_or_count: float | int, seed: int = 42) -> list[Any]:
    """LESS's random warmup sample: the first k of a seeded permutation, in that order.

    Reproducible: numpy's legacy ``RandomState(seed).permutation`` is the stream LESS
    draws from with ``np.random.seed(seed)``. The whole pool comes back in pool order.
    """
    pool = list(ids)
    k = subset_size(len(pool), fraction_or_count)
    if k == len(pool):
        return pool  # LESS: "if sample_size == len(dataset): return dataset  # not shuffle"
    order = np.random.RandomState(seed).permutation(len(pool))[:k]
    return [pool[i] for i in order]


# --------------------------------------------------------------------------- Cherry LLM


@dataclass(frozen=True)
class CherrySubset:
    """The pre-experienced sample and what it was drawn from.

    `indices` are row positions in the input, grouped by cluster (cluster order, then
    pool order), as the reference writes them. `labels`/`perplexity` cover every row
    (empty arrays when the small-pool rule skipped the model pass).
    """

    indices: list[int]
    ids: list[Any] | None  # the rows' `id` values, when the rows have one
    labels: np.ndarray
    perplexity: np.ndarray
    n_clusters: int  # clusters actually used
    rule: str  # "clustered" or "small pool: all rows"


def cherry_subset(
    lm: LoadedLM,
    examples: Any,
    n_clusters: int = 100,
    per_cluster: int = 10,
    seed: int = 0,
    *,
    template: str | Template = "alpaca",
    max_length: int = 512,
    low_percentile: float = 25,
    high_percentile: float = 75,
    batch_tokens: int | None = None,
    n_init: int = 10,
    progress: bool = True,
) -> CherrySubset:
    """Cherry LLM's pre-experienced sample of `examples` (a Polars frame or row mappings).

    `seed` is KMeans' ``random_state`` (the reference's 0). `n_init=10` restarts, the
    scikit-learn default when the reference was written (newer versions default to 1).
    """
    if n_clusters < 1 or per_cluster < 1:
        raise SamplingError(f"n_clusters and per_cluster must be at least 1, got {n_clusters} and {per_cluster}")
    if not 0 <= low_percentile <= high_percentile <= 100:
        raise SamplingError(f"percentile band must satisfy 0 <= low <= high <= 100, got {low_percentile}, {high_percentile}")
    rows = _rows(examples)
    if not rows:
        raise SamplingError("cannot sample a warmup set from an empty pool")
    ids = [r["id"] for r in rows] if all("id" in r for r in rows) else None
    if len(rows) <= n_clusters:
        every = list(range(len(rows)))
        return CherrySubset(every, ids, np.array([], dtype=np.int64), np.array([]), len(rows), "small pool: all rows")
    emb, ppl = cherry_measure(lm, rows, template=template, max_length=max_length, batch_tokens=batch_tokens,
                              progress=progress)
    chosen, labels, used = cherry_pick(emb, ppl, n_clusters, per_cluster, seed, n_init, low_percentile, high_percentile)
    return CherrySubset(
        indices=chosen,
        ids=[ids[i] for i in chosen] if ids is not None else None,
        labels=labels,
        perplexity=ppl,
        n_clusters=used,
        rule="clustered",
    )


def cherry_measure(lm: LoadedLM, rows: Sequence[Mapping[str, Any]], *, template: str | Template = "alpaca",
                   max_length: int = 512, batch_tokens: int | None = None, progress: bool = True,
                   positions: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-2 of the module note for some rows (each row on its own, so any split of the pool gives the
    same values): each instruction's embedding and perplexity. `positions`: the rows' places in the pool,
    for errors (default 0, 1, …)."""
    tmpl = get_template(template)
    where = list(positions) if positions is not None else range(len(rows))
    texts = [_instruction_text(tmpl, row, lm.tokenizer, i) for i, row in zip(where, rows)]
    return instruction_embeddings_and_perplexity(lm, texts, add_special_tokens=tmpl.add_special_tokens,
                                                 max_length=max_length, batch_tokens=batch_tokens, progress=progress)


def cherry_pick(emb: np.ndarray, ppl: np.ndarray, n_clusters: int, per_cluster: int, seed: int = 0,
                n_init: int = 10, low: float = 25, high: float = 75) -> tuple[list[int], np.ndarray, int]:
    """Steps 3-4 of the module note on every row's embedding and perplexity (in pool order): (the picked
    positions, grouped by cluster; each row's cluster label; the clusters used)."""
    labels = _kmeans(emb, n_clusters, seed, n_init)
    picked = band_and_spread(labels, ppl, per_cluster, low, high)
    return [i for members in picked.values() for i in members], labels, len(picked)


def band_and_spread(
    labels: np.ndarray, values: np.ndarray, per_cluster: int, low: float = 25, high: float = 75
) -> dict[int, list[int]]:
    """Per cluster label (ascending): the reference's middle-band, evenly-stepped picks.

    See the module note, step 4. NaN values are never in a band; the percentiles are
    taken over the cluster's defined values.
    """
    out: dict[int, list[int]] = {}
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)  # pool order
        if len(members) < per_cluster:
            out[int(c)] = members.tolist()
            continue
        vals = values[members]
        defined = vals[~np.isnan(vals)]
        if len(defined) == 0:
            out[int(c)] = []
            continue
        lo, hi = np.percentile(defined, low), np.percentile(defined, high)
        band = members[(vals >= lo) & (vals <= hi)]  # NaN compares False: never in the band
        if len(band) < per_cluster:
            out[int(c)] = band.tolist()
        else:
            step = len(band) // per_cluster
            out[int(c)] = band[::step][:per_cluster].tolist()
    return out



def _rows(examples: Any) -> list[Mapping[str, Any]]:
    return rows_of(examples, "cherry_subset", SamplingError)


def _instruction_text(tmpl: Template, row: Mapping[str, Any], tokenizer: Any, index: int) -> str:
    """The prompt of the row's first answer: the reference's ``instruct_i`` (alpaca mode)."""
    texts = answer_texts(tmpl, row, tokenizer)
    if not texts:
        raise SamplingError(f"row {index} has no assistant turn, so no instruction prompt to embed")
    return texts[0].prompt


def _kmeans(emb: np.ndarray, n_clusters: int, seed: int, n_init: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=n_clusters, random_state=seed, n_init=n_init).fit(emb).labels_


# --------------------------------------------------------------------------- the model pass


def instruction_embeddings_and_perplexity(
    lm: LoadedLM,
    texts: Sequence[str],
    *,
    add_special_tokens: bool = True,
    max_length: int = 512,
    batch_tokens: int | None = None,
    progress: bool = True,
    perplexity: bool = True,
    desc: str = "pre-experience",
) -> tuple[np.ndarray, np.ndarray]:
    """(mean last-hidden-state embedding [n, d] float32, whole-text perplexity [n]; NaN
    when `perplexity=False`, which skips the LM head altogether).

    Each text is encoded like ``tokenizer.encode(text, truncation=True, max_length=m)``
    and scored on its own: the embedding averages the final hidden states of its real
    tokens (padding masked out), the perplexity is ``exp(mean CE)`` of every token
    predicted from the one before (NaN for a one-token text).
    """
    from tamis.runtime.lm_scoring import AnswerEncoder, split_model

    base, head, softcap = split_model(lm)
    enc = AnswerEncoder(lm.tokenizer, add_special_tokens)
    seqs = [enc.truncated(c, max_length) for c in enc.encode_many(list(texts))]
    if any(len(s) == 0 for s in seqs):
        raise ModelError("an instruction encodes to no tokens at all; cannot embed it")
    budget = batch_tokens or (32768 if lm.device.type == "cuda" else 4096)
    dim = lm.model.config.hidden_size if hasattr(lm.model.config, "hidden_size") else None
    emb: list[np.ndarray | None] = [None] * len(seqs)
    mean_loss = np.full(len(seqs), np.nan)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    bar = _progress_bar(len(seqs), progress, desc)
    with torch.inference_mode():
        start = 0
        while start < len(order):
            fit = max(1, budget // len(seqs[order[start]]))
            batch = order[start : start + fit]
            e, losses = _embed_batch(lm, base, head if perplexity else None, softcap, [seqs[i] for i in batch])
            for j, i in enumerate(batch):
                emb[i] = e[j]
                mean_loss[i] = losses[j]
            start += len(batch)
            bar.update(len(batch))
    bar.close()
    matrix = np.stack([x for x in emb if x is not None]).astype(np.float32)
    if dim is not None and matrix.shape[1] != dim:
        raise ModelError(f"embedding width {matrix.shape[1]} differs from the model's hidden size {dim}")
    return matrix, np.exp(mean_loss)


def _embed_batch(
    lm: LoadedLM, base: Any, head: Any, softcap: float | None, batch: list[list[int]]
) -> tuple[np.ndarray, list[float]]:
    """One right-padded batch: mean-pooled final states, and each text's mean next-token loss."""
    width = max(len(s) for s in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.bool)
    for b, s in enumerate(batch):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = True
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    # Causal model + right padding: real tokens never see the padding, no attention mask needed.
    hidden = base(input_ids=ids, use_cache=False).last_hidden_state
    pooled = (hidden.float() * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    losses = _mean_next_token_losses(hidden, head, softcap, batch) if head is not None else [float("nan")] * len(batch)
    return pooled.cpu().numpy(), losses


def _mean_next_token_losses(hidden: torch.Tensor, head: Any, softcap: float | None, batch: list[list[int]]) -> list[float]:
    width = hidden.shape[1]
    rows: list[int] = []
    targets: list[int] = []
    owner: list[int] = []
    for b, s in enumerate(batch):
        rows.extend(range(b * width, b * width + len(s) - 1))  # position t predicts t+1
        targets.extend(s[1:])
        owner.extend([b] * (len(s) - 1))
    dev = hidden.device
    flat = hidden.reshape(-1, hidden.shape[-1])
    totals = torch.zeros(len(batch), dtype=torch.float64, device=dev)
    r, t, o = (torch.tensor(x, dtype=torch.long, device=dev) for x in (rows, targets, owner))
    for start in range(0, r.numel(), _HEAD_CHUNK):
        sl = slice(start, start + _HEAD_CHUNK)
        logits = head(flat.index_select(0, r[sl])).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        totals.index_add_(0, o[sl], F.cross_entropy(logits, t[sl], reduction="none").double())
    return [float(totals[b]) / (len(s) - 1) if len(s) > 1 else float("nan") for b, s in enumerate(batch)]


def _progress_bar(total: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="row", desc=desc, disable=not enabled)

"""LESS (princeton-nlp/LESS): per-sample LoRA gradient features at each warmup checkpoint.

`score grads using W` reads the warmup `W`'s checkpoints (every epoch's LoRA adapter and, for
training rows, its Adam moments) and gives each row one vector: for each checkpoint c, the
row's L2-normalised projected feature scaled by √w_c, concatenated. So the plain dot product of
a training vector and a target vector is Σ_c w_c ⟨train_c, target_c⟩ — matching.py's
checkpoint-weighted sum — and `influence(train, target)` only averages it over the target's rows.
The recipe states how checkpoints are summed (`checkpoints=`, `weights=`); the heavy part is
`tamis.runtime.less`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import polars as pl

from tamis.errors import TamisError
from tamis.ops.kernel import ExecOptions, Resources, kernel

_KEY = ("dim", "seed", "precondition", "checkpoints", "weights", "max_length")


def _checkpoints(model, checkpoints: str, weights: str) -> tuple[list, list[float]]:
    """The checkpoint folders summed and their weights (renormalised to 1, as matching.py does)."""
    ck = getattr(model, "checkpoints", None)
    if ck is None or not ck.folders:
        raise TamisError("score grads needs a warmup(...) model: LESS reads the gradients of its checkpoints")
    if not ck.lora:
        raise TamisError("score grads: LESS's features are gradients of LoRA weights; warm up with lora(...)")
    folders, lrs = list(ck.folders), list(ck.mean_lrs)
    if checkpoints == "last":
        folders, lrs = folders[-1:], lrs[-1:]
    raw = [1.0] * len(folders) if weights == "uniform" else lrs
    total = sum(raw)
    if total <= 0:  # e.g. one epoch whose only step ran at learning rate 0 (the schedule's warmup step)
        raise TamisError(f"score grads: every summed checkpoint's mean learning rate is 0 ({len(folders)} "
                         "checkpoint(s)), so weights=\"lr\" gives them all weight 0; train the warmup for more "
                         "steps, or write weights=\"uniform\"")
    return folders, [w / total for w in raw]


def _schema_for(model, params: Mapping[str, Any]) -> dict[str, pl.DataType]:
    folders, _ = _checkpoints(model, params["checkpoints"], params["weights"])
    return {"value": pl.Array(pl.Float32, params["dim"] * len(folders)), "reason": pl.String}


@kernel("scorer", "grads", cached=True, key_params=_KEY, key_extra={"features": "less-v1"},
        schema={"value": pl.List(pl.Float32), "reason": pl.String}, schema_for=_schema_for,
        names={"value": "", "reason": "_reason"}, resources=Resources(device="any", memory_per_row=64 << 20))
def grads(rows: pl.DataFrame, model, dim: int, seed: int, precondition: str, checkpoints: str, weights: str,
          max_length: int, options: ExecOptions) -> dict:
    import numpy as np

    from tamis.runtime.less import gradient_features

    folders, w = _checkpoints(model, checkpoints, weights)
    blocks, reasons = [], [None] * rows.height
    for folder, weight in zip(folders, w):
        got = gradient_features(model.checkpoints.base, folder, rows, dim=dim, seed=seed, precondition=precondition,
                                batch_tokens=options.batch_tokens, max_length=max_length, progress=False)
        blocks.append(got.features * math.sqrt(weight))
        reasons = [r or g for r, g in zip(reasons, got.reasons)]
    vectors = np.concatenate(blocks, axis=1).astype(np.float32)
    value = pl.Series("value", vectors, dtype=pl.Array(pl.Float32, vectors.shape[1]))
    missing = pl.Series([r is not None for r in reasons])
    if missing.any():
        value = pl.select(pl.when(missing).then(None).otherwise(value)).to_series()
    return {"value": value, "reason": reasons}

"""Fitted selectors: from each probe subset's indicators to its probe's loss, then a prediction per row.

* `linear` — Instruction-Mining's rule (arXiv 2307.06290 v3): least squares with an intercept from
  each subset's mean indicator values to the log of its probe's evaluation loss
  (log L = β₀ + Σ βᵢ·mean(featureᵢ)). A row's prediction is the rule applied to its own values (a
  subset of one row), given back as a loss (exp of the log) so lower is better either way.
* `selfattn` — InstructionGPT-4's selector (waltonfuture/InstructionGPT-4, `selector/model/models.py`,
  `train.py`): a subset is the set of its rows' feature vectors; `layers` rounds of
  x ← x + MultiheadAttention(x, x, x), then x ← Linear(x) when there is more than one layer; a final
  Linear gives each row a score, and the subset's prediction is their mean, fitted to the probe losses
  with MSE and Adam (full batch, `epochs`, `lr`, seed). A row's prediction is the network on its own
  row (the reference repeats the row 114 times; attention over identical rows gives the same value).
  Differences, on purpose: attention runs over a subset's rows (the reference passes batch-first
  tensors to a sequence-first attention, so it attends across subsets); features and labels are
  standardised (the reference multiplies reward and length by 10 by hand); the final weights are kept
  (the reference's best-epoch check compares a loss it has just reset to 0, so it keeps the last too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from tamis.errors import TamisError


def member_features(members: pl.DataFrame, features: pl.DataFrame) -> pl.DataFrame:
    """Each (subset, id) membership with that row's features (a row's id looked up once, however often
    it appears in the features)."""
    return members.join(features.unique("id", keep="first"), on="id", how="left")


def subset_means(members: pl.DataFrame, features: pl.DataFrame, names: list[str]) -> np.ndarray:
    """Each subset's mean of each feature over its rows (nulls left out): an n × f matrix, rows in subset order."""
    means = member_features(members, features).group_by("subset").agg([pl.col(c).cast(pl.Float64).mean() for c in names]).sort("subset")
    empty = [c for c in names if means[c].null_count()]
    if empty:
        raise TamisError(f"feature(s) {', '.join(map(repr, empty))} have no value on some probe's rows: the fit needs "
                         "a mean per subset")
    return means.select(names).to_numpy()


@dataclass
class LinearRule:
    features: list[str]
    intercept: float
    coefficients: list[float]
    log_loss: bool
    r2: float
    fingerprint: str
    name: str = "fit(linear)"
    info: dict[str, Any] = field(default_factory=dict)

    def predict(self, rows: pl.DataFrame) -> pl.Series:
        expr = pl.lit(self.intercept)
        for name, beta in zip(self.features, self.coefficients):
            expr = expr + pl.col(name).cast(pl.Float64) * beta
        if self.log_loss:
            expr = expr.exp()
        return rows.select(expr.alias("value"))["value"]


def fit_linear(x: np.ndarray, losses: np.ndarray, features: list[str], log_loss: bool) -> LinearRule:
    """Least squares with an intercept (numpy's lstsq): coefficients, R² on the probes, and a note when
    there are too few probes for the rule to mean anything."""
    if np.any(losses <= 0) and log_loss:
        raise TamisError("fit(\"linear\"): a probe loss is not positive, so its log is undefined (log_loss=false)")
    y = np.log(losses) if log_loss else losses
    design = np.column_stack([np.ones(len(y)), x])
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    fitted = design @ beta
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - fitted) ** 2)) / total if total > 0 else float("nan")
    info = {"kind": "linear", "target": "log(loss)" if log_loss else "loss", "probes": len(y),
            "intercept": float(beta[0]), "coefficients": dict(zip(features, map(float, beta[1:]))),
            "r2": None if math.isnan(r2) else round(r2, 6)}
    if len(y) <= x.shape[1] + 1:
        info["note"] = (f"{len(y)} probes for {x.shape[1] + 1} unknowns: the rule interpolates the probes "
                        "(R² is 1 by construction); train more probes")
    return LinearRule(features, float(beta[0]), [float(b) for b in beta[1:]], log_loss, r2, "", info=info)


@dataclass
class SelfAttnSelector:
    features: list[str]
    net: Any  # torch module
    mean: np.ndarray  # feature standardisation
    std: np.ndarray
    label_mean: float
    label_std: float
    fingerprint: str
    name: str = "fit(selfattn)"
    info: dict[str, Any] = field(default_factory=dict)

    def predict(self, rows: pl.DataFrame, batch: int = 65536) -> pl.Series:
        import torch

        x = rows.select([pl.col(c).cast(pl.Float64) for c in self.features]).to_numpy()
        out = np.full(len(x), np.nan)
        ok = ~np.isnan(x).any(axis=1)
        z = ((x[ok] - self.mean) / self.std).astype(np.float32)
        got = []
        with torch.no_grad():
            for s in range(0, len(z), batch):
                t = torch.from_numpy(z[s:s + batch]).unsqueeze(1)  # each row a set of one
                got.append(self.net(t).squeeze(-1).squeeze(-1).numpy())
        if got:
            out[ok] = np.concatenate(got) * self.label_std + self.label_mean
        return pl.Series("value", out, dtype=pl.Float64).fill_nan(None)


def _selector_net(d: int, heads: int, layers: int):
    import torch
    from torch import nn

    class Selector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attns = nn.ModuleList([nn.MultiheadAttention(d, heads, batch_first=True) for _ in range(layers)])
            self.linears = nn.ModuleList([nn.Linear(d, d) for _ in range(layers)])
            self.head = nn.Linear(d, 1)

        def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
            for attn, linear in zip(self.attns, self.linears):
                x = x + attn(x, x, x, key_padding_mask=pad, need_weights=False)[0]
                if len(self.attns) > 1:
                    x = linear(x)
            return self.head(x)  # (subsets, rows, 1): each row's score

    return Selector()


def fit_selfattn(sets: list[np.ndarray], losses: np.ndarray, features: list[str], *, layers: int, heads: int,
                 epochs: int, lr: float, seed: int) -> SelfAttnSelector:
    """Train the selector on the probe subsets (each an r × f array of its rows' features)."""
    import torch

    d = len(features)
    if heads < 1 or d % heads:
        raise TamisError(f"fit(\"selfattn\"): heads={heads} must divide the number of features ({d})")
    every = np.concatenate(sets)
    empty = [f for f, seen in zip(features, (~np.isnan(every)).any(axis=0)) if not seen]
    if empty:  # a network fitted on a column with no values would predict nothing but nulls
        raise TamisError(f"feature(s) {', '.join(map(repr, empty))} have no value on any probe's rows: the stage that "
                         "produces them gave every row a null (see its reason column)")
    mean, std = np.nanmean(every, axis=0), np.nanstd(every, axis=0)
    std[~(std > 0)] = 1.0
    label_mean, label_std = float(losses.mean()), float(losses.std()) or 1.0
    width = max(len(s) for s in sets)
    x = np.zeros((len(sets), width, d), dtype=np.float32)
    pad = np.ones((len(sets), width), dtype=bool)
    for i, s in enumerate(sets):
        x[i, :len(s)] = np.nan_to_num((s - mean) / std)  # a missing value sits at the mean
        pad[i, :len(s)] = False
    y = torch.tensor((losses - label_mean) / label_std, dtype=torch.float32)
    xt, padt, real = torch.from_numpy(x), torch.from_numpy(pad), torch.from_numpy(~pad).float()
    gen_state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    torch.manual_seed(int(seed))
    torch.set_num_threads(1)  # a network this small only loses to thread hand-offs (30x slower on a busy 2-core VM)
    try:
        net = _selector_net(d, heads, layers)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        history = []
        for _ in range(int(epochs)):
            opt.zero_grad()
            scores = net(xt, padt).squeeze(-1)
            pred = (scores * real).sum(1) / real.sum(1)  # each subset's mean over its real rows
            loss = torch.nn.functional.mse_loss(pred, y)
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
        net.eval()
        with torch.no_grad():
            scores = net(xt, padt).squeeze(-1)
            pred = ((scores * real).sum(1) / real.sum(1)).numpy() * label_std + label_mean
    finally:
        torch.random.set_rng_state(gen_state)
        torch.set_num_threads(threads)
    total = float(np.sum((losses - losses.mean()) ** 2))
    r2 = 1.0 - float(np.sum((losses - pred) ** 2)) / total if total > 0 else float("nan")
    info = {"kind": "selfattn", "target": "loss", "probes": len(sets), "layers": layers, "heads": heads,
            "epochs": epochs, "lr": lr, "train_mse": [round(h, 6) for h in history[-3:]],
            "r2": None if math.isnan(r2) else round(r2, 6)}
    return SelfAttnSelector(features, net, mean, std, label_mean, label_std, "", info=info)

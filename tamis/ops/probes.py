"""Probe experiments and fitted selectors (Instruction-Mining, InstructionGPT-4) as kernels.

  subsets(D, n, size, seed, holdout)   data: the subsets' rows stacked, with a `subset` column
  train(M, on=subsets(…))              model: n probes, each labelled by its evaluation loss (a ProbeSet)
  fit(kind, on=D, labels=probes, …)    model: a selector fitted from the subsets' mean features to the losses
  score predict using F                scorer: the selector's prediction per row

Math: `tamis.runtime.probes` and `tamis.runtime.fit`.
"""

from __future__ import annotations

from typing import Mapping

import polars as pl

from tamis.errors import TamisError
from tamis.ops.kernel import Built, BuildEnv, Resources, kernel


@kernel("data", "subsets")
def subsets(params: Mapping, env: BuildEnv) -> pl.DataFrame:
    from tamis.runtime.probes import draw_subsets

    rows = env.inputs[0].get() if env.inputs else env.pool
    return draw_subsets(rows, int(params["n"]), params.get("size"), int(params["seed"]), params.get("holdout"))


def train_probes(params: Mapping, env: BuildEnv) -> Built:
    """`train(M, on=subsets(…))`: one probe per subset, trained and evaluated one after another."""
    from tamis.ops.models import describe_model
    from tamis.runtime.probes import evaluation_rows, run_probes

    from tamis.dsl.registry import MODEL_CTORS

    params = dict(params)
    if not params.get("lora"):  # probes are LoRA fine-tunes unless the recipe says otherwise (lora=…)
        params["lora"] = {p.name: p.default for p in MODEL_CTORS["lora"].params}
    sets = env.inputs[0].get()
    given = env.evaluation[0] if env.evaluation else None
    evaluation, where = evaluation_rows(sets, given.get() if given else None)
    base = env.bases[0].get()
    probes = run_probes(base, sets, evaluation, params, env.artifacts, env.options, label=env.label,
                        evaluation_label=given.label if given else where, map_probes=env.map_probes)
    info = {**describe_model(env.label, base), "fingerprint": probes.fingerprint, "probes": len(probes.probes)}
    return Built(probes, info, probes.info)


@kernel("model", "fit", resources=Resources(device="cpu"))
def fit(params: Mapping, env: BuildEnv) -> Built:
    """Fit a selector from each probe subset's mean features to its probe's loss. The features are the
    recipe's own columns (a field of the rows, or what a `score` stage produces), computed on the probes'
    rows through the score cache."""
    import numpy as np

    from tamis.runtime.cache import fingerprint
    from tamis.runtime.fit import fit_linear, fit_selfattn, member_features, subset_means
    from tamis.runtime.probes import SUBSET, ProbeSet

    probes = env.labels[0].get() if env.labels else None
    if not isinstance(probes, ProbeSet):
        raise TamisError(f"{env.label}: labels=… must be probe models, trained with train(M, on=subsets(…))")
    names = [str(f) for f in params["features"]]
    if not names:
        raise TamisError(f"{env.label}: features=[…] names no feature")
    rows = env.inputs[0].get()
    members = probes.members()
    used = rows.filter(pl.col("id").is_in(members["id"].unique().implode()))
    unknown = members.filter(~pl.col("id").is_in(used["id"].implode()))["id"].unique()
    if unknown.len():
        raise TamisError(f"{env.label}: the probes were trained on {unknown.len()} row(s) that the dataset `on` names "
                         f"does not have (e.g. id {unknown[0]!r}): fit on the dataset the subsets were drawn from")
    features = env.columns(used, names)
    losses = np.array(probes.losses, dtype=np.float64)
    if params["kind"] == "linear":
        model = fit_linear(subset_means(members, features, names), losses, names, bool(params["log_loss"]))
    else:
        joined = member_features(members, features)
        sets = [joined.filter(pl.col(SUBSET) == p.subset).select(names).cast(pl.Float64).to_numpy()
                for p in probes.probes]
        model = fit_selfattn(sets, losses, names, layers=int(params["layers"]), heads=int(params["heads"]),
                             epochs=int(params["epochs"]), lr=float(params["lr"]), seed=int(params["seed"]))
    model.fingerprint = fingerprint({"op": "fit", "probes": probes.fingerprint, "features": names,
                                     "params": {k: v for k, v in params.items() if k != "features"},
                                     "values": features.hash_rows().sum()})
    model.info["features_on_rows"] = used.height
    info = {"label": env.label, "name": model.name, "fingerprint": model.fingerprint, "device": "cpu",
            "dtype": "float64" if params["kind"] == "linear" else "float32"}
    return Built(model, info, model.info)


@kernel("scorer", "predict", schema={"value": pl.Float64}, names={"value": ""})
def predict(rows: pl.DataFrame, model) -> dict:
    """{"value": the fitted selector's prediction for each row} (null where a feature is null)."""
    return {"value": model.predict(rows)}

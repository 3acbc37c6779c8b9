"""`warmup(M, size, …)`: draw the warmup sample, train (LoRA or full), cache the result as an artifact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from tamis.errors import ModelError


def _sample_ids(base, pool: pl.DataFrame, params: dict, progress: bool) -> list[str]:
    from tamis.runtime.warmup_sampling import cherry_subset, random_subset

    size = params["size"]
    n = max(1, round(size["fraction"] * pool.height)) if "fraction" in size else min(size["count"], pool.height)
    if params["select"] == "random":
        return list(random_subset(pool["id"].to_list(), n, seed=params["seed"]))
    clusters = max(1, min(params["clusters"], n))  # a pool smaller than the cluster count: one pick per cluster
    per_cluster = max(1, n // clusters)
    picked = cherry_subset(base, pool, n_clusters=clusters, per_cluster=per_cluster, seed=0)
    return [pool["id"][i] for i in picked] if picked and isinstance(picked[0], int) else list(picked)


def warm_up(base, pool: pl.DataFrame, params: dict, artifacts, cfg, *, label: str) -> tuple[Any, dict]:
    """Train (or reuse from the artifact cache) the warmed-up model; return it loaded and a training summary."""
    from tamis.runtime.cache import data_fingerprint, fingerprint
    from tamis.runtime.models import load_causal_lm
    from tamis.runtime.training import TrainConfig, train_warmup

    ids = _sample_ids(base, pool, params, cfg.progress)
    sample = pool.filter(pl.col("id").is_in(ids))
    lora = params.get("lora")
    config = TrainConfig(
        method="lora" if lora else "full",
        epochs=params["epochs"], lr=params["lr"], batch_size=params["batch"], max_length=params["max_length"],
        seed=params["seed"],
        **({"lora_r": lora["r"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"]} if lora else {}),
        **({"lora_targets": lora["targets"]} if lora and lora.get("targets") else {}),
    )
    key = fingerprint({"op": "warmup", "base": base.fingerprint, "sample": data_fingerprint(sample),
                       "config": {k: v for k, v in vars(config).items()}})
    summary: dict = {"label": label, "rows": sample.height, "select": params["select"], "method": config.method,
                     "cached": artifacts.exists(key)}
    if not artifacts.exists(key):
        with artifacts.building(key) as out_dir:
            result = train_warmup(base, sample, config, Path(out_dir) / "model", progress=cfg.progress)
            (Path(out_dir) / "summary.json").write_text(json.dumps(_plain(result), default=str))
    path = artifacts.path_for(key)
    summary.update(json.loads((path / "summary.json").read_text()))
    model_dir = path / "model"
    adapter = _find_adapter(model_dir)
    if adapter is not None:
        lm = load_causal_lm(base_source(base), device=cfg.device, dtype=cfg.dtype, adapter=adapter)
    else:
        lm = load_causal_lm(str(model_dir), device=cfg.device, dtype=cfg.dtype)
    return lm, summary


def base_source(base) -> str:
    if getattr(base, "source_path", None):
        return base.source_path
    return base.name


def _find_adapter(model_dir: Path) -> Path | None:
    hits = sorted(model_dir.rglob("adapter_config.json"))
    final = [h for h in hits if "final" in h.parts] or hits
    return final[-1].parent if final else None


def _plain(obj):
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _plain(getattr(obj, k)) for k in obj.__dataclass_fields__}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj

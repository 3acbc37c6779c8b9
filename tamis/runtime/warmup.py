"""`warmup(M, size, …)`: draw the warmup sample, train (LoRA or full), cache the result as an artifact."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import polars as pl



def sample_ids(base, pool: pl.DataFrame, params: dict, progress: bool) -> list[str]:
    from tamis.runtime.warmup_sampling import cherry_subset, random_subset

    n, clusters, per_cluster = sample_shape(pool.height, params)
    if params["select"] == "random":
        return list(random_subset(pool["id"].to_list(), n, seed=params["seed"]))
    picked = cherry_subset(base, pool, n_clusters=clusters, per_cluster=per_cluster, seed=CHERRY_KMEANS_SEED,
                           max_length=params["max_length"], progress=progress)
    return [pool["id"][i] for i in picked.indices]


CHERRY_KMEANS_SEED = 0  # the reference's KMeans random_state


def sample_shape(pool_rows: int, params: dict) -> tuple[int, int, int]:
    """(rows the warmup sample takes, Cherry's clusters, rows per cluster) for a pool of `pool_rows`."""
    from tamis.runtime.warmup_sampling import subset_size

    size = params["size"]
    n = subset_size(pool_rows, size["fraction"] if "fraction" in size else size["count"])
    clusters = max(1, min(params["clusters"], n))  # fewer rows wanted than clusters: one pick per cluster
    return n, clusters, max(1, n // clusters)


def warm_up(base, pool: pl.DataFrame, params: dict, artifacts, cfg, *, label: str,
            draw_sample: Callable[[], pl.DataFrame] | None = None, pool_key: str | None = None) -> tuple[Any, dict]:
    """Train (or reuse from the artifact cache) the warmed-up model; return it loaded and a training summary.

    `cfg` needs progress, device and dtype; `draw_sample` gives the rows to train on (by
    default, `sample_ids` of the pool), called only when the model is not cached yet; `pool_key` is
    the pool's `data_fingerprint` when the caller has it (an engine that does not hold the pool)."""
    from tamis.runtime.cache import data_fingerprint, fingerprint

    config = train_config(params)
    # The sample is a deterministic function of the pool, the base model and the parameters,
    # so the key needs no sampling pass: a cached warmup costs nothing on a re-run.
    key = fingerprint({"op": "warmup", "base": base.fingerprint, "pool": pool_key or data_fingerprint(pool),
                       "sampling": {k: params[k] for k in ("size", "select", "clusters", "seed")},
                       "config": config.to_json()})

    def rows() -> pl.DataFrame:
        return draw_sample() if draw_sample else pool.filter(pl.col("id").is_in(sample_ids(base, pool, params, cfg.progress)))

    return trained_model(base, key, config, rows, artifacts, cfg, {"label": label, "select": params["select"]})


def train_on(base, rows: pl.DataFrame, params: dict, artifacts, cfg, *, label: str) -> tuple[Any, dict]:
    """`train(M, on=D)`: fine-tune `base` on the rows of a dataset (a loaded file, or a selection of
    the pool); cached as an artifact keyed by the rows' content, so a re-run trains nothing."""
    config = train_config(params)
    key = train_key(base, rows, config)
    return trained_model(base, key, config, lambda: rows, artifacts, cfg, {"label": label, "rows_given": rows.height})


def train_key(base, rows: pl.DataFrame, config) -> str:
    """The artifact key of `base` fine-tuned on `rows` under `config` (what `train_on` caches under)."""
    from tamis.runtime.cache import data_fingerprint, fingerprint

    return fingerprint({"op": "train", "base": base.fingerprint, "data": data_fingerprint(rows), "config": config.to_json()})


def train_config(params: dict):
    from tamis.runtime.training import TrainConfig

    lora = params.get("lora")
    return TrainConfig(
        method="lora" if lora else "full",
        epochs=int(params["epochs"]), learning_rate=params["lr"], batch_size=params["batch"],
        max_length=params["max_length"], seed=params["seed"],
        # the optimizer's moments are about 3x the model: kept only when a later stage needs them (LESS)
        save_optimizer_state=bool(params.get("optimizer_state", False)),
        **({"lora_r": lora["r"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"]} if lora else {}),
        **({"target_modules": tuple(lora["targets"])} if lora and lora.get("targets") else {}),
    )


def trained_model(base, key: str, config, rows: Callable[[], pl.DataFrame], artifacts, cfg,
                  summary: dict) -> tuple[Any, dict]:
    """Train `base` on `rows()` under artifact `key` (unless it is cached), then load the result."""
    from tamis.runtime.training import train_warmup

    def train(out: Path):
        sample = rows()
        return train_warmup(base, sample, config, out, progress=cfg.progress), sample["id"].to_list()

    return trained_with(base, key, config, train, artifacts, cfg, summary)


def trained_with(base, key: str, config, train: Callable[[Path], tuple[Any, list]], artifacts, cfg,
                 summary: dict) -> tuple[Any, dict]:
    """`trained_model` for any training function: `train(out_dir)` -> (TrainResult, the trained rows' ids),
    called only when artifact `key` is not cached; then the result is loaded."""
    from tamis.runtime.models import load_causal_lm

    summary = {**summary, "method": config.method, "cached": artifacts.exists(key)}
    if not artifacts.exists(key):
        with artifacts.building(key) as out_dir:
            result, ids = train(Path(out_dir) / "model")
            (Path(out_dir) / "summary.json").write_text(json.dumps(
                {"rows": result.n_rows, "trained_rows": result.n_trained_rows, "steps": result.steps,
                 "sample_ids": ids, "epoch_losses": [e.loss for e in result.epochs],
                 "tokens_per_second": result.tokens_per_second, "seconds": result.seconds, "skipped": result.skipped,
                 # where the final weights lie, relative to the artifact (it is renamed into place)
                 "final": str(Path(result.final_path).relative_to(Path(result.out_dir).parent))}))
    path = artifacts.path_for(key)
    summary.update(json.loads((path / "summary.json").read_text()))
    if summary.get("steps", 0) <= 1 and config.warmup_ratio > 0:  # say it: the model is (nearly) its base
        summary["note"] = (f"{summary.get('label', 'training')}: {summary.get('steps', 0)} optimizer step(s) on "
                           f"{summary.get('trained_rows', '?')} row(s); the linear warmup gives the first step learning "
                           "rate 0, so the model barely moved from its base: use a smaller batch or more epochs")
    final = path / summary["final"]
    if (final / "adapter_config.json").is_file():
        lm = load_causal_lm(base.name, device=cfg.device, dtype=cfg.dtype, adapter=final,
                            cache_root=getattr(cfg, "cache_dir", None))
    else:
        lm = load_causal_lm(str(final), device=cfg.device, dtype=cfg.dtype)
    lm.checkpoints = Checkpoints.of(base, final.parent, key, config)
    return lm, summary


@dataclass(frozen=True)
class Checkpoints:
    """A warmup's epochs, as LESS reads them: each epoch's folder (adapter, Adam moments when kept)
    and its mean learning rate, with the base model the adapters apply to."""

    base: Any  # LoadedLM
    folders: tuple[Path, ...]
    mean_lrs: tuple[float, ...]
    key: str  # the warmup's artifact key
    config: dict

    @classmethod
    def of(cls, base, model_dir: Path, key: str, config) -> "Checkpoints":
        from tamis.runtime.training import STATE_FILE

        folders = sorted((p for p in model_dir.glob("epoch-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
        lrs = tuple(float(json.loads((p / STATE_FILE).read_text())["mean_lr"]) for p in folders)
        return cls(base, tuple(folders), lrs, key, config.to_json())

    @property
    def lora(self) -> bool:
        return bool(self.folders) and (self.folders[-1] / "adapter_config.json").is_file()

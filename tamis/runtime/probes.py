"""Probe experiments (Instruction-Mining, InstructionGPT-4): n models fine-tuned on n random subsets
of a dataset, each labelled by its answer loss on an evaluation set.

* `draw_subsets` — the rows set aside for evaluation (`holdout`) first, then n subsets of the rest,
  each drawn without replacement (subsets may share rows, as independent draws do); one seeded numpy
  RandomState, so the same seed gives the same subsets on any machine.
* `run_probes` — trains the probes (LoRA by default, through the same training code and artifact
  cache as `train(M, on=D)`) and evaluates each: one probe is `probe_one`, a plain function; the
  engine runs the missing ones (`ProbeMap`: one after another locally, as Ray tasks under Ray). A probe's model and its loss are
  artifacts: a killed run keeps its finished probes, and a re-run trains and evaluates nothing it has.
  The label is the mean over evaluation rows of each row's mean answer-token loss, in the training
  template (a row with no scorable answer is left out and counted).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import polars as pl

from tamis.errors import TamisError

SUBSET = "subset"  # the column of `subsets(…)` rows: which subset a row belongs to (-1: held out)
_EVAL_VERSION = "probe-eval-v1"


def draw_subsets(rows: pl.DataFrame, n: int, size: dict | None, seed: int, holdout: dict | None) -> pl.DataFrame:
    """`subsets(D, n, size, seed, holdout)`: the subsets' rows stacked, with a `subset` column (0…n-1),
    then the held-out rows (subset -1). `size`/`holdout`: {"count": k} or {"fraction": f} of D's rows;
    no size: the rest is split into n disjoint parts of equal size."""
    from tamis.runtime.warmup_sampling import subset_size

    if SUBSET in rows.columns:
        raise TamisError(f"subsets(…): the dataset already has a field {SUBSET!r}, the name subsets give their column")
    if n < 1:
        raise TamisError(f"subsets(…): n must be at least 1, got {n}")
    rs = np.random.RandomState(int(seed))
    order = rs.permutation(rows.height)
    held = 0
    if holdout is not None:
        held = _rows_of(holdout, rows.height, "holdout")
        if held >= rows.height:
            raise TamisError(f"subsets(…): holdout={_text(holdout)} leaves no rows of {rows.height} to draw subsets from")
    rest = order[held:]
    if size is None:
        each = len(rest) // n
        if each == 0:
            raise TamisError(f"subsets(…): {len(rest)} row(s) cannot make {n} disjoint subsets; give size=…")
        picks = [rest[i * each:(i + 1) * each] for i in range(n)]
    else:
        each = _rows_of(size, rows.height, "size") if "count" in size else subset_size(rows.height, size["fraction"])
        if each > len(rest):
            raise TamisError(f"subsets(…): size={_text(size)} is more than the {len(rest)} row(s) left to draw from")
        picks = [rest[np.sort(rs.choice(len(rest), each, replace=False))] for _ in range(n)]
    parts = [rows[idx].with_columns(pl.lit(i, pl.Int32).alias(SUBSET)) for i, idx in enumerate(picks)]
    if held:
        parts.append(rows[order[:held]].with_columns(pl.lit(-1, pl.Int32).alias(SUBSET)))
    return pl.concat(parts, how="vertical")


def _rows_of(size: dict, n: int, what: str) -> int:
    from tamis.runtime.warmup_sampling import subset_size

    if "fraction" in size:
        return subset_size(n, size["fraction"])
    count = int(size["count"])
    if count < 1:
        raise TamisError(f"subsets(…): {what} must be at least 1 row, got {count}")
    return count


def _text(size: dict) -> str:
    return f"{size['fraction'] * 100:g}%" if "fraction" in size else str(size["count"])


@dataclass
class Probe:
    subset: int
    ids: list[str]  # the rows it was trained on
    loss: float  # its label: mean answer loss on the evaluation set
    eval_rows: int  # evaluation rows with a scorable answer
    train_seconds: float | None
    cached: bool


@dataclass
class ProbeSet:
    """What `train(M, on=subsets(…))` gives: the probes, each with its rows and its loss."""

    name: str
    probes: list[Probe]
    fingerprint: str
    evaluation: str  # which set labelled them
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def losses(self) -> list[float]:
        return [p.loss for p in self.probes]

    def members(self) -> pl.DataFrame:
        """subset, id: which rows each probe was trained on (one row per membership)."""
        return pl.DataFrame({SUBSET: [p.subset for p in self.probes for _ in p.ids],
                             "id": [i for p in self.probes for i in p.ids]},
                            schema={SUBSET: pl.Int32, "id": pl.String})


def evaluation_rows(sets: pl.DataFrame, given: pl.DataFrame | None) -> tuple[pl.DataFrame, str]:
    """The probes' evaluation set: `evaluate_on=` when given, else the subsets' held-out rows."""
    if given is not None:
        return given, "evaluate_on"
    held = sets.filter(pl.col(SUBSET) == -1).drop(SUBSET)
    if held.height == 0:
        raise TamisError("the probes need an evaluation set: subsets(…, holdout=P) or train(…, evaluate_on=DATA)")
    return held, "held-out rows"


@dataclass(frozen=True)
class ProbeJob:
    """One probe to train and evaluate: plain values, so an engine can ship it to a worker."""

    subset: int
    rows: pl.DataFrame  # the rows it is trained on
    key: str  # the artifact key of its evaluation (probe.json)
    label: str


@dataclass(frozen=True)
class ProbeTask:
    """What every probe of a set shares, all but the base model (an engine binds that where it runs)."""

    evaluation: pl.DataFrame
    params: dict
    options: Any


# An engine's way of running probes: (jobs, task) -> (job, probe.json's dict) for each job, in any order.
# The local engine runs them one after another in this process (`run_locally`); the Ray engine as tasks.
ProbeMap = Callable[[list[ProbeJob], ProbeTask], Iterator[tuple[ProbeJob, dict]]]


def probe_one(base: Any, job: ProbeJob, task: ProbeTask, artifacts: Any) -> dict:
    """Train and evaluate one probe unless its artifact exists, writing it atomically (so a kill keeps
    every finished probe, and builders of different probes never meet); what its probe.json holds."""
    from tamis.runtime.warmup import train_config, train_on

    if not artifacts.exists(job.key):
        config = train_config(task.params)
        t0 = time.perf_counter()
        lm, summary = train_on(base, job.rows, task.params, artifacts, task.options, label=job.label)
        loss, scored = evaluation_loss(lm, task.evaluation, config.template, config.max_length, task.options)
        del lm
        with artifacts.building(job.key) as out:
            (out / "probe.json").write_text(json.dumps({
                "loss": loss, "eval_rows": scored, "ids": job.rows["id"].to_list(),
                "train_seconds": summary.get("seconds"), "seconds": time.perf_counter() - t0}))
    return json.loads((artifacts.path_for(job.key) / "probe.json").read_text())


def run_locally(base: Any, artifacts: Any) -> ProbeMap:
    """The local engine's ProbeMap: each probe in turn, in this process."""
    def run(jobs: list[ProbeJob], task: ProbeTask) -> Iterator[tuple[ProbeJob, dict]]:
        for job in jobs:
            yield job, probe_one(base, job, task, artifacts)
    return run


def run_probes(base: Any, sets: pl.DataFrame, evaluation: pl.DataFrame, params: dict, artifacts: Any, options: Any,
               *, label: str, evaluation_label: str, map_probes: ProbeMap | None = None) -> ProbeSet:
    """Train one probe per subset of `sets` and label each with its loss on `evaluation`; the probes the
    artifact cache lacks go through `map_probes` (default: one after another, here)."""
    from tqdm.auto import tqdm

    from tamis.runtime.cache import data_fingerprint, fingerprint
    from tamis.runtime.warmup import train_config, train_key

    config = train_config(params)
    eval_fp = data_fingerprint(evaluation)
    ids = sorted(sets.filter(pl.col(SUBSET) >= 0)[SUBSET].unique().to_list())
    jobs: list[ProbeJob] = []
    for i in ids:
        rows = sets.filter(pl.col(SUBSET) == i).drop(SUBSET)
        key = fingerprint({"op": "probe-eval", "model": train_key(base, rows, config), "eval": eval_fp,
                           "template": config.template, "max_length": config.max_length, "version": _EVAL_VERSION})
        jobs.append(ProbeJob(i, rows, key, f"{label} #{i + 1}"))
    got: dict[int, tuple[dict, bool]] = {}
    todo = []
    for job in jobs:
        if artifacts.exists(job.key):
            got[job.subset] = (json.loads((artifacts.path_for(job.key) / "probe.json").read_text()), True)
        else:
            todo.append(job)
    bar = tqdm(total=len(ids), initial=len(got), unit="probe", desc=f"{label}: probes", disable=not options.progress)
    with bar:
        if todo:
            for job, result in (map_probes or run_locally(base, artifacts))(todo, ProbeTask(evaluation, params, options)):
                got[job.subset] = (result, False)
                bar.set_postfix(loss=f"{result['loss']:.4f}")
                bar.update(1)
    probes = [Probe(i, got[i][0]["ids"], got[i][0]["loss"], got[i][0]["eval_rows"], got[i][0].get("train_seconds"),
                    got[i][1]) for i in ids]
    keys = [job.key for job in jobs]
    done = [p for p in probes if not p.cached]
    info = {"probes": len(probes), "cached": len(probes) - len(done), "evaluation": evaluation_label,
            "eval_rows": evaluation.height, "eval_rows_scored": sorted({p.eval_rows for p in probes}),
            "losses": [round(p.loss, 6) for p in probes],
            "rows_per_probe": sorted({len(p.ids) for p in probes})}
    if done and all(p.train_seconds is not None for p in done):
        info["seconds_per_probe"] = round(sum(p.train_seconds for p in done) / len(done), 2)
    return ProbeSet(label, probes, fingerprint({"op": "probes", "keys": keys}), evaluation_label, info)


def evaluation_loss(lm: Any, evaluation: pl.DataFrame, template: str, max_length: int, options: Any) -> tuple[float, int]:
    """Mean over the evaluation rows of each row's mean answer-token loss (rows without a scorable answer
    left out), and how many rows it averages."""
    from tamis.runtime.lm_scoring import score_answers

    table = score_answers(lm, evaluation, metric="loss", template=template, max_length=max_length,
                          batch_tokens=options.batch_tokens, progress=False)
    values = [v for v in table.value if v is not None and math.isfinite(v)]
    if not values:
        raise TamisError("no row of the probes' evaluation set has a scorable answer (all empty or cut off)")
    return float(np.mean(values)), len(values)

"""DEITA's in-recipe scorers: `evolve(D, M, rounds=R)` (a data kernel) and `train(M, on=D, task=…)`.

`evolve` builds the judge-scored Evol-Instruct variants of D's rows (`tamis.runtime.evolve`); `train(…,
task="complexity"|"quality")` fine-tunes M to answer the exact prompt the `complexity`/`quality` scorer reads
with the variant's label digit, so `score complexity using that_model` scores the pool with it.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

import polars as pl

from tamis.errors import ModelError, TamisError
from tamis.ops.kernel import Built, BuildEnv, Resources, kernel

TASKS = ("complexity", "quality")


@kernel("data", "evolve", resources=Resources(device="any"))
def evolve(params: Mapping, env: BuildEnv) -> pl.DataFrame:
    """DEITA's evolved variants of the dataset's rows, labelled by the judge (the same model); cached, and
    resumable seed batch by seed batch."""
    from tamis.runtime.evolve import evolve_dataset

    rows = env.inputs[0].get() if env.inputs else env.pool
    if not env.models:
        raise TamisError(f"{env.label}: evolve(...) needs a model to generate and judge with")
    if rows.height == 0:
        raise TamisError(f"{env.label}: no rows to evolve")
    model = env.models[0].get()
    result = evolve_dataset(rows, model, rounds=int(params["rounds"]), max_tokens=int(params.get("max_tokens", 512)),
                            artifacts=env.artifacts, batch_tokens=env.options.batch_tokens,
                            progress=env.options.progress, ranking=str(params.get("ranking", "free")))
    env.report.update({"dataset": "evolve", "summary": describe_counts(result.counts),
                       "generated_now": result.generated_now, "seconds": round(result.seconds, 1)})
    if env.options.progress or result.generated_now:
        print(f"{env.label}: {describe_counts(result.counts)} ({result.generated_now} generated now, "
              f"{result.seconds:.1f} s)", file=sys.stderr)
    return result.frame


def describe_counts(counts: Mapping[str, Any]) -> str:
    """One line for the console: seeds, generations, failures and null labels by reason."""
    failed = sum(counts["failed_generations"].values())
    parts = [f"{counts['seeds']} seed(s), {counts['rounds']} round(s), {counts['generations']} generation(s), "
             f"{failed} failed" + (f" ({_reasons(counts['failed_generations'])})" if failed else "")]
    for kind, got in counts["labels"].items():
        nulls = sum(got["null"].values())
        parts.append(f"{kind} labels {got['scored']}" + (f", {nulls} null ({_reasons(got['null'])})" if nulls else ""))
    return "; ".join(parts)


def _reasons(by_reason: Mapping[str, int]) -> str:
    return ", ".join(f"{why}: {n}" for why, n in sorted(by_reason.items(), key=lambda kv: -kv[1]))


def plan_problem(params: Mapping) -> str | None:
    """Why a `train(..., task=…)` cannot run (for the plan check), or None."""
    if params.get("task") not in TASKS:
        return (f"train(..., task={params.get('task')!r}): the task is the DEITA scorer to train, "
                f"{' or '.join(repr(t) for t in TASKS)}")
    return None


def train_scorer(params: Mapping, env: BuildEnv) -> Built:
    """`train(M, on=D, task=T)`: M fine-tuned (LoRA with `lora=`, else full) to answer DEITA's T prompt for
    each labelled row of D with its `T_label` digit; cached as an artifact keyed by the rows, their labels,
    the task's prompt and the training configuration."""
    from tamis.ops.models import _built
    from tamis.runtime.cache import data_fingerprint, fingerprint
    from tamis.runtime.digit_scorers import DIGIT_TEMPLATES
    from tamis.runtime.evolve import scorer_examples, scorer_rows
    from tamis.runtime.training import train_encoded
    from tamis.runtime.warmup import train_config, trained_with

    task = params["task"]
    if (why := plan_problem(params)) is not None:
        raise ModelError(why)
    base = env.bases[0].get()
    rows, unlabelled = scorer_rows(env.inputs[0].get(), task, label=env.label)
    config = train_config(dict(params))
    cols = [c for c in ("id", "instruction", "input", "output") if c in rows.columns] + [f"{task}_label"]
    key = fingerprint({"op": "train-scorer", "task": task, "base": base.fingerprint,
                       "data": data_fingerprint(rows, cols), "prompt": DIGIT_TEMPLATES[task], "config": config.to_json()})

    def train(out):
        examples, skipped = scorer_examples(base, rows, task, config.max_length)
        result = train_encoded(base, examples, config, out, n_rows=rows.height, skipped=skipped,
                               progress=env.options.progress)
        return result, rows["id"].to_list()

    lm, info = trained_with(base, key, config, train, env.artifacts, env.options,
                            {"label": env.label, "task": task, "rows_given": rows.height + unlabelled,
                             "unlabelled_rows": unlabelled,
                             "label_counts": {str(k): v for k, v in
                                              rows[f"{task}_label"].value_counts().sort(f"{task}_label").iter_rows()}})
    return _built(env, lm, info)

"""The orchestration of `tamis evaluate`: select, fine-tune, score, compare.

1. The pool is loaded once; the evaluation set is a file (pool rows with the same content are
   dropped from the pool) or a seeded held-out sample of the pool (`holdout:N`, `holdout:P%`),
   excluded from the pool every recipe selects from. That selection pool is written to
   ``DIR/train_pool.parquet`` and each recipe runs on it through the ordinary executor (its
   scores come from, and go to, the score cache).
2. Per seed, the PFM is fine-tuned with identical settings on each recipe's selection (SEM), on
   the whole selection pool (BM), and on a seeded random subset of each selection's size (the
   control). Each trained model is an artifact keyed by the base model, the rows and the training
   configuration (`tamis.runtime.warmup.train_key`), so a second run, or a run after a kill,
   retrains nothing that finished. Held-out losses, generated answers and judge verdicts are
   cached the same way, by content.
3. Scores: held-out answer loss of every model (and of the untrained PFM); with a judge, pairwise
   verdicts of SEM against BM and against the control, and of the control against BM, per seed.
4. `metrics` turns them into points rows (one per seed and group), PIR and its spread over seeds.

With `EvalConfig.ray` (`--engine ray`) the selections run under the Ray engine and the fine-tunes the
artifact cache lacks run as parallel Ray tasks (`tamis.runtime.ray_train.train_models`), each task
also scoring the model it trained (`score_model`, into the same cached artifacts); the driver then
loads each model and reads its scores from the cache, as a rerun would.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import polars as pl

from tamis.errors import TamisError
from tamis.evaluate import metrics as M
from tamis.evaluate.pairwise import WinTieLoss, combine, pair_conversations, read_verdicts, tally

RANDOM = "random"  # the pseudo-recipe: the seeded random control every recipe gets
ANSWERS_VERSION = "greedy-eos-v1"  # part of cached answers' keys: bump when decoding changes


class EvaluateError(TamisError):
    """`tamis evaluate` cannot go on (a bad --eval, a recipe that selects nothing, …)."""


@dataclass(frozen=True)
class TrainingSettings:
    """The one training setting every model gets (recorded in the report)."""

    method: str = "lora"
    epochs: int = 3
    lr: float = 1e-4
    batch: int = 16
    max_length: int = 512
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    template: str = "alpaca"

    def config(self, seed: int):
        from tamis.runtime.training import TrainConfig

        lora = ({"lora_r": self.lora_r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout}
                if self.method == "lora" else {})
        return TrainConfig(method=self.method, epochs=self.epochs, learning_rate=self.lr, batch_size=self.batch,
                           max_length=self.max_length, template=self.template, seed=seed,
                           save_optimizer_state=False, **lora)


@dataclass
class EvalConfig:
    recipes: list[str]
    run: Any  # tamis.runtime.executor.RunConfig: pool, pfm, device, dtype, cache, pool loading, models
    eval: str  # a file, or holdout:N / holdout:P%
    judge: str | None = None
    seeds: int = 3
    seed: int = 42  # the first seed; seed i is seed + i (training order, LoRA init, the control's draw)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    params: dict[str, str] = field(default_factory=dict)  # --param for the recipes
    max_new_tokens: int = 256
    min_valid_verdicts: float = 0.5  # a wins-rate from fewer parsed verdicts is reported, not placed
    lm_eval_tasks: list[str] = field(default_factory=list)
    ray: Any = None  # tamis.runtime.ray_engine.RayOptions: --engine ray; None: everything in this process


@dataclass
class ModelRun:
    """One trained model (or the untrained PFM) and its scores."""

    label: str  # "ifd seed 42"
    method: str  # "ifd", "random", "BM", "PFM"
    seed: int | None
    rows: int
    training: dict  # the training summary (steps, losses, seconds, cached)
    loss: dict | None = None
    answers: list[str | None] | None = None
    bench: dict[str, float] = field(default_factory=dict)  # lm-evaluation-harness task -> score


@dataclass
class Comparison:
    a: str
    b: str
    seed: int
    wtl: WinTieLoss
    valid: int  # verdicts whose first line was two numbers
    verdicts: int
    records: list[dict]

    @property
    def valid_share(self) -> float:
        return self.valid / self.verdicts if self.verdicts else 0.0


@dataclass
class EvalResult:
    config: dict
    pool: dict  # sizes: loaded, held out, selection pool
    selections: dict[str, dict]  # method -> size, sdf, seconds, recipe path
    models: list[ModelRun]
    comparisons: list[Comparison]
    points: list  # efficiency Points
    notes: list[str]
    seconds: float
    judge: str | None = None


def parse_eval(spec: str) -> tuple[str, dict | str]:
    """`holdout:N` / `holdout:P%` -> ("holdout", {"count"|"fraction": …}); anything else is a file."""
    if not spec.startswith("holdout:"):
        if not Path(spec).exists():
            raise EvaluateError(f"--eval {spec!r}: no such file; give an evaluation file, or hold out pool rows "
                                "with --eval holdout:N (rows) or holdout:P% (of the pool)")
        return "file", spec
    size = spec[len("holdout:"):].strip()
    try:
        if size.endswith("%"):
            fraction = float(size[:-1]) / 100
            if not 0 < fraction < 1:
                raise ValueError
            return "holdout", {"fraction": fraction}
        count = int(size)
        if count < 1:
            raise ValueError
        return "holdout", {"count": count}
    except ValueError:
        raise EvaluateError(f"--eval {spec!r}: expected holdout:N (a positive number of rows) or holdout:P% "
                            "(0 < P < 100)") from None


def split_eval(pool: pl.DataFrame, spec: str, seed: int, load_eval: Callable[[str], pl.DataFrame]
               ) -> tuple[pl.DataFrame, pl.DataFrame, str, int]:
    """(selection pool, evaluation rows, a description, pool rows dropped as copies of evaluation rows)."""
    from tamis.runtime.cache import row_content_keys
    from tamis.runtime.warmup_sampling import random_subset, subset_size

    kind, what = parse_eval(spec)
    if kind == "holdout":
        assert isinstance(what, dict)
        n = what["count"] if "count" in what else subset_size(pool.height, what["fraction"])
        if n >= pool.height - 1:
            raise EvaluateError(f"--eval {spec}: holding out {n} of the pool's {pool.height} rows leaves too few "
                                "to select from")
        held = set(random_subset(pool["id"].to_list(), n, seed=seed))
        is_held = pl.col("id").is_in(list(held))
        return pool.filter(~is_held), pool.filter(is_held), f"{n} rows held out of the pool (seed {seed})", 0
    assert isinstance(what, str)
    rows = load_eval(what)
    if rows.height == 0:
        raise EvaluateError(f"--eval {what}: no rows")
    # a pool row with an evaluation row's content would be trained on and then tested on
    copies = row_content_keys(pool).is_in(row_content_keys(rows).implode())
    dropped = int(copies.sum())
    return pool.filter(~copies), rows, f"{what} ({rows.height} rows)", dropped


def cached_json(artifacts: Any, what: dict, compute: Callable[[], Any]) -> tuple[Any, bool]:
    """`compute()`'s JSON result, stored as an artifact keyed by `what` (content, never a run id)."""
    from tamis.runtime.cache import fingerprint

    key = fingerprint(what)
    if artifacts.exists(key):
        return json.loads((artifacts.path_for(key) / "result.json").read_text()), True
    value = compute()
    with artifacts.building(key) as folder:
        (Path(folder) / "what.json").write_text(json.dumps(what))
        (Path(folder) / "result.json").write_text(json.dumps(value))
    return value, False


@dataclass(frozen=True)
class Scoring:
    """What scoring a trained model needs, as plain values (a Ray task scores the model it trained)."""

    eval_rows: pl.DataFrame
    eval_fp: str
    template: str
    max_length: int
    batch_tokens: int | None
    prompts: list | None  # the judge's prompts (token ids), or None without a judge
    max_new_tokens: int


def score_model(lm: Any, artifacts: Any, *, scoring: Scoring, label: str, progress: bool
                ) -> tuple[dict, list[str | None] | None]:
    """`lm`'s held-out loss and (with a judge) its greedy answers, each a cached artifact keyed by the
    model's fingerprint and the evaluation's content (so the driver and a Ray task share them)."""
    from tamis.evaluate.heldout import heldout_loss

    s = scoring
    loss, _ = cached_json(artifacts, {"op": "evaluate-heldout-loss", "model": lm.fingerprint, "data": s.eval_fp,
                                      "template": s.template, "max_length": s.max_length},
                          lambda: heldout_loss(lm, s.eval_rows, template=s.template, max_length=s.max_length,
                                               batch_tokens=s.batch_tokens, progress=progress).to_json())
    answers = None
    if s.prompts is not None:
        from tamis.evaluate.generate import greedy_answers

        answers, _ = cached_json(artifacts, {"op": "evaluate-answers", "model": lm.fingerprint, "data": s.eval_fp,
                                             "template": s.template, "max_length": s.max_length,
                                             "max_new_tokens": s.max_new_tokens, "decoding": ANSWERS_VERSION},
                                 lambda: greedy_answers(lm, s.prompts, max_new_tokens=s.max_new_tokens,
                                                        batch_tokens=s.batch_tokens, progress=progress,
                                                        desc=f"answers of {label}"))
    return loss, answers


def _log(message: str) -> None:
    print(f"evaluate: {message}", file=sys.stderr, flush=True)


def evaluate(cfg: EvalConfig, out_dir: Path, log: Callable[[str], None] = _log) -> EvalResult:
    """Run the whole evaluation; write only ``out_dir/train_pool.parquet`` (the reports are the caller's)."""
    if cfg.ray is None:
        return _evaluate(cfg, out_dir, log)
    from tamis.runtime.ray_engine import ensure_ray

    started = ensure_ray(cfg.ray)  # one Ray instance for every selection and fine-tune
    try:
        return _evaluate(cfg, out_dir, log)
    finally:
        if started:
            import ray

            ray.shutdown()


def _evaluate(cfg: EvalConfig, out_dir: Path, log: Callable[[str], None]) -> EvalResult:
    from tamis.dsl.compile import compile_file, pool_column_types
    from tamis.runtime.cache import data_fingerprint, open_cache
    from tamis.runtime.data import load_pool
    from tamis.runtime.models import load_causal_lm
    from tamis.runtime.outputs import write_parquet

    started = time.perf_counter()
    run = cfg.run
    if cfg.seeds < 1:
        raise EvaluateError(f"--seeds must be at least 1, got {cfg.seeds}")
    if not run.pfm:
        raise EvaluateError("--pfm is required: the model to fine-tune")
    names = [r for r in cfg.recipes if r != RANDOM]
    if not names:
        raise EvaluateError("name at least one recipe: `random` is the control each recipe's selection is compared "
                            "with (a random subset of the same size), not a selection of its own size")
    settings = cfg.training
    settings.config(cfg.seed)  # a bad training setting fails now, before any work
    parse_eval(cfg.eval)
    loaded = load_pool(run.pool, format=run.pool_format, columns=run.columns, skip_bad=run.skip_bad, limit=run.limit)
    pool = loaded.frame
    if pool.height < 3:
        raise EvaluateError(f"{run.pool}: {pool.height} rows: too few to evaluate a selection")
    compiled = [compile_file(r, pool_fields=pool_column_types(pool.schema), params=cfg.params or None) for r in names]

    def load_eval(path: str) -> pl.DataFrame:
        return load_pool(path, columns=run.columns, skip_bad=run.skip_bad).frame

    train_pool, eval_rows, eval_desc, dropped = split_eval(pool, cfg.eval, cfg.seed, load_eval)
    notes: list[str] = list(loaded.report.warnings)
    if dropped:
        notes.append(f"{dropped} pool row(s) have the content of an evaluation row and were left out of the pool")
    out_dir.mkdir(parents=True, exist_ok=True)
    pool_path = write_parquet(train_pool, out_dir / "train_pool.parquet")
    sel_cfg = dataclasses.replace(run, pool=str(pool_path), pool_format="parquet", columns=None, limit=None,
                                  skip_bad=False)
    log(f"pool {run.pool}: {pool.height} rows; evaluation set: {eval_desc}; selection pool: {train_pool.height} rows")

    # 1. selections (the executor caches their scores)
    selections: dict[str, pl.DataFrame] = {}
    sel_info: dict[str, dict] = {}
    from tamis.runtime.executor import LocalExecutor

    for recipe, c in zip(names, compiled):
        name = c.name if c.name not in selections and c.name != RANDOM else f"{c.name}#{len(selections) + 1}"
        log(f"selecting with {recipe}")
        t0 = time.perf_counter()
        if cfg.ray is not None:
            from tamis.runtime.ray_engine import RayExecutor

            result = RayExecutor(c.graph, sel_cfg, cfg.ray).run()
        else:
            result = LocalExecutor(c.graph, sel_cfg).run()
        # a streamed selection is still on Ray's workers: the fine-tunes need its rows here
        selected = result.selected if isinstance(result.selected, pl.DataFrame) else result.selected.to_polars()
        if selected.height == 0:
            raise EvaluateError(f"recipe {recipe} selected no rows of the {train_pool.height}: nothing to fine-tune on")
        selections[name] = selected
        sel_info[name] = {"recipe": str(c.recipe.path or recipe), "size": selected.height,
                          "sdf": M.method_sdf(selected.height, train_pool.height),
                          "seconds": time.perf_counter() - t0, "ids": selected["id"].to_list()}
        del result
        gc.collect()
    sizes = sorted({s["size"] for s in sel_info.values()})
    control = {k: (RANDOM if len(sizes) == 1 else f"{RANDOM}@{k}") for k in sizes}
    for k, name in control.items():
        sel_info[name] = {"recipe": "(built-in control: a seeded random subset per seed)", "size": k,
                          "sdf": M.method_sdf(k, train_pool.height), "seconds": 0.0, "ids": None}

    # 2. training and scoring, one model loaded at a time
    cache = open_cache(run.cache_dir, disabled=run.no_cache)
    base = load_causal_lm(run.pfm, device=run.device, dtype=run.dtype, cache_root=run.cache_dir)
    eval_fp = data_fingerprint(eval_rows)
    prompts = None
    if cfg.judge:
        from tamis.evaluate.generate import prompt_ids

        prompts = prompt_ids(base, eval_rows.to_dicts(), settings.template, settings.max_length)
        if not any(p is not None for p in prompts):
            raise EvaluateError(f"every evaluation prompt reaches max_length {settings.max_length}: nothing to answer")

    scoring = Scoring(eval_rows, eval_fp, settings.template, settings.max_length, run.batch_tokens, prompts,
                      cfg.max_new_tokens)

    def score(lm: Any, entry: ModelRun) -> None:
        loss, answers = score_model(lm, cache.artifacts, scoring=scoring, label=entry.label, progress=run.progress)
        entry.loss = loss
        if answers is not None:
            entry.answers = answers
        if cfg.lm_eval_tasks:
            entry.bench = _lm_eval(lm, cfg.lm_eval_tasks, cache.artifacts, notes)

    models: list[ModelRun] = []
    pfm_entry = ModelRun("PFM (not fine-tuned)", "PFM", None, 0, {})
    score(base, pfm_entry)
    models.append(pfm_entry)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    jobs: list[tuple[str, int, pl.DataFrame]] = []
    from tamis.runtime.warmup_sampling import random_subset

    for seed in seeds:
        jobs.append(("BM", seed, train_pool))
        for name, rows in selections.items():
            jobs.append((name, seed, rows))
        for k, name in control.items():
            drawn = random_subset(train_pool["id"].to_list(), k, seed=seed)
            jobs.append((name, seed, train_pool.filter(pl.col("id").is_in(drawn))))
    from tamis.runtime.warmup import train_key, trained_model

    on_ray: set[str] = set()  # the keys of the models Ray tasks trained in this run
    if cfg.ray is not None:
        on_ray = _train_on_ray(cfg, base, jobs, scoring, cache.artifacts, log)
    for i, (name, seed, rows) in enumerate(jobs, 1):
        config = settings.config(seed)
        key = train_key(base, rows, config)
        label = f"{name} seed {seed}"
        done = cache.artifacts.exists(key)
        log(f"[{i}/{len(jobs)}] {label}: " + ("trained on a Ray worker" if key in on_ray else
                                              "trained model from the cache" if done else
                                              f"fine-tuning on {rows.height} rows"))
        lm, summary = trained_model(base, key, config, lambda rows=rows: rows, cache.artifacts, run,
                                    {"label": label, "rows_given": rows.height})
        summary.pop("sample_ids", None)
        if key in on_ray:
            summary.update(cached=False, engine="ray")  # trained in this run, by a Ray task
        if summary.get("note"):  # e.g. one optimizer step, which the warmup schedule gives lr 0 (--batch, --epochs)
            notes.append(summary["note"])
        entry = ModelRun(label, name, seed, rows.height, summary)
        score(lm, entry)
        models.append(entry)
        del lm
        gc.collect()
    del base
    gc.collect()

    # 3. the judge
    comparisons: list[Comparison] = []
    judge_name = None
    if cfg.judge:
        comparisons, judge_name = _judge_all(cfg, models, eval_rows, selections, control, sel_info, seeds,
                                             cache.artifacts, log)

    # 4. points: one row per method, seed and group
    points = _points(cfg, models, comparisons, sel_info, train_pool.height, eval_desc, notes)
    config = {"recipes": cfg.recipes, "pool": run.pool, "pfm": run.pfm, "eval": cfg.eval, "judge": cfg.judge,
              "seeds": seeds, "training": dataclasses.asdict(settings), "max_new_tokens": cfg.max_new_tokens,
              "params": cfg.params, "limit": run.limit, "device": run.device, "dtype": run.dtype,
              "lm_eval_tasks": cfg.lm_eval_tasks,
              **({"engine": "ray", "train_cpus": cfg.ray.train_cpus} if cfg.ray is not None else {})}
    pool_info = {"loaded": pool.height, "eval_rows": eval_rows.height, "eval": eval_desc,
                 "selection_pool": train_pool.height, "dropped_as_eval_copies": dropped,
                 "load_report": loaded.report.to_dict()}
    return EvalResult(config, pool_info, sel_info, models, comparisons, points, notes,
                      time.perf_counter() - started, judge_name)


def _train_on_ray(cfg: EvalConfig, base: Any, jobs: list[tuple[str, int, pl.DataFrame]], scoring: Scoring,
                  artifacts: Any, log: Callable[[str], None]) -> set[str]:
    """The fine-tunes the artifact cache lacks, as parallel Ray tasks, each also scoring its model;
    the keys of those trained (a killed run keeps the finished ones: the rerun trains only the rest)."""
    from tqdm.auto import tqdm

    from tamis.runtime.ray_train import TrainJob, train_models
    from tamis.runtime.warmup import train_key

    todo: dict[str, TrainJob] = {}
    for name, seed, rows in jobs:
        config = cfg.training.config(seed)
        key = train_key(base, rows, config)
        if key in todo or artifacts.exists(key):
            continue
        label = f"{name} seed {seed}"
        todo[key] = TrainJob(key, rows, config, label,
                             functools.partial(score_model, scoring=scoring, label=label, progress=False))
    if not todo:
        return set()
    log(f"fine-tuning {len(todo)} of {len(jobs)} model(s) as parallel Ray tasks (the rest are in the cache)")
    t0 = time.perf_counter()
    done: set[str] = set()
    with tqdm(total=len(todo), unit="model", desc="fine-tunes on Ray", disable=not cfg.run.progress) as bar:
        for job, summary in train_models(list(todo.values()), base, cfg.run.options(),
                                         str(artifacts.root), cfg.ray.train_cpus):
            if not artifacts.exists(job.key):  # the driver would otherwise train it again, here
                from tamis.runtime.ray_engine import RayEngineError

                raise RayEngineError(f"{job.label}: a Ray worker trained it into {artifacts.root}, which this "
                                     "machine does not see; give a --cache-dir every node shares")
            done.add(job.key)
            bar.update(1)
            log(f"{job.label}: fine-tuned on {job.rows.height} rows on a Ray worker "
                f"({summary.get('seconds', 0):.1f} s training, {time.perf_counter() - t0:.1f} s since the first task)")
    return done


def _judge_all(cfg: EvalConfig, models: list[ModelRun], eval_rows: pl.DataFrame, selections: dict,
               control: dict[int, str], sel_info: dict, seeds: list[int], artifacts: Any,
               log: Callable[[str], None]) -> tuple[list[Comparison], str]:
    from tamis.evaluate.judges import JUDGE_MAX_TOKENS, open_judge
    from tamis.runtime.cache import fingerprint
    from tamis.runtime.judge_prompts import JUDGE_DECODING, VICUNA_PAIRWISE
    from tamis.runtime.templates import user_query

    run = cfg.run
    assert cfg.judge is not None
    judge = open_judge(cfg.judge, device=run.device, dtype=run.dtype, cache_dir=run.cache_dir, api_base=run.api_base,
                       model_paths=run.model_paths, api_max_wait=run.api_max_wait,
                       api_max_failures=run.api_max_failures)
    questions = [user_query(r) for r in eval_rows.to_dicts()]
    ids = eval_rows["id"].to_list()
    by = {(m.method, m.seed): m for m in models}
    pairs: list[tuple[str, str]] = []
    for name in selections:
        pairs.append((name, "BM"))
        pairs.append((name, control[sel_info[name]["size"]]))
    pairs += [(name, "BM") for name in control.values()]
    out: list[Comparison] = []
    for seed in seeds:
        for a, b in pairs:
            ans_a, ans_b = by[(a, seed)].answers or [], by[(b, seed)].answers or []
            keep = [i for i in range(len(questions)) if ans_a[i] is not None and ans_b[i] is not None]
            q = [questions[i] for i in keep]
            convs = pair_conversations(q, [ans_a[i] for i in keep], [ans_b[i] for i in keep])
            log(f"judging {a} against {b}, seed {seed}: {len(keep)} questions, both orders")
            what = {"op": "evaluate-verdicts", "judge": judge.fingerprint, "prompt": VICUNA_PAIRWISE.name,
                    "prompt_version": VICUNA_PAIRWISE.version, "decoding": JUDGE_DECODING,
                    "max_tokens": JUDGE_MAX_TOKENS, "conversations": fingerprint(convs)}
            lines, _ = cached_json(artifacts, what, lambda convs=convs: judge.first_lines(convs, run.progress))
            verdicts = read_verdicts(lines)
            outcomes = combine(verdicts)
            n = len(keep)
            records = [{"id": ids[i], "question": questions[i], "answer_a": ans_a[i], "answer_b": ans_b[i],
                        "a_first": verdicts[j].line, "b_first": verdicts[n + j].line, "outcome": outcomes[j]}
                       for j, i in enumerate(keep)]
            out.append(Comparison(a, b, seed, tally(outcomes), sum(v.scores is not None for v in verdicts),
                                  len(verdicts), records))
    return out, judge.name


def _points(cfg: EvalConfig, models: list[ModelRun], comparisons: list[Comparison], sel_info: dict,
            pool_size: int, eval_desc: str, notes: list[str]) -> list:
    from pathlib import Path as _P

    by = {(m.method, m.seed): m for m in models}
    settings = cfg.training
    what = "LoRA" if settings.method == "lora" else "full fine-tuning"
    sem = f"{_P(str(cfg.run.pfm)).name} ({what}, {settings.epochs} epoch{'s' if settings.epochs != 1 else ''})"
    points = []
    for (method, seed), m in by.items():
        if method in ("BM", "PFM"):
            continue
        size = sel_info[method]["size"]
        bm = by[("BM", seed)]
        name = f"{method} (eval)"
        src = f"tamis evaluate, seed {seed}"
        points.append(M.point(name, sem, M.BENCH, M.loss_ratio(bm.loss["loss"], m.loss["loss"]), size, pool_size,
                              f"{src}: held-out answer loss, BM/SEM, on {eval_desc}"))
        for bench_task, value in m.bench.items():
            if bm.bench.get(bench_task):
                points.append(M.point(name, sem, M.BENCH, value / bm.bench[bench_task], size, pool_size,
                                      f"{src}: lm-evaluation-harness {bench_task}, SEM/BM"))
        comp = next((c for c in comparisons if c.a == method and c.b == "BM" and c.seed == seed), None)
        if comp is None:
            continue
        if comp.valid_share < cfg.min_valid_verdicts:
            notes.append(f"{method} vs BM, seed {seed}: only {comp.valid} of {comp.verdicts} verdicts were two "
                         f"numbers (< {cfg.min_valid_verdicts:.0%}); its wins-rate is reported but not placed on "
                         "the graph (a judge that cannot judge makes every question a tie)")
            continue
        if comp.wtl.wins_rate <= 0:
            notes.append(f"{method} vs BM, seed {seed}: wins-rate 0 (every question lost) cannot be a ratio on the graph")
            continue
        points.append(M.point(name, sem, M.WINS, comp.wtl.wins_rate, size, pool_size,
                              f"{src}: wins-rate against BM, judge {cfg.judge}, both orders, on {eval_desc}"))
    return points


def _lm_eval(lm: Any, tasks: list[str], artifacts: Any, notes: list[str]) -> dict[str, float]:
    """Benchmark accuracy through lm-evaluation-harness (optional): task -> its first accuracy-like metric."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        msg = "lm-evaluation-harness is not installed (pip install lm-eval): benchmark accuracy skipped"
        if msg not in notes:
            notes.append(msg)
            _log(msg)
        return {}

    def compute() -> dict[str, float]:
        res = simple_evaluate(model=HFLM(pretrained=lm.model, tokenizer=lm.tokenizer), tasks=list(tasks))
        out: dict[str, float] = {}
        for task, values in (res or {}).get("results", {}).items():
            for metric in ("acc_norm,none", "acc,none", "exact_match,none"):
                if isinstance(values.get(metric), (int, float)):
                    out[task] = float(values[metric])
                    break
        return out

    got, _ = cached_json(artifacts, {"op": "evaluate-lm-eval", "model": lm.fingerprint, "tasks": sorted(tasks)}, compute)
    return got

"""The local executor: runs a compiled recipe graph over a pool on one machine.

Operators run in dependency order; each node's output is computed once (shared
sub-graphs included). Expensive scores go through the content-addressed cache in
chunks, so a killed run resumes where it stopped. Row-picking stages and score
algebra run in Polars.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import networkx as nx
import numpy as np
import polars as pl

from tamis.dsl import registry as reg
from tamis.errors import TamisError
from tamis.ops.kernel import BuildEnv, ExecOptions, Kernel, Lazy, kernel_for, kernels, node_kernel

# The engine's own stages: the language's row algebra. Everything a stage computes (scorers,
# samplers, expression functions, models, datasets) comes from the kernel table.
STAGES = {"score", "let", "where", "rank", "top", "topk", "sample", "intersect", "union", "diverse", "dedup", "normalize"}


@dataclass
class RunConfig:
    pool: str
    pfm: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    cache_dir: str | None = None
    no_cache: bool = False
    skip_bad: bool = False
    limit: int | None = None
    pool_format: str = "auto"
    columns: dict[str, str] | None = None
    batch_tokens: int | None = None
    chunk_rows: int = 64  # at most this many rows scored between cache writes (--checkpoint-rows)
    api_max_wait: float = 120.0  # seconds of retry waits per endpoint request (--api-max-wait)
    api_max_failures: int = 3  # failed endpoint requests in a row that stop the run (--api-max-failures)
    checkpoint_seconds: float = 30.0  # and chunks sized to take about this long: a kill loses at most that much
    model_paths: dict[str, str] = field(default_factory=dict)  # hf/api("name") -> a local path, for offline machines
    api_base: str | None = None  # OpenAI-compatible endpoint for api("name") models without a local binding
    progress: bool = True

    def options(self) -> ExecOptions:
        return ExecOptions(device=self.device, dtype=self.dtype, batch_tokens=self.batch_tokens, progress=self.progress,
                           pfm=self.pfm, model_paths=dict(self.model_paths), api_base=self.api_base,
                           cache_dir=self.cache_dir, api_max_wait=self.api_max_wait,
                           api_max_failures=self.api_max_failures)


@dataclass
class StageReport:
    node: str
    label: str
    rows_in: int
    rows_out: int
    seconds: float
    model_seconds: float = 0.0  # loading (and warming up) the stage's model, included in `seconds`
    cached_rows: int = 0
    scored_rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    histogram: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)  # what a user should know (a budget left unfilled, …)
    target: str | None = None  # `score … on DATA`: the dataset scored (its rows, not the pool's)
    target_rows: int = 0
    # rows whose cached values were cut off at the end of a killed run's cache journal, so computed again
    # (-1: a cut-off chunk of unknown size); counted in scored_rows too
    torn_rows: int = 0
    removed: list[dict] = field(default_factory=list)  # `dedup`: the first removed rows, each with why
    tag_counts: dict[str, int] = field(default_factory=dict)  # `normalize`: distinct tags after each step


@dataclass
class RunResult:
    selected: pl.DataFrame
    scores: pl.DataFrame
    stages: list[StageReport]
    pool_report: dict
    models: dict[str, dict]
    seconds: float


class PlanError(TamisError):
    """The graph asks for something the local executor cannot run."""


def check_runnable(g: nx.DiGraph, cfg: "RunConfig | None" = None) -> None:
    """Fail before any work when a node has no kernel, or a model's plan check fails (an
    `api` model that neither a local model (--model NAME=PATH) nor an endpoint serves)."""
    from tamis.runtime.exprs import calls_in

    options = cfg.options() if cfg else ExecOptions()
    needed = nx.ancestors(g, g.graph["output"])
    problems = []
    for n in needed:
        a = g.nodes[n]
        where = f" (line {a['line']})" if a.get("line") else ""
        if a["kind"] == "op":
            missing = _missing_kernel(a)
            if missing:
                problems.append(f"stage `{a['label']}`{where}: {missing} has no local runtime yet")
            for call in calls_in(a.get("expr")):
                if kernel_for("function", call) is None:
                    problems.append(f"stage `{a['label']}`{where}: function `{call}` has no local runtime yet")
        elif a["kind"] == "model":
            k = kernel_for("model", a["ctor"])
            if k is None:
                problems.append(f"model `{a['label']}`{where}: `{a['ctor']}` models have no local runtime yet")
            elif k.plan_check and (why := k.plan_check(a["params"], options)):
                problems.append(f"model `{a['label']}`{where}: {why}")
        elif a["kind"] == "dataset" and kernel_for("data", a.get("source")) is None:
            problems.append(f"dataset `{a['label']}`{where}: `{a['source']}` has no local runtime yet")
    if problems:
        raise PlanError("this recipe cannot run locally yet:\n  " + "\n  ".join(sorted(problems))
                        + f"\nrunnable scorers: {', '.join(sorted(kernels('scorer')))}")


def check_pool_fields(g: nx.DiGraph, schema, pool: str) -> None:
    """Names the recipe took to be pool fields (compiled without the pool's schema) must be fields of
    the loaded pool: checked before any model work, each named at its line and column."""
    fields = [name for name in schema if name not in reg.POOL_COLUMNS]
    missing = [f for f in g.graph.get("assumed_fields", []) if f["name"] not in schema]
    if missing:
        from tamis.dsl.lower import did_you_mean

        lines = []
        for f in missing:
            close = did_you_mean(f["name"], fields)
            lines.append(f"{f['path'] or '<recipe>'}:{f['line']}:{f['column']}: unknown column {f['name']!r}: no stage "
                         f"produces it and {pool} has no such field" + (f" ({close})" if close else ""))
        raise PlanError("\n".join(lines) + f"\n  the pool's own fields: {', '.join(fields) or 'none'}")


def _missing_kernel(a: dict) -> str | None:
    """What an operator node lacks to run, as a phrase, or None."""
    if a["op"] not in STAGES:
        return f"`{a['op']}`"
    if a["op"] in ("score", "diverse", "dedup") and node_kernel(a) is None:
        family, key = {"score": ("scorer", "scorer"), "diverse": ("sampler", "sampler"), "dedup": ("dedup", "method")}[a["op"]]
        return f"{family} `{a['params'][key]}`"
    return None


def _next_chunk(done: int, seconds: float, most: int, target_seconds: float) -> int:
    """Rows in the next cache chunk: about `target_seconds` of work at the rate just measured
    (a slow judge persists every few rows, a fast scorer every `most`), never more than `most`."""
    if seconds <= 0:
        return most
    return max(1, min(most, int(done / seconds * target_seconds)))


def report_dedup(report: StageReport, p: dict, result: Any, ids: pl.Series, against_ids: pl.Series | None) -> None:
    """What a dedup stage removed, for the run report: each removed row and its match, and one note."""
    if not result.removed:
        return
    from tamis.runtime.dedup import summary

    shown = summary(result, ids, against_ids)
    report.removed = shown.to_dicts()
    why = (f"near-duplicate to a row of {p['against']}" if against_ids is not None
           else "duplicates of a row ranked above them")
    first = shown.row(0, named=True)
    report.notes.append(f"removed {result.removed} row(s), {why} ({p['method']}"
                        + (f", threshold {p['threshold']:g}" if "threshold" in p else "")
                        + f"; e.g. {first['id']} ~ {first['duplicate_of']})")


def _size_rows(size: dict, n: int) -> int:
    if "fraction" in size:
        return max(1, int(round(size["fraction"] * n)))
    return min(int(size["count"]), n)


def group_quotas(sizes: pl.DataFrame, key: str, size: dict, weights: dict | None, pool_size: int,
                 report: StageReport) -> pl.DataFrame:
    """Rows to take from each group (`sizes`: the group value as a string in `key`, its rows in `len`).

    Without weights, `size` applies to each group: a count is taken from every group, a percentage
    is that share of the group's rows here (at least one row of a non-empty group). With weights, `size`
    is the whole budget (a percentage: of the pool, as everywhere) split over the weighted groups in
    proportion to their weights (largest remainders, so the parts add up); groups with no weight get
    nothing. A group smaller than its quota gives all it has, and the report says so: the shortfall
    is not moved to other groups, so the mixture stays what was asked."""
    groups = sizes[key].to_list()
    have = dict(zip(groups, sizes["len"].to_list()))
    if weights is None:
        quota = {g: (min(int(size["count"]), n) if "count" in size else max(1, int(round(size["fraction"] * n))))
                 for g, n in have.items()}
    else:
        total = _size_rows(size, pool_size)
        wsum = sum(weights.values())
        exact = {g: total * w / wsum for g, w in weights.items()}
        quota = {g: int(v) for g, v in exact.items()}
        for g in sorted(exact, key=lambda g: exact[g] - quota[g], reverse=True)[: total - sum(quota.values())]:
            quota[g] += 1
        missing = [g for g in weights if g not in have]
        if missing:
            report.notes.append(f"no rows in group(s) {', '.join(map(repr, missing))} given weights")
        unweighted = [g for g in have if g not in weights]
        if unweighted:
            shown = ", ".join("null" if g is None else repr(g) for g in unweighted[:5])
            report.notes.append(f"{len(unweighted)} group(s) have no weight and give no rows ({shown}"
                                + (", …" if len(unweighted) > 5 else "") + ")")
        quota = {g: quota.get(g, 0) for g in have}
    short = {g: (q, have[g]) for g, q in quota.items() if have[g] < q}
    if short:
        shown = ", ".join(f"{'null' if g is None else repr(g)}: {n} of {q}" for g, (q, n) in list(short.items())[:5])
        report.notes.append(f"{len(short)} group(s) have fewer rows than their quota ({shown}"
                            + (", …" if len(short) > 5 else "") + ")")
    return pl.DataFrame({key: groups, "⟨quota⟩": [quota[g] for g in groups]}, schema={key: pl.String, "⟨quota⟩": pl.Int64})


# Columns the executor adds for itself. Their names hold a character no recipe name can
# (names are [A-Za-z_][A-Za-z0-9_]*), so a user's `let` can never collide with one.
RANK_KEY = "⟨rank key⟩"
INTERNAL_COLUMNS = (RANK_KEY,)


def _histogram(values: pl.Series, bins: int = 10) -> dict[str, Any] | None:
    # ±inf and NaN (from `let x / 0`, `log(0)`) are left out of the histogram, like nulls
    v = values.drop_nulls().filter(values.drop_nulls().is_finite()) if values.dtype.is_float() else values.drop_nulls()
    if len(v) == 0:
        return None
    counts, edges = np.histogram(v.to_numpy(), bins=bins)
    return {"counts": counts.tolist(), "edges": [float(e) for e in edges], "min": float(v.min()),
            "max": float(v.max()), "mean": float(v.mean()), "n": len(v), "nulls": int(values.null_count())}


class LocalExecutor:
    def __init__(self, g: nx.DiGraph, cfg: RunConfig) -> None:
        from tamis.runtime.cache import open_cache

        self.g = g
        self.cfg = cfg
        self.cache = open_cache(cfg.cache_dir, disabled=cfg.no_cache)
        self._frames: dict[str, pl.DataFrame] = {}
        self._pool_key: str | None = None  # the pool's content hash, once something needs it
        # how an engine that does not hold the pool makes its hash and the datasets drawn from it (Ray)
        self._pool_hasher: Callable[[], str] | None = None
        self._frame_makers: dict[str, Callable[[], pl.DataFrame]] = {}
        self._models: dict[str, Any] = {}
        self.model_info: dict[str, dict] = {}
        self.stages: list[StageReport] = []
        self.scores: pl.DataFrame | None = None
        self.pool_size = 0
        self._order: list[str] = []  # the operators this run executes, in order (for "[2/4] score ifd")
        self._hashed: pl.DataFrame | None = None  # rows whose cache keys were computed: id, content, ⟨key⟩
        # scores of other datasets (`score … on DATA as NAME`), by column: read whole by
        # functions such as win_rate and influence, never joined to the pool's rows
        self._foreign: dict[str, pl.Series] = {}

    # ---- entry ------------------------------------------------------------
    def run(self) -> RunResult:
        from tamis.runtime.data import load_pool

        check_runnable(self.g, self.cfg)
        started = time.perf_counter()
        loaded = load_pool(self.cfg.pool, format=self.cfg.pool_format, columns=self.cfg.columns,
                           skip_bad=self.cfg.skip_bad, limit=self.cfg.limit)
        pool = loaded.frame
        if pool.height == 0:
            raise TamisError(f"{self.cfg.pool}: no rows to select from")
        check_pool_fields(self.g, pool.schema, self.cfg.pool)
        self.pool_size = pool.height
        self._frames["data:pool"] = pool
        self.scores = pool.select("id")
        out = self.g.graph["output"]
        needed = nx.ancestors(self.g, out)
        self._order = [n for n in nx.topological_sort(self.g) if n in needed and self.g.nodes[n]["kind"] == "op"]
        for n in self._order:
            self._run_op(n)
        last = next(p for p, _, d in self.g.in_edges(out, data=True) if d["flow"] == "data")
        selected = self._frames[last] if last != "data:pool" else pool
        selected = selected.drop([c for c in INTERNAL_COLUMNS if c in selected.columns])
        return RunResult(selected, self.scores, self.stages, loaded.report.to_dict(), self.model_info,
                         time.perf_counter() - started)

    def _input(self, n: str) -> pl.DataFrame:
        pred = next(p for p, _, d in self.g.in_edges(n, data=True) if d["flow"] == "data")
        return self._frames[pred]

    def _model_of(self, n: str) -> str | None:
        return next((p for p, _, d in self.g.in_edges(n, data=True) if d["flow"] == "model"), None)

    # ---- operators ----------------------------------------------------------
    def _run_op(self, n: str) -> None:
        a = self.g.nodes[n]
        frame = self._input(n)
        t0 = time.perf_counter()
        report = StageReport(n, a["label"], frame.height, 0, 0.0)
        out = getattr(self, f"_op_{a['op']}")(n, a, frame, report)
        report.rows_out = out.height
        report.seconds = time.perf_counter() - t0
        self.stages.append(report)
        self._frames[n] = out

    def _op_let(self, n, a, frame, report):
        from tamis.runtime.exprs import to_polars

        out = frame.with_columns(to_polars(a["expr"], self._foreign).alias(a["params"]["name"]))
        self._record_scores(out.select("id", a["params"]["name"]))  # --scores has every computed column
        report.histogram = _histogram(out[a["params"]["name"]]) if out[a["params"]["name"]].dtype.is_numeric() else None
        return out

    def _op_where(self, n, a, frame, report):
        from tamis.runtime.exprs import to_polars

        return frame.filter(to_polars(a["expr"], self._foreign).fill_null(False))

    def _sorted(self, a, frame) -> pl.DataFrame:
        from tamis.runtime.exprs import to_polars

        # the key stays beside the rows (nulls and NaNs as null, sorted last) so that a later
        # `top` can tell rows with no key, which it never picks
        key = to_polars(a["expr"], self._foreign)
        return (frame.with_columns(key.cast(pl.Float64).fill_nan(None).alias(RANK_KEY))
                .sort(RANK_KEY, descending=a["params"]["order"] == "desc", nulls_last=True, maintain_order=True))

    def _op_rank(self, n, a, frame, report):
        out = self._sorted(a, frame)
        per = a["params"].get("per")
        if per is None:
            return out
        # `rank … per G`: groups interleaved, the best of each group first, then the second best, …
        # (rows without a ranking key last), so that a later `top N` takes the groups in turn
        pos = "⟨group position⟩"
        return (out.with_columns(pl.int_range(pl.len()).over(per).alias(pos))
                .sort([pl.col(RANK_KEY).is_null(), pl.col(pos)], maintain_order=True).drop(pos))

    def _top(self, a, frame, report) -> pl.DataFrame:
        """The first rows in rank order, never one whose ranking key is null (a skipped score,
        a blend with a null part): better a short selection, said aloud, than a wrong one."""
        # P% is a share of the pool (as Cherry and Superfiltering compute it), never of a hard-coded size
        want = _size_rows(a["params"]["size"], self.pool_size)
        keyed = frame.filter(pl.col(RANK_KEY).is_not_null()) if RANK_KEY in frame.columns else frame
        out = keyed.head(want)
        if out.height < want and keyed.height < frame.height:
            unkeyed = frame.height - keyed.height
            report.notes.append(f"budget {want} rows, {out.height} picked: {unkeyed} row(s) with a null ranking key "
                                "(a skipped score, or an expression over one) are never picked")
        return out

    def _op_top(self, n, a, frame, report):
        if "per" in a["params"]:
            keyed = frame.filter(pl.col(RANK_KEY).is_not_null()) if RANK_KEY in frame.columns else frame
            if keyed.height < frame.height:
                report.notes.append(f"{frame.height - keyed.height} row(s) with a null ranking key "
                                    "(a skipped score, or an expression over one) are never picked")
            return self._per_group(a["params"], keyed, report)
        return self._top(a, frame, report)

    def _per_group(self, p: dict, frame: pl.DataFrame, report: StageReport) -> pl.DataFrame:
        """`top|sample N per G [with weights={…}]` on rows in pick order: the first rows of each group,
        as many as its quota (see `group_quotas`), the rows keeping their order."""
        key, pos = "⟨group⟩", "⟨group position⟩"
        keyed = frame.with_columns(pl.col(p["per"]).cast(pl.String).alias(key))
        sizes = keyed.group_by(key, maintain_order=True).len()
        quotas = group_quotas(sizes, key, p["size"], p.get("weights"), self.pool_size, report)
        out = (keyed.with_columns(pl.int_range(pl.len()).over(key).alias(pos))
               .join(quotas, on=key, how="left", nulls_equal=True, maintain_order="left")
               .filter(pl.col(pos) < pl.col("⟨quota⟩")))
        return out.drop(key, pos, "⟨quota⟩")

    def _op_topk(self, n, a, frame, report):
        return self._top(a, self._sorted(a, frame), report)

    def _op_sample(self, n, a, frame, report):
        if "per" in a["params"]:  # a random order, then each group's first rows
            return self._per_group(a["params"], frame.sample(fraction=1.0, seed=a["params"]["seed"], shuffle=True),
                                   report)
        k = min(_size_rows(a["params"]["size"], self.pool_size), frame.height)
        return frame.sample(n=k, seed=a["params"]["seed"], shuffle=True)

    def _selection(self, n) -> pl.DataFrame:
        other = next(p for p, _, d in self.g.in_edges(n, data=True) if d["flow"] == "selection")
        return self._frames[other]

    def _op_intersect(self, n, a, frame, report):
        return frame.filter(pl.col("id").is_in(self._selection(n)["id"].implode()))

    def _op_union(self, n, a, frame, report):
        other = self._selection(n)
        extra = other.filter(~pl.col("id").is_in(frame["id"].implode()))
        return pl.concat([frame, extra], how="diagonal_relaxed")

    def _op_diverse(self, n, a, frame, report):
        p = a["params"]
        spec = reg.SAMPLERS[p["sampler"]]
        k = kernel_for("sampler", p["sampler"])
        budget = _size_rows(p["budget"], self.pool_size)
        if spec.needs_ranked and RANK_KEY in frame.columns:  # it visits in rank order: unranked rows are no candidates
            keyed = frame.filter(pl.col(RANK_KEY).is_not_null())
            if keyed.height < frame.height:
                report.notes.append(f"{frame.height - keyed.height} row(s) with a null ranking key are never visited")
            frame = keyed
        model = self._stage_model(n, report) if self._model_of(n) else None
        params = {q.name: p[q.name] for q in spec.params if q.name != "budget" and q.name in p}
        inputs = k.scored_inputs  # e.g. the candidates' embeddings, through the score cache
        for column, needs in inputs.items():
            frame = frame.with_columns(self._scored_input(needs(model), model, frame, report).alias(column))
        # a sampler that declares what it reads gets only that, under every engine (the Ray engine gathers just it)
        reads = k.columns_read(p)
        rows = frame if reads is None else frame.select(*inputs, *reads)
        keep = call_sampler(k, rows, model, budget, params, self.cfg.options())
        return frame[keep].drop(list(inputs))

    def _op_normalize(self, n, a, frame, report):
        column = a["params"]["column"]
        return frame.with_columns(self._normalized(n, a["params"], frame[column], report))

    def _normalized(self, n: str, p: dict, tags: pl.Series, report: StageReport) -> pl.Series:
        """InsTag's tag normalisation of a tags column's values (the rows here, in the frame's order):
        frequency cut, rule, semantic and (optionally) association aggregation; the report gives raw →
        normalised counts."""
        from tamis.runtime.instag import normalise_tags

        embed = None
        if self._model_of(n):  # semantic aggregation: embed(tags) with the stage's encoder
            from functools import partial

            from tamis.ops.embedding import sampler_embedding
            from tamis.runtime import embeddings

            model = self._stage_model(n, report)
            embed = partial(embeddings.embed, model, progress=False, pooling=sampler_embedding(model)[1]["pooling"])

        result = normalise_tags(tags.to_list(), min_freq=p["min_freq"], lower=p["lower"], stem=p["stem"],
                                embed=embed, threshold=p["threshold"], assoc_threshold=p.get("association"))
        report.tag_counts = dict(result.counts)
        report.notes.append("distinct tags: " + " → ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in result.counts.items()))
        return pl.Series(tags.name, result.rows, dtype=pl.List(pl.String))

    def _op_dedup(self, n, a, frame, report):
        p = a["params"]
        spec = reg.DEDUP_METHODS[p["method"]]
        k = kernel_for("dedup", p["method"])
        model = self._stage_model(n, report) if self._model_of(n) else None
        against = self._side_datasets(n).get("against")
        for column, needs in k.scored_inputs.items():  # e.g. the embeddings, through the score cache
            frame = frame.with_columns(self._scored_input(needs(model), model, frame, report).alias(column))
            if against is not None:
                against = against.with_columns(self._scored_input(needs(model), model, against, report).alias(column))
        params = {q.name: p[q.name] for q in spec.params if q.name in p}
        extra = {"options": self.cfg.options()} if k.wants_options else {}
        result = k.fn(frame, against, **params, **extra)
        keep = pl.Series(result.keep)
        if len(keep) != frame.height:
            raise TamisError(f"dedup `{k.name}` ({k.source}) returned {len(keep)} flags for {frame.height} rows")
        report_dedup(report, p, result, frame["id"], against["id"] if against is not None else None)
        return frame.filter(keep).drop(list(k.scored_inputs))

    def _scored_input(self, needs: tuple[str, dict], model, frame: pl.DataFrame, report: StageReport) -> pl.Series:
        """A scorer's main values for `frame`'s rows, for a kernel that reads them (a sampler's embeddings):
        through the score cache under the very key `score NAME using M` has, so neither recomputes the other's rows."""
        name, params = needs
        k = kernel_for("scorer", name)
        schema = k.result_schema(model, params)
        main = next(col for col, suffix in k.names.items() if suffix == "")
        compute = ScoreCall(k, model, params, replace(self.cfg.options(), progress=False))
        if k.cached:
            cols = self._cached_rows(k.cache_key(params, getattr(model, "fingerprint", None)), frame, report,
                                     schema, compute, {main: main})
            return cols[main]
        report.scored_rows += frame.height
        return pl.Series(main, self._compute_all(frame, compute)[main], dtype=schema[main])

    def _op_score(self, n, a, frame, report):
        p = a["params"]
        main = next(iter(a["columns_out"]))
        side = self._side_datasets(n)  # data parameters (anchors=…) and the `on` target, by role
        pool_rows = frame
        if "target" in side:  # the stage scores another dataset; the pool's rows pass through
            frame = side["target"]
        cols = self._score_frame(n, a, frame, side, report)
        if "target" in side:
            for col in cols.columns[1:]:
                self._foreign[col] = cols[col]
            # the target set's own fields, as `NAME.field` (e.g. influence(g, t, t.subtask)), row for row
            for f in frame.columns:
                if f not in reg.POOL_COLUMNS and not f.startswith("⟨"):
                    self._foreign[f"{main}.{f}"] = frame[f]
            report.histogram = _histogram(cols[main]) if cols[main].dtype.is_numeric() else None
            report.target, report.target_rows = p["target"], frame.height
            return pool_rows
        out = frame.join(cols, on="id", how="left", maintain_order="left")
        self._record_scores(cols)
        report.histogram = _histogram(out[main]) if out[main].dtype.is_numeric() else None
        return out

    def _score_frame(self, n: str, a: dict, frame: pl.DataFrame, side: dict[str, pl.DataFrame],
                     report: StageReport) -> pl.DataFrame:
        """Score stage `n`'s columns for `frame`'s rows (through the score cache when its kernel is
        cached): a frame of id and the stage's columns, row for row."""
        p = a["params"]
        spec = reg.SCORERS[p["scorer"]]
        k = kernel_for("scorer", p["scorer"])
        main = next(iter(a["columns_out"]))
        params = {q.name: p[q.name] for q in spec.params if q.name in p}
        params.update({role: rows for role, rows in side.items() if role != "target"})
        model = self._stage_model(n, report) if self._model_of(n) else None
        # a cached kernel's rows are counted on the stage's one bar (`_cached_rows`), not on a bar per chunk
        options = replace(self.cfg.options(), progress=False) if k.cached else self.cfg.options()
        names = {col: main + suffix for col, suffix in k.names.items()}
        inputs = k.scored_inputs  # e.g. a `cluster` scorer's embeddings, through the score cache
        for column, needs in inputs.items():
            frame = frame.with_columns(self._scored_input(needs(model), model, frame, report).alias(column))
        compute = ScoreCall(k, model, params, options)
        schema = k.result_schema(model, params)  # a vector's width is its model's
        if k.cached:
            cols = self._cached_rows(k.cache_key(params, getattr(model, "fingerprint", None)), frame, report,
                                     schema, compute, names)
        else:
            got = self._compute_all(frame, compute)
            cols = pl.DataFrame({"id": frame["id"], **{name: pl.Series(got[col], dtype=schema[col])
                                                       for col, name in names.items()}})
            report.scored_rows = frame.height
            if "reason" in got:
                report.skipped = dict(sorted(Counter(r for r in got["reason"] if r).items()))
        return cols

    def _recipe_columns(self, rows: pl.DataFrame, names: list[str], purpose: str) -> pl.DataFrame:
        """Columns of this recipe computed for other rows than the pool's (a fitted selector's features on
        the probes' dataset): a field the rows have, or the column a `score` stage produces, scored by that
        stage's kernel and model through the score cache (rows the pool shares are not scored twice)."""
        out = rows.select("id")
        producers: dict[str, list[str]] = {}
        for name in names:
            if name in rows.columns:
                out = out.with_columns(rows[name])
                continue
            node = next((m for m in self._order if self.g.nodes[m]["op"] == "score"
                         and not self.g.nodes[m]["params"].get("target") and name in self.g.nodes[m]["columns_out"]), None)
            if node is None:
                raise TamisError(f"{purpose}: feature {name!r} is neither a field of the rows nor a column that a "
                                 "`score` stage of the recipe produces")
            producers.setdefault(node, []).append(name)
        for node, cols in producers.items():
            a = self.g.nodes[node]
            report = StageReport(node, f"{a['label']} ({purpose})", rows.height, rows.height, 0.0)
            t0 = time.perf_counter()
            got = self._score_frame(node, a, rows, self._side_datasets(node), report)
            report.seconds = time.perf_counter() - t0
            self.stages.append(report)
            out = out.with_columns(got.select(cols))
        return out.select("id", *names)

    def _side_datasets(self, n: str) -> dict[str, pl.DataFrame]:
        """The other datasets a stage reads, by role ("target" for `on X`, else the parameter name)."""
        out: dict[str, pl.DataFrame] = {}
        for p, _, d in self.g.in_edges(n, data=True):
            if d["flow"] == "side":
                for role in d["roles"]:
                    out[role] = self._dataset(p)
        return out

    def _record_scores(self, cols: pl.DataFrame) -> None:
        new = [c for c in cols.columns if c != "id" and c not in self.scores.columns]
        if new:
            self.scores = self.scores.join(cols.select("id", *new), on="id", how="left", maintain_order="left")

    # ---- scores through the cache ---------------------------------------------------
    def _cached_rows(self, semantic: dict, frame: pl.DataFrame, report: StageReport, schema: dict,
                     compute, names: dict[str, str]) -> pl.DataFrame:
        """`frame`'s ids and result columns (renamed by `names`: result column → stage column),
        from the cache where present; `compute(chunk)` gives the rest chunk by chunk (a dict of
        lists in `schema`), each persisted as it is done. Rows are keyed by content, so rows
        with equal content are computed once. Past the content hashes, everything here works on
        frames (one join to resume, slices or gathers per chunk), never on a Python object per row."""
        from tamis.runtime.cache import fingerprint

        scores = self.cache.scores
        key = fingerprint(semantic)
        scores.describe(key, semantic)
        row_keys = self._row_keys(frame)
        distinct = row_keys.n_unique() == frame.height
        # one row per frame row, null where not cached
        values, found = scores.align(key, row_keys, schema, distinct=distinct)
        if torn := scores.torn_rows.get(key, 0):
            report.torn_rows = torn
            report.notes.append((f"{torn} row(s)" if torn > 0 else "a chunk of rows") + " cut off at the end of a "
                                "cache journal (a killed run's last chunk, or one still being written): computed again")
        row = "⟨row⟩"  # a name no result column can have
        missing = pl.DataFrame([row_keys]).with_row_index(row).filter(~found)
        if distinct:  # no content repeated (the usual case): rows are contents
            report.cached_rows = frame.height - missing.height
            todo = missing[row]
        else:  # counted once each; each missing content computed once, in first-seen order, from its last row
            report.cached_rows = row_keys.filter(found).n_unique()
            todo = missing.group_by("id", maintain_order=True).agg(pl.col(row).last())[row]
        done = self._compute_missing(key, frame, row_keys, todo, schema, report, compute)
        if done:  # the missing rows get the computed values; the rest keep the cached ones, in row order
            results = pl.concat(done, how="vertical")
            if results.height == missing.height:  # no content repeated: results are the missing rows, in order
                computed = results.insert_column(0, missing[row])
            else:
                computed = missing.join(results, on="id", how="left", maintain_order="left")
            values = (computed if not report.cached_rows else
                      pl.concat([values.with_row_index(row).filter(found), computed], how="vertical").sort(row)
                      ).drop(row)
        if "reason" in schema:
            reasons = values.get_column("reason").drop_nulls()
            if reasons.dtype == pl.String:
                reasons = reasons.filter(reasons != "")
            counts = reasons.value_counts(name="n").sort("reason")
            report.skipped = dict(zip(counts["reason"].to_list(), counts["n"].to_list()))
        return values.select([pl.col(col).alias(name) for col, name in names.items()]).insert_column(0, frame["id"])

    def _compute_missing(self, key: str, frame: pl.DataFrame, row_keys: pl.Series, todo: pl.Series, schema: dict,
                         report: StageReport, compute) -> list[pl.DataFrame]:
        """Compute `frame`'s rows at positions `todo` (their cache keys in `row_keys`), persisting each chunk
        under cache `key` as it is done; the results (an ``id`` column of row keys, then `schema`'s
        columns) in `todo`'s order. An engine that computes elsewhere overrides this."""
        dtypes = {"id": pl.String, **schema}
        done = []
        bar = self._stage_bar(report, total=report.cached_rows + len(todo))
        with bar, self.cache.scores.writer(key, sync_seconds=self.cfg.checkpoint_seconds) as out:
            start, size = 0, min(self.cfg.chunk_rows, 8)  # a small first chunk measures the rate
            while start < len(todo):
                idx = todo.slice(start, size)
                t0 = time.perf_counter()
                first = idx[0]
                if idx[-1] - first + 1 == len(idx) and idx.is_sorted():  # consecutive rows (a first run's)
                    chunk, ids = frame.slice(first, len(idx)), row_keys.slice(first, len(idx))
                else:  # a gather costs far more than a slice, per chunk
                    chunk, ids = frame[idx], row_keys.gather(idx)
                got = compute(chunk)
                if got.keys() == schema.keys():  # column by column: the same frame, in half the time
                    rows = pl.DataFrame([ids, *[pl.Series(c, got[c], dtype=t) for c, t in schema.items()]])
                else:  # Polars says what does not match
                    rows = pl.DataFrame({"id": ids, **got}, schema=dtypes)
                out.put(rows, check=False)  # persisted chunk by chunk (ids: distinct hashes): a kill loses one
                done.append(rows)
                report.scored_rows += len(idx)
                bar.update(len(idx))
                start += len(idx)
                size = _next_chunk(len(idx), time.perf_counter() - t0, self.cfg.chunk_rows,
                                   self.cfg.checkpoint_seconds)
        return done

    def _compute_all(self, frame: pl.DataFrame, compute) -> dict:
        """An uncached scorer's result columns for every row of `frame` (an engine may override)."""
        return compute(frame)

    def _row_keys(self, frame: pl.DataFrame) -> pl.Series:
        """The score-cache row keys of `frame` (`row_content_keys`: a hash of each row's content), hashed
        once per run: a later stage over the same rows, or some of them, reuses them (matched by id, and
        used only where the rows' content is the one hashed: a dataset's ids may repeat another's)."""
        from tamis.runtime.cache import CONTENT_COLUMNS, row_content_keys

        content = [c for c in CONTENT_COLUMNS if c in frame.columns]
        known = self._hashed
        if known is not None and set(known.columns) == {"id", "⟨key⟩", *content}:
            if known.height == frame.height and known.select("id", *content).equals(frame.select("id", *content)):
                return known["⟨key⟩"].rename("id")
            if frame.height < known.height and frame["id"].n_unique() == frame.height:
                got = frame.select("id", *content).join(known, on="id", how="left", maintain_order="left",
                                                        suffix="⟨known⟩")
                same = got["⟨key⟩"].is_not_null().all() and all(
                    got[c].eq_missing(got[c + "⟨known⟩"]).all() for c in content)
                if same:
                    return got["⟨key⟩"].rename("id")
        keys = row_content_keys(frame)
        if known is None or frame.height >= known.height:
            self._hashed = frame.select("id", *content).with_columns(keys.alias("⟨key⟩"))
        return keys

    def _stage_bar(self, report: StageReport, total: int):
        """One bar per stage: rows done of rows to do, cached rows counted at once, "[2/4] label"."""
        from tqdm.auto import tqdm

        where = f"[{self._order.index(report.node) + 1}/{len(self._order)}] " if report.node in self._order else ""
        label = report.label if len(report.label) <= 48 else report.label[:47] + "…"
        return tqdm(total=total, initial=report.cached_rows, unit="row", desc=where + label, smoothing=0.1,
                    disable=not self.cfg.progress)

    # ---- models and datasets, built by their kernels on first use ---------------------------
    def _stage_model(self, n: str, report: StageReport):
        """The model a stage uses, built (or warmed up) on first use; that time is the stage's model_seconds."""
        t0 = time.perf_counter()
        model = self._model(self._model_of(n))
        report.model_seconds = time.perf_counter() - t0
        return model

    def _model(self, node: str):
        if node not in self._models:
            built = self._build(node, "model")
            self._models[node] = built.model
            self.model_info[node] = built.info
            if built.training is not None:
                self.model_info[node + ":training"] = built.training
        return self._models[node]

    def _dataset(self, node: str) -> pl.DataFrame:
        if node not in self._frames and self.g.nodes[node]["kind"] == "op":  # a selection, not run yet
            raise TamisError(f"selection `{self.g.nodes[node]['label']}` is used before it is computed")
        if node not in self._frames:
            maker = self._frame_makers.get(node)
            self._frames[node] = maker() if maker is not None else self._build(node, "data")
        return self._frames[node]

    def _build(self, node: str, family: str):
        a = self.g.nodes[node]
        k = kernel_for(family, a["ctor"] if family == "model" else a["source"])
        env = BuildEnv(label=a["label"], options=self.cfg.options(), pool=self._frames["data:pool"],
                       artifacts=self.cache.artifacts,
                       bases=[self._lazy(p) for p in self._preds(node, "base")],
                       inputs=[self._lazy(p) for p in self._preds(node, "train", "data")],
                       models=[self._lazy(p) for p in self._preds(node, "model")],
                       labels=[self._lazy(p) for p in self._preds(node, "labels")],
                       evaluation=[self._lazy(p) for p in self._preds(node, "eval")],
                       columns=lambda rows, names: self._recipe_columns(rows, list(names), f"features of {a['label']}"),
                       map_probes=self._probe_map(node), pool_key=self._pool_fingerprint)
        built = k.fn(a["params"], env)
        if env.report:  # what a data kernel says of the dataset it built (evolve's counts), for the run report
            self.model_info[f"{node}:dataset"] = {"label": a["label"], **env.report}
        return built

    def _pool_fingerprint(self) -> str:
        """The pool's `data_fingerprint`, hashed once a run (an engine that does not hold the pool sets
        `_pool_key` itself)."""
        if self._pool_key is None:
            from tamis.runtime.cache import data_fingerprint

            self._pool_key = self._pool_hasher() if self._pool_hasher else data_fingerprint(self._frames["data:pool"])
        return self._pool_key

    def _probe_map(self, node: str):
        """How model node `node` runs independent probe trainings (a `tamis.runtime.probes.ProbeMap`);
        None: one after another in this process. An engine that trains elsewhere overrides this."""
        return None

    def _preds(self, node: str, *flows: str) -> list[str]:
        return [p for p, _, d in self.g.in_edges(node, data=True) if d["flow"] in flows]

    def _lazy(self, node: str) -> Lazy:
        a = self.g.nodes[node]
        if a["kind"] == "model":
            return Lazy(node, a["ctor"], a["label"], a["params"], lambda: self._model(node))
        if a["kind"] == "op":  # a selection (`select s = …`) used as a dataset: its rows, internal columns dropped
            return Lazy(node, "selection", a["label"], a["params"],
                        lambda: self._dataset(node).drop(INTERNAL_COLUMNS, strict=False))
        return Lazy(node, a["source"], a["label"], a["params"], lambda: self._dataset(node))


# --------------------------------------------------------------------------- calling kernels
# Plain functions of (kernel, rows, model, parameters): what any engine calls on its workers.


@dataclass(frozen=True)
class ScoreCall:
    """A scorer bound to its model, parameters and options: `call(rows)` scores rows (`call_scorer`).
    A value, not a closure, so an engine can see what it runs and ship it to its workers."""

    kernel: Kernel
    model: Any
    params: dict
    options: ExecOptions

    def __call__(self, rows: pl.DataFrame) -> dict:
        return call_scorer(self.kernel, rows, self.model, self.params, self.options)


def call_scorer(k: Kernel, rows: pl.DataFrame, model, params: dict, options: ExecOptions) -> dict:
    """Run a scorer kernel on `rows`: its result columns, each checked to hold one value per row."""
    extra = {"options": options} if k.wants_options else {}
    got = k.fn(rows, model, **params, **extra)
    missing = [c for c in k.schema if c not in got]
    if missing:
        raise TamisError(f"scorer `{k.name}` ({k.source}) returned no column(s) {', '.join(missing)}")
    for col in k.schema:
        if len(got[col]) != rows.height:
            raise TamisError(f"scorer `{k.name}` ({k.source}) returned {len(got[col])} value(s) in {col!r} "
                             f"for {rows.height} row(s)")
    return got


def call_sampler(k: Kernel, rows: pl.DataFrame, model, budget: int, params: dict, options: ExecOptions) -> list[int]:
    """Run a sampler kernel: the positions of the kept rows, in the order picked, checked."""
    extra = {"options": options} if k.wants_options else {}
    keep = [int(i) for i in k.fn(rows, model, budget, **params, **extra)]
    if any(not 0 <= i < rows.height for i in keep) or len(set(keep)) != len(keep):
        raise TamisError(f"sampler `{k.name}` ({k.source}) must return distinct row positions in [0, {rows.height})")
    if len(keep) > budget:
        raise TamisError(f"sampler `{k.name}` ({k.source}) returned {len(keep)} rows for a budget of {budget}")
    return keep

"""Cheap recipes on Ray with a driver that never holds the pool.

A recipe whose operators are all of the kinds below runs as a chain of Ray Data stages over the pool
read by `tamis.runtime.ray_pool` (each row with its pool position, POS); the driver holds only
statistics, ranking keys and positions:

* `score` with a row-wise, uncached kernel without a model (length, MTLD, a plug-in's text statistic):
  `map_batches` calling `call_scorer`, as the local engine does;
* `let`, `where`, `rank by`: the recipe's Polars expression per batch; the aggregates `pct`, `zscore`,
  `minmax` from distributed statistics (per-block count/mean/M2 merged, as Chan et al.; per-block
  min/max; `pct` from the sorted values of its argument, 8 bytes a row gathered and sent back once);
* `top N` after a `rank` (or on the pool's order): a distributed top-k, each block's best N rows by
  (key, position), then a merge of positions and keys only on the driver, ties broken by position as
  the local engine's stable sort breaks them;
* the selection and the scores are written by the workers (`RayFrame`), in order, and joined into the
  output file by the CLI's atomic writer.

Rows are never dropped from the dataset: `where` and `top` clear a row's ALIVE flag, so the scores of
every pool row stay in one dataset (null past the stage that dropped the row, as the local engine's).
A `rank` with no `top` after it gets its whole order from positions and keys gathered to the driver
(16 B a row). A model scorer's model is built from its files on each actor, or is a warmup trained on a
sample of the pool: that sample is drawn on Ray (`tamis.runtime.ray_warmup`) and the warmup trained on the
driver. Anything else (a model trained on another dataset of the run, a sampler that may read any column,
dedup, per-group aggregates) raises NeedsDriver at plan time, and the engine runs the driver's path
instead.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

import networkx as nx
import polars as pl

from tamis.dsl import ast
from tamis.ops.kernel import kernel_for
from tamis.runtime.executor import RANK_KEY, STAGES, RunResult, ScoreCall, StageReport, _size_rows
from tamis.runtime.ray_models import SELF_CONTAINED
from tamis.runtime.ray_pool import POS, NeedsDriver, batch_frame, pool_spec, read_pool
from tamis.runtime.ray_warmup import warmup_sample_node

ALIVE = "⟨alive⟩"  # still in the recipe's frame (not dropped by a `where` or `top`)
TODO = "⟨todo⟩"  # a scoring stage's rows to compute (alive, and not in the score cache)
ROWKEY = "⟨row key⟩"  # a row's score-cache key (its content hash), beside it during a cached stage
ORDER = "⟨order⟩"  # the selection's order (a `top`'s rank), else POS
INTERNAL = (POS, ALIVE, ORDER, RANK_KEY)
AGGREGATES = ("pct", "zscore", "minmax")
STREAMED_DEDUP = ("exact", "semantic")  # minhash reads every row's text on the driver
TEXT_HASH = "⟨text hash⟩"


# --------------------------------------------------------------------------- planning


def stream_plan(g: nx.DiGraph) -> list[str]:
    """The operators of a recipe the streamed path runs, in order; NeedsDriver (why) if it cannot."""
    needed = nx.ancestors(g, g.graph["output"])
    ops = [n for n in nx.topological_sort(g) if n in needed and g.nodes[n]["kind"] == "op"]
    prev = "data:pool"
    ranked = topped = False
    for n in ops:
        a = g.nodes[n]
        flows = {d["flow"]: p for p, _, d in g.in_edges(n, data=True)}
        if "model" in flows and not (_from_files(g, flows["model"]) or warmup_sample_node(g, flows["model"])):
            raise NeedsDriver(f"`{a['label']}` uses a model trained on the run's data (only models built from "
                              "their files, and warmups of them on a sample of the pool, stream)")
        if flows.get("data") != prev or set(flows) - {"data", "model"}:
            raise NeedsDriver(f"`{a['label']}` reads another dataset or selection")
        op, p = a["op"], a["params"]
        if op == "score":
            k = kernel_for("scorer", p["scorer"])
            if k is None or k.mode != "rowwise" or k.scored_inputs or p.get("target"):
                raise NeedsDriver(f"`{a['label']}` is not a row-wise scorer (it scores all rows at once, or other "
                                  "scores are its input)")
        elif op == "diverse":
            k = kernel_for("sampler", p["sampler"])
            if k is None or k.columns_read(p) is None or p.get("per") is not None:
                raise NeedsDriver(f"`{a['label']}` reads more of its candidates than ranking keys and embeddings, "
                                  "or works per group")
            topped = True  # a selection in its own order, as `top` makes one
        elif op == "dedup":
            if p["method"] not in STREAMED_DEDUP:
                raise NeedsDriver(f"`{a['label']}`: {p['method']} dedup runs on the driver")
        elif op == "sample":
            topped = True  # a selection in its own (random) order
        elif op == "normalize":
            pass  # the tags column gathered, normalised on the driver, sent back
        elif "model" in flows:
            raise NeedsDriver(f"`{a['label']}` ({op}) runs on the driver")
        elif op in ("let", "where", "rank", "topk"):
            _aggregates(a.get("expr"), a["label"])
            if p.get("per") is not None and op != "topk":
                raise NeedsDriver(f"`{a['label']}` works per group")
            if op == "rank":
                if ranked or topped:
                    raise NeedsDriver(f"`{a['label']}`: a second ranking")
                ranked = True
            if op == "topk":
                topped = True
        elif op == "top":
            if topped:
                raise NeedsDriver(f"`{a['label']}` comes after another top")
            topped = True
        else:
            raise NeedsDriver(f"`{a['label']}` ({op}) runs on the driver")
        prev = n
    out = next(p for p, _, d in g.in_edges(g.graph["output"], data=True) if d["flow"] == "data")
    if out != prev:
        raise NeedsDriver("the output is not the last operator")
    assert all(g.nodes[n]["op"] in STAGES for n in ops)
    return ops


def _from_files(g: nx.DiGraph, model: str) -> bool:
    """Whether a model node is built from model files alone (pfm, hf, api, encoder; a proxy standing in
    with one of them), so each actor can build it again: nothing trained on the run's data."""
    a = g.nodes[model]
    preds = [p for p, _, d in g.in_edges(model, data=True)]
    if a.get("ctor") in SELF_CONTAINED:
        return not preds
    return a.get("ctor") == "proxy" and bool(preds) and all(_from_files(g, p) for p in preds)


def _aggregates(e: ast.Expr | None, label: str) -> list[ast.Call]:
    """The aggregate calls of an expression (none nested in another, none per group)."""
    out: list[ast.Call] = []

    def walk(x: Any, inside: bool) -> None:
        if isinstance(x, ast.Call):
            k = kernel_for("function", x.func)
            agg = k is not None and k.mode == "global"
            if agg and (x.func not in AGGREGATES or x.per or inside):
                raise NeedsDriver(f"`{label}`: {x.unparse()} (a per-group or nested aggregate)")
            if agg:
                out.append(x)
            for arg in x.args:
                walk(arg, inside or agg)
        for child in ("left", "right", "operand"):
            if isinstance(getattr(x, child, None), ast.Expr):
                walk(getattr(x, child), inside)

    walk(e, False)
    return out


def _substitute(e: ast.Expr, names: dict[int, str]) -> ast.Expr:
    """The expression with each aggregate call (by id) replaced by a column name."""
    if id(e) in names:
        return ast.Name(id=names[id(e)])
    update = {}
    if isinstance(e, ast.Call):
        update["args"] = tuple(_substitute(a, names) for a in e.args)
    for child in ("left", "right", "operand"):
        if isinstance(getattr(e, child, None), ast.Expr):
            update[child] = _substitute(getattr(e, child), names)
    return e.model_copy(update=update) if update else e


# --------------------------------------------------------------------------- running


class StreamRun:
    """One streamed run of `ops` (see the module note) for a RayExecutor `ex`."""

    def __init__(self, ex, ops: list[str]) -> None:
        self.ex, self.ops = ex, ops
        self.recorded: list[str] = []  # columns of the scores output, in order
        self.desc = False
        self.ds: Any = None  # the dataset as the current stage receives it (every pool row, flagged)
        self.scored_as: dict[str, str] = {}  # a scores column a later stage changed -> where its scored values are
        self.pool_columns: list[str] = []  # the pool's own columns (POS aside)

    def run(self) -> RunResult:
        from tqdm.auto import tqdm

        from tamis.runtime.executor import check_runnable

        ex = self.ex
        check_runnable(ex.g, ex.cfg)
        started = time.perf_counter()
        spec = pool_spec(ex.cfg.pool, ex.cfg.pool_format, ex.cfg.columns)
        # no `preserve_order`: positions come from the file, the output's parts are named by their order
        bar = tqdm(total=len(self.ops) + 1, unit="stage", desc="ray: read the pool", disable=not ex.cfg.progress)
        t0 = time.perf_counter()
        with bar:
            return self._stages(bar, spec, started, t0)

    def _stages(self, bar, spec, started: float, t0: float) -> RunResult:
        import ray

        from tamis.runtime.data import LoadReport
        from tamis.runtime.executor import check_pool_fields
        from tamis.runtime.ray_engine import RayEngineError, _cause, _ship_plugin_code

        ex = self.ex
        ds, n = read_pool(spec, ex.cfg.limit)
        bar.update(1)
        if n == 0:
            raise NeedsDriver("no rows (the driver's loader says why)")
        check_pool_fields(ex.g, _schema(ds), ex.cfg.pool)
        ex.pool_size = n
        ex._order = self.ops
        self.pool_columns = [c for c in ds.schema().names if c != POS]
        # the driver never holds the pool: the models that stream are built from their files (`_from_files`)
        # and never read it, so their build environment gets an empty frame in its place; a warmup's key and
        # sample come from Ray (`ray_warmup`), when its kernel asks for them
        ex._frames["data:pool"] = pl.DataFrame()
        self._warmups()
        _ship_plugin_code()
        ex.ray_stages.append({"stage": "pool", "kernel": "read", "rows": n, "workers": "tasks", "where": "ray",
                              "seconds": round(time.perf_counter() - t0, 3)})
        ds = ds.map_batches(_alive, batch_format="pyarrow").materialize()
        alive = n
        for node in self.ops:
            a = ex.g.nodes[node]
            bar.set_description(f"ray: {a['label'][:40]}")
            t0 = time.perf_counter()
            report = StageReport(node, a["label"], alive, 0, 0.0)
            self.ds = ds
            planned = len(ex.ray_stages)
            try:
                ds = getattr(self, f"_op_{a['op']}")(a, ds, report).materialize()
            except ray.exceptions.RayError as err:
                raise RayEngineError(f"`{a['label']}` failed on a Ray worker: {_cause(err)}") from None
            alive = _count_alive(ds)
            report.rows_out, report.seconds = alive, time.perf_counter() - t0
            ex.stages.append(report)
            bar.update(1)
            if len(ex.ray_stages) == planned:  # an operator that gathers records its own plan (what, where)
                ex.ray_stages.append({"stage": a["label"], "kernel": a["op"], "rows": report.rows_in,
                                      "workers": "tasks", "where": "ray"})
        if RANK_KEY in ds.schema().names and ORDER not in ds.schema().names:  # a `rank` with no `top` after it
            ds = self._whole_order(ds).materialize()
        hidden = set(self.scored_as.values())
        cols = [c for c in ds.schema().names if c not in INTERNAL and c not in hidden]
        selected = RayFrame(ds, ORDER if ORDER in ds.schema().names else POS, cols, alive, only_alive=True)
        scored = ds.map_batches(_restore, fn_kwargs={"scored_as": self.scored_as}, batch_format="pyarrow") \
            if self.scored_as else ds
        scores = RayFrame(scored, POS, ["id", *self.recorded], n, only_alive=False)
        load = LoadReport(path=ex.cfg.pool, format=spec.container)
        load.rows_loaded = load.records_read = n
        load.fields = {k: str(v) for k, v in _schema(ds).items() if k in self.pool_columns
                       and k not in ("id", "instruction", "input", "output") and k not in self.recorded}
        return RunResult(selected, scores, ex.stages, load.to_dict(), ex.model_info, time.perf_counter() - started)

    def _warmups(self) -> None:
        """Warmups of the run's models draw their sample and hash the pool on Ray (`ray_warmup`)."""
        from tamis.runtime import ray_warmup

        ex = self.ex
        for node in ex.g:
            sample = warmup_sample_node(ex.g, node) if ex.g.nodes[node]["kind"] == "model" else None
            if sample is not None:
                ex._frame_makers[sample] = lambda s=sample: ray_warmup.sample_rows(self, s)
        ex._pool_hasher = lambda: ray_warmup.pool_key(self)

    # ---- row-wise stages -------------------------------------------------------------
    def _op_score(self, a, ds, report):
        from tamis.dsl import registry as reg
        from tamis.runtime.executor import _histogram

        p = a["params"]
        k = kernel_for("scorer", p["scorer"])
        spec = reg.SCORERS[p["scorer"]]
        params = {q.name: p[q.name] for q in spec.params if q.name in p}
        main = next(iter(a["columns_out"]))
        names = {col: main + suffix for col, suffix in k.names.items()}
        self.recorded += [n for n in names.values() if n not in self.recorded]
        ds = self._scored(ds, report, k, params, names, a["label"], self._model(report)).materialize()
        values = _gather(ds, [main])[main]  # the score's values (8 B a row), for the report's histogram
        report.histogram = _histogram(values) if values.dtype.is_numeric() else None
        return ds

    def _model(self, report):
        """The stage's model, built on the driver (its fingerprint keys the cache, its recipe goes to the
        actors; the time is the stage's model_seconds), or None."""
        return self.ex._stage_model(report.node, report) if self.ex._model_of(report.node) else None

    def _scored(self, ds, report, k, params: dict, names: dict, label: str, model):
        """`ds` with scorer `k`'s columns (renamed by `names`) for the alive rows: Ray tasks, or an actor
        pool building the stage's model (`model`, built on the driver) once per actor. A cached kernel's rows are looked up in the score
        cache block by block first (the driver reads the key's cached ids and values once: no pool text),
        and each scoring batch is written to the cache by its worker, so a killed run resumes with every
        finished batch."""
        import ray
        from dataclasses import replace

        from tamis.runtime.cache import fingerprint
        from tamis.runtime.ray_engine import _BatchSpec, _gpus_and_actors

        ex = self.ex
        model_node = ex._model_of(report.node)
        schema = k.result_schema(model, params)
        call = ScoreCall(k, None, params, replace(ex.cfg.options(), progress=False))
        key = None
        if k.cached and not ex.cache.disabled:
            semantic = k.cache_key(params, getattr(model, "fingerprint", None))
            key = fingerprint(semantic)
            ex.cache.scores.describe(key, semantic)
            cached = ex.cache.scores.stored(key, schema)  # ids and values only (40 B + the values a row)
            # as Arrow: the object store hands each block task the same buffers (zero-copy), not a pickle
            ds = ds.map_batches(_lookup_batch, fn_kwargs={"cached": ray.put(cached.to_arrow()), "schema": schema,
                                                          "names": names},
                                batch_format="pyarrow", batch_size=None).materialize()
        # rows to score: those the lookup did not find, else every alive row (no extra pass over the data)
        flag = TODO if key is not None else ALIVE
        todo = _count(ds, TODO) if key is not None else report.rows_in
        report.cached_rows, report.scored_rows = report.rows_in - todo, todo
        plan = {"stage": label, "node": report.node, "kernel": k.name, "rows": todo, "where": "ray",
                "cached_rows": report.cached_rows}
        if todo:
            bspec = _BatchSpec(call, schema, str(ex.cache.scores.root) if key else None, key, ex.cfg.checkpoint_seconds)
            if model_node is None:
                ds = ds.map_batches(_score_batch, fn_kwargs={"spec": bspec, "names": names, "flag": flag},
                                    batch_format="pyarrow", num_cpus=k.resources.cpus)
                plan["workers"] = "tasks"
            else:
                from tamis.runtime.ray_models import recipe_for

                recipe = recipe_for(ex, model_node)
                gpus, size, memory = _gpus_and_actors(ex, k, model_node)
                ds = ds.map_batches(_StreamScoreActor, fn_constructor_args=(bspec, names, flag, recipe,
                                                                            str(ex.cache.artifacts.root), bool(gpus)),
                                    batch_format="pyarrow", batch_size=max(1, ex.cfg.chunk_rows),
                                    compute=ray.data.ActorPoolStrategy(size=size), num_cpus=k.resources.cpus,
                                    num_gpus=gpus, **({"memory": memory} if memory else {}))
                plan.update(workers=f"{size} actor(s)", gpus_per_actor=gpus, model=recipe.describe())
        else:
            plan["workers"] = "none (every row cached)"
        ex.ray_stages.append(plan)
        if key is None:
            return ds
        return ds.map_batches(_drop, fn_kwargs={"cols": [TODO, ROWKEY]}, batch_format="pyarrow")

    def _op_diverse(self, a, ds, report):
        """A sampler over the alive rows: their embeddings computed (and cached) on Ray as a score stage
        computes them, then only positions, ranking keys and embeddings gathered to the driver, in the
        order the local engine's frame has them; the sampler runs there and its picks go back as `top`'s
        do."""
        from tamis.dsl import registry as reg
        from tamis.runtime.executor import call_sampler

        ex = self.ex
        p = a["params"]
        spec = reg.SAMPLERS[p["sampler"]]
        k = kernel_for("sampler", p["sampler"])
        budget = _size_rows(p["budget"], ex.pool_size)
        model = self._model(report)
        ds, made = self._scored_inputs(ds, report, k, model, a["label"])
        cand, keys = self._candidates(ds, [*k.scored_inputs, *k.columns_read(p)])
        if spec.needs_ranked and RANK_KEY in keys:  # it visits in rank order: unranked rows are no candidates
            keyed = cand.filter(pl.col(RANK_KEY).is_not_null())
            if keyed.height < cand.height:
                report.notes.append(f"{cand.height - keyed.height} row(s) with a null ranking key are never visited")
            cand = keyed
        params = {q.name: p[q.name] for q in spec.params if q.name != "budget" and q.name in p}
        keep = call_sampler(k, cand.drop(POS, *keys), model, budget, params, ex.cfg.options())
        ex.ray_stages.append({"stage": a["label"], "node": report.node, "kernel": k.name, "rows": cand.height,
                              "workers": "driver", "where": "driver (positions, ranking keys and "
                              + ", ".join(c.strip("⟨⟩") for c in k.scored_inputs) + " of the candidates)"})
        ds = _send_order(ds, cand[keep])
        return ds.map_batches(_drop, fn_kwargs={"cols": made}, batch_format="pyarrow")

    def _scored_inputs(self, ds, report, k, model, label: str):
        """`ds` with global kernel `k`'s scored inputs (a sampler's or a dedup's embeddings) computed on Ray as
        a score stage computes them, through the score cache; and every column that added (to drop after)."""
        made: list[str] = []
        for column, needs in k.scored_inputs.items():
            name, sparams = needs(model)
            sk = kernel_for("scorer", name)
            names = {col: column + suffix for col, suffix in sk.names.items()}
            made += list(names.values())
            ds = self._scored(ds, report, sk, sparams, names, label, model).materialize()
        return ds, made

    def _candidates(self, ds, cols: list[str]) -> tuple[pl.DataFrame, list[str]]:
        """(POS, the order keys and `cols` of the alive rows, gathered in the order the local engine's frame
        has them: a top's order, else the rank's, else the pool's; the order keys present)."""
        keys = [c for c in (ORDER, RANK_KEY) if c in ds.schema().names]
        cand = _gather(ds, [POS, *keys, *cols])
        if ORDER in keys:  # after a top (or a sampler): its order
            return cand.sort(ORDER), keys
        return (self._rank_order(cand) if RANK_KEY in keys else cand.sort(POS)), keys

    def _op_sample(self, a, ds, report):
        """`sample N [per G]`: positions (and group values) gathered in the frame's order, and Polars' seeded
        sample of them, as the local engine samples its frame; the picks go back as a top's do."""
        p = a["params"]
        cand, keys = self._candidates(ds, [p["per"]] if "per" in p else [])
        if "per" in p:
            picked = self.ex._per_group(p, cand.sample(fraction=1.0, seed=p["seed"], shuffle=True), report)
        else:
            picked = cand.sample(n=min(_size_rows(p["size"], self.ex.pool_size), cand.height), seed=p["seed"],
                                 shuffle=True)
        self.ex.ray_stages.append({"stage": a["label"], "node": report.node, "kernel": "sample", "rows": cand.height,
                                   "workers": "driver", "where": "driver (positions" + (", group values" if "per" in p
                                                                                     else "") + " only)"})
        return _send_order(ds, picked)

    def _op_dedup(self, a, ds, report):
        """`dedup exact` and `dedup semantic`, the local engine's rule (in the frame's order, the first row of
        each group keeps) on what the driver gathers: for exact, a 128-bit hash of each row's normalised text
        (≈ 40 B a row), then the texts of the rows whose hash another row shares, grouped by the text itself
        as locally (so a hash collision can never merge rows); for semantic, the embeddings, computed on Ray
        through the score cache as a sampler's are."""
        import ray

        from tamis.dsl import registry as reg
        from tamis.runtime import dedup
        from tamis.runtime.executor import report_dedup

        ex = self.ex
        p = a["params"]
        k = kernel_for("dedup", p["method"])
        made: list[str] = []
        if p["method"] == "exact":
            hashed = ds.map_batches(_text_hash_batch, fn_kwargs={"field": p["field"]}, batch_format="pyarrow")
            cand, _ = self._candidates(hashed, [TEXT_HASH])
            shared = cand.filter(pl.col(TEXT_HASH).is_not_null() & (pl.len().over(TEXT_HASH) > 1))[POS]
            rows = _gather(ds.map_batches(_text_batch, fn_kwargs={"field": p["field"], "positions": ray.put(shared)},
                                          batch_format="pyarrow"), [POS, "id", "⟨text⟩"])
            rows = cand.select(POS).join(rows, on=POS, how="inner", maintain_order="left")  # the frame's order
            result = dedup.exact(rows["⟨text⟩"])
            where = "driver (positions and text hashes; the texts of rows sharing a hash)"
        else:
            ds, made = self._scored_inputs(ds, report, k, self._model(report), a["label"])
            rows, _ = self._candidates(ds, ["id", *k.scored_inputs])
            spec = reg.DEDUP_METHODS[p["method"]]
            params = {q.name: p[q.name] for q in spec.params if q.name in p}
            extra = {"options": ex.cfg.options()} if k.wants_options else {}
            result = k.fn(rows.drop(POS, ORDER, RANK_KEY, strict=False), None, **params, **extra)
            where = "driver (positions, ids and " + ", ".join(c.strip("⟨⟩") for c in k.scored_inputs) + ")"
        report_dedup(report, p, result, rows["id"], None)
        ex.ray_stages.append({"stage": a["label"], "node": report.node, "kernel": f"{p['method']} dedup",
                              "rows": report.rows_in, "workers": "driver", "where": where})
        removed = rows.filter(~pl.Series(result.keep))[POS]
        return ds.map_batches(_remove, fn_kwargs={"removed": ray.put(removed), "cols": made},
                              batch_format="pyarrow")

    def _op_normalize(self, a, ds, report):
        """`normalize tags`: the alive rows' tags (lists of a few short strings, as a score's values)
        gathered in the frame's order, normalised on the driver by the local engine's own code (an encoder
        for semantic aggregation built there: it embeds the distinct tags, not the rows), and sent back. The
        scores output keeps the tags as scored, as locally: the scored values stay in a hidden column."""
        import ray

        column = a["params"]["column"]
        cand, _ = self._candidates(ds, [column])
        new = self.ex._normalized(report.node, a["params"], cand[column], report)
        hide = column in self.recorded and column not in self.scored_as
        if hide:
            self.scored_as[column] = f"⟨scored⟩{column}"
        self.ex.ray_stages.append({"stage": a["label"], "node": report.node, "kernel": "normalize", "rows": cand.height,
                                   "workers": "driver", "where": f"driver (positions and the {column} column)"})
        return ds.map_batches(_replace, fn_kwargs={"values": ray.put(pl.DataFrame([cand[POS], new])),
                                                   "column": column, "keep_as": self.scored_as[column] if hide else None},
                              batch_format="pyarrow")

    def _op_let(self, a, ds, report):
        name = a["params"]["name"]
        if name not in self.recorded:
            self.recorded.append(name)
        return ds.map_batches(_expr_batch, fn_kwargs={"expr": self._bound(a, ds), "how": ("let", name)},
                              batch_format="pyarrow")

    def _op_where(self, a, ds, report):
        return ds.map_batches(_expr_batch, fn_kwargs={"expr": self._bound(a, ds), "how": ("where", None)},
                              batch_format="pyarrow")

    def _op_rank(self, a, ds, report):
        self.desc = a["params"]["order"] == "desc"
        return ds.map_batches(_expr_batch, fn_kwargs={"expr": self._bound(a, ds), "how": ("rank", None)},
                              batch_format="pyarrow")

    def _op_topk(self, a, ds, report):
        return self._op_top(a, self._op_rank(a, ds, report).materialize(), report)

    def _op_top(self, a, ds, report):
        """The distributed top-k: each block's best `want` (position, key), merged on the driver."""
        if a["params"].get("per") is not None:
            return self._top_per_group(a, ds, report)
        want = _size_rows(a["params"]["size"], self.ex.pool_size)
        ranked = RANK_KEY in ds.schema().names
        parts = [pl.from_arrow(b) for b in ds.map_batches(_block_top, fn_kwargs={"want": want, "desc": self.desc,
                                                                                  "ranked": ranked},
                                                          batch_format="pyarrow", batch_size=None).iter_batches(
                                                              batch_size=None, batch_format="pyarrow")]
        empty = pl.DataFrame(schema={POS: pl.Int64, **({RANK_KEY: pl.Float64} if ranked else {})})
        got = pl.concat([empty, *parts], how="vertical_relaxed")
        got = self._rank_order(got) if ranked else got.sort(POS)
        picked = got.head(want)
        if picked.height < want and ranked:
            unkeyed = report.rows_in - _count_keyed(ds)
            if unkeyed:
                report.notes.append(f"budget {want} rows, {picked.height} picked: {unkeyed} row(s) with a null ranking "
                                    "key (a skipped score, or an expression over one) are never picked")
        self.ex.ray_stages.append({"stage": a["label"], "kernel": "top-k merge", "rows": got.height,
                                   "workers": "driver", "where": "driver (positions and keys only)"})
        return _send_order(ds, picked)

    def _top_per_group(self, a, ds, report):
        """`top N per G`: positions, ranking keys and group values of the alive rows gathered (the group
        column's values, not the rows), put in pick order as the local frame is, and the local engine's
        own per-group rule (`_per_group`: quotas, each group's first rows) applied to them there."""
        p = a["params"]
        ranked = RANK_KEY in ds.schema().names
        cand = _gather(ds, [POS, *([RANK_KEY] if ranked else []), p["per"]])
        if ranked:  # rows without a key are never picked, as locally
            cand = self._rank_order(cand)
            keyed = cand.filter(pl.col(RANK_KEY).is_not_null())
            if keyed.height < cand.height:
                report.notes.append(f"{cand.height - keyed.height} row(s) with a null ranking key "
                                    "(a skipped score, or an expression over one) are never picked")
            cand = keyed
        else:
            cand = cand.sort(POS)
        self.ex.ray_stages.append({"stage": a["label"], "kernel": "per-group top", "rows": cand.height,
                                   "workers": "driver", "where": "driver (positions, keys and group values only)"})
        return _send_order(ds, self.ex._per_group(p, cand, report))

    def _whole_order(self, ds):
        """A `rank` with no `top` after it: the whole ranking. Positions and keys only (16 B a row) are
        gathered and sorted on the driver as the local engine's stable sort sorts (nulls last, ties in
        pool order), and each row's place goes back to it as a top's picks do (every row stays)."""
        got = self._rank_order(_gather(ds, [POS, RANK_KEY]))
        self.ex.ray_stages.append({"stage": "the ranking's whole order", "kernel": "sort", "rows": got.height,
                                   "workers": "driver", "where": "driver (positions and keys only)"})
        return _send_order(ds, got)

    def _rank_order(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Rows (POS, RANK_KEY, …) in the rank's order as the local engine's stable sort puts them: by key,
        ties in pool order, null keys last."""
        return frame.sort([RANK_KEY, POS], descending=[self.desc, False], nulls_last=True)

    # ---- aggregates ------------------------------------------------------------------
    def _bound(self, a, ds) -> tuple[ast.Expr, list[tuple[str, str, ast.Expr, Any]]]:
        """The stage's expression with its aggregates replaced by columns, and how each column is made
        (name, kind, argument, statistics): statistics over the rows still in the frame."""
        calls = _aggregates(a["expr"], a["label"])
        names = {id(c): f"⟨agg {i}⟩" for i, c in enumerate(calls)}
        made = []
        for c in calls:
            made.append((names[id(c)], c.func, c.args[0], self._stats(c.func, c.args[0], ds)))
        return _substitute(a["expr"], names), made

    def _stats(self, kind: str, arg: ast.Expr, ds) -> Any:
        import numpy as np
        import ray

        if kind == "pct":  # the sorted values (8 bytes a row): each row's average rank is two binary searches
            values = [b["v"].to_numpy(zero_copy_only=False) for b in ds.map_batches(
                _values, fn_kwargs={"arg": arg}, batch_format="pyarrow").iter_batches(batch_size=None,
                                                                                       batch_format="pyarrow")]
            flat = np.sort(np.concatenate(values)) if values else np.empty(0)
            return ray.put(flat)
        rows = ds.map_batches(_moments, fn_kwargs={"arg": arg}, batch_format="pyarrow", batch_size=None).take_all()
        if kind == "minmax":
            lows = [r["min"] for r in rows if r["n"]]
            return (min(lows), max(r["max"] for r in rows if r["n"])) if lows else (None, None)
        n, mean, m2 = 0, 0.0, 0.0
        for r in rows:  # Chan et al.'s parallel merge of per-block moments
            if r["n"]:
                total = n + r["n"]
                delta = r["mean"] - mean
                mean += delta * r["n"] / total
                m2 += r["m2"] + delta * delta * n * r["n"] / total
                n = total
        return (mean, math.sqrt(m2 / (n - 1))) if n > 1 else (mean if n else None, None)


def _schema(ds) -> dict:
    return dict(pl.from_arrow(ds.schema().base_schema.empty_table()).schema)


def _count_alive(ds) -> int:
    return int(sum(r["n"] for r in ds.map_batches(_alive_count, batch_format="pyarrow", batch_size=None).take_all()))


def _count_keyed(ds) -> int:
    return int(sum(r["n"] for r in ds.map_batches(_keyed_count, batch_format="pyarrow", batch_size=None).take_all()))


# --------------------------------------------------------------------------- on the workers


def _alive(batch):
    return batch_frame(batch).with_columns(pl.lit(True).alias(ALIVE)).to_arrow()


def _alive_count(batch):
    return {"n": [int(batch_frame(batch)[ALIVE].sum())]}


def _keyed_count(batch):
    f = batch_frame(batch)
    return {"n": [int((f[ALIVE] & f[RANK_KEY].is_not_null()).sum())]}


def _gather(ds, cols: list[str], alive: bool = True) -> pl.DataFrame:
    """Columns `cols` of the alive rows (`alive=False`: of every row), gathered to the driver (in no particular
    order)."""
    parts = [pl.from_arrow(b) for b in ds.map_batches(_rows_of, fn_kwargs={"alive": alive, "cols": cols},
                                                      batch_format="pyarrow").iter_batches(batch_size=None,
                                                                                           batch_format="pyarrow")]
    empty = pl.from_arrow(ds.schema().base_schema.empty_table()).select(cols)
    return pl.concat([empty, *parts], how="vertical_relaxed")


def _send_order(ds, chosen: pl.DataFrame):
    """`chosen`'s rows (by POS, in the order given) become the selection, in that order; the other rows
    leave it (their scores stay)."""
    import ray

    picked = chosen.select(POS, pl.int_range(pl.len(), dtype=pl.Int64).alias(ORDER))
    return ds.map_batches(_pick, fn_kwargs={"picked": ray.put(picked)}, batch_format="pyarrow")


def _count(ds, flag: str) -> int:
    return int(sum(r["n"] for r in ds.map_batches(_flag_count, fn_kwargs={"flag": flag}, batch_format="pyarrow",
                                                  batch_size=None).take_all()))


def _flag_count(batch, flag: str):
    return {"n": [int(batch_frame(batch)[flag].sum())]}


def _drop(batch, cols: list[str]):
    return batch_frame(batch).drop(cols, strict=False).to_arrow()


def _lookup_batch(batch, cached, schema: dict, names: dict):
    """A block's alive rows: their row keys, and their values where the score cache has them (one join
    against the key's cached rows, shipped once through the object store); TODO marks the rest."""
    import ray

    from tamis.runtime.cache import row_content_keys

    frame = batch_frame(batch)
    alive = frame.filter(pl.col(ALIVE))
    keys = row_content_keys(alive).alias(ROWKEY) if alive.height else pl.Series(ROWKEY, [], dtype=pl.String)
    got = pl.DataFrame([alive[POS], keys])
    table = pl.from_arrow(ray.get(cached))
    if table.height:
        hit = table.select(pl.col("id").alias(ROWKEY), *[pl.col(c).alias(names[c]) for c in schema if c in names],
                           pl.lit(True).alias("⟨hit⟩"))
        got = got.join(hit, on=ROWKEY, how="left", maintain_order="left")
    else:
        got = got.with_columns(*[pl.lit(None, dtype=t).alias(names[c]) for c, t in schema.items() if c in names],
                               pl.lit(None, dtype=pl.Boolean).alias("⟨hit⟩"))
    got = got.with_columns(pl.col("⟨hit⟩").is_null().alias(TODO)).drop("⟨hit⟩")
    out = frame.join(got, on=POS, how="left", maintain_order="left")
    return out.with_columns(pl.col(TODO).fill_null(False)).to_arrow()


def _score_rows(spec, call: ScoreCall, names: dict, batch, caches: dict, flag: str):
    """Score a batch's rows marked by `flag` (TODO after a cache lookup, else ALIVE); with a cache key,
    write them to the score cache (one shard per batch, each content once); every row keeps its other
    values (cached ones included)."""
    frame = batch_frame(batch)
    rows = frame.filter(pl.col(flag))
    if rows.height == 0:  # every block gets the stage's columns (null here), as scoring ones do
        return frame.with_columns(*[pl.lit(None, dtype=t).alias(names[c]) for c, t in spec.schema.items()
                                    if c in names and names[c] not in frame.columns]).to_arrow()
    got = call(rows.drop([c for c in (*INTERNAL, TODO, ROWKEY) if c in rows.columns]))
    cols = [pl.Series(c, got[c], dtype=t) for c, t in spec.schema.items()]
    if spec.cache_key is not None:
        from tamis.runtime.cache import ScoreCache

        out = pl.DataFrame([rows[ROWKEY].rename("id"), *cols]).unique("id", keep="first", maintain_order=True)
        scores = caches.setdefault("scores", ScoreCache(spec.cache_root))
        with scores.writer(spec.cache_key, sync_seconds=spec.sync_seconds) as writer:
            writer.put(out, check=False)  # a killed worker loses only its batch in flight
    # the stage's columns (a kernel may store more in the cache than the stage shows: `names` says which)
    computed = pl.DataFrame([rows[POS], *[c.alias(names[c.name]) for c in cols if c.name in names]])
    named = list(computed.columns[1:])
    if named[0] in frame.columns:  # a cached stage: values of the rows it found are already there
        merged = frame.join(computed, on=POS, how="left", maintain_order="left", suffix="⟨new⟩")
        return merged.with_columns(*[pl.coalesce(pl.col(c + "⟨new⟩"), pl.col(c)).alias(c) for c in named]
                                   ).drop([c + "⟨new⟩" for c in named]).to_arrow()
    return frame.join(computed, on=POS, how="left", maintain_order="left").to_arrow()


def _score_batch(batch, spec, names: dict, flag: str):
    """A Ray task: a kernel without a model."""
    return _score_rows(spec, spec.call, names, batch, {}, flag)


class _StreamScoreActor:
    """A Ray actor: builds its stage's model once (checked against the driver's fingerprint), then scores
    batch after batch."""

    def __init__(self, spec, names: dict, flag: str, recipe, artifacts_root: str, gpu: bool) -> None:
        from tamis.runtime.ray_engine import _actor_call

        self.spec, self.names, self.flag = spec, names, flag
        self.call = _actor_call(spec, recipe, artifacts_root, gpu)
        self.caches: dict = {}

    def __call__(self, batch):
        return _score_rows(self.spec, self.call, self.names, batch, self.caches, self.flag)


def _columns(frame: pl.DataFrame, made) -> pl.DataFrame:
    """The aggregate columns of a bound expression, over `frame`'s alive rows."""
    import numpy as np
    import ray

    from tamis.runtime.exprs import to_polars

    for name, kind, arg, stats in made:
        x = to_polars(arg).cast(pl.Float64)
        if kind == "pct":
            values = ray.get(stats)
            v = frame.select(x.alias("v"))["v"]
            keep = v.is_not_null()
            arr = v.fill_null(0.0).to_numpy()
            less = np.searchsorted(values, arr, "left")
            leq = np.searchsorted(values, arr, "right")
            rank = less + (leq - less + 1) / 2
            out = pl.Series(name, (rank - 1) / max(len(values) - 1, 1), dtype=pl.Float64)
            frame = frame.with_columns(pl.when(keep).then(out).otherwise(None).alias(name))
        elif kind == "zscore":
            mean, std = stats
            frame = frame.with_columns(((x - pl.lit(mean, pl.Float64)) / pl.lit(std, pl.Float64)).alias(name))
        else:
            low, high = stats
            frame = frame.with_columns(((x - pl.lit(low, pl.Float64)) / (pl.lit(high, pl.Float64) - pl.lit(low, pl.Float64)))
                                       .alias(name))
    return frame


def _expr_batch(batch, expr, how: tuple[str, str | None]):
    from tamis.runtime.exprs import to_polars

    bound, made = expr
    frame = batch_frame(batch)
    extra = [m[0] for m in made]
    frame = _columns(frame, made)
    value = to_polars(bound)
    kind, name = how
    if kind == "let":
        frame = frame.with_columns(pl.when(pl.col(ALIVE)).then(value).otherwise(None).alias(name))
    elif kind == "where":
        frame = frame.with_columns((pl.col(ALIVE) & value.fill_null(False)).alias(ALIVE))
    else:  # rank: the key beside the rows (NaN as null), as the local engine's `_sorted`
        frame = frame.with_columns(pl.when(pl.col(ALIVE)).then(value.cast(pl.Float64).fill_nan(None))
                                   .otherwise(None).alias(RANK_KEY))
    return frame.drop(extra).to_arrow()


def _values(batch, arg):
    from tamis.runtime.exprs import to_polars

    frame = batch_frame(batch).filter(pl.col(ALIVE))
    return frame.select(to_polars(arg).cast(pl.Float64).alias("v")).drop_nulls().to_arrow()


def _moments(batch, arg):
    from tamis.runtime.exprs import to_polars

    frame = batch_frame(batch).filter(pl.col(ALIVE))
    v = frame.select(to_polars(arg).cast(pl.Float64).alias("v"))["v"].drop_nulls().to_numpy()
    if not len(v):
        return {"n": [0], "mean": [0.0], "m2": [0.0], "min": [0.0], "max": [0.0]}
    mean = float(v.mean())
    return {"n": [len(v)], "mean": [mean], "m2": [float(((v - mean) ** 2).sum())], "min": [float(v.min())],
            "max": [float(v.max())]}


def _block_top(batch, want: int, desc: bool, ranked: bool):
    frame = batch_frame(batch).filter(pl.col(ALIVE))
    if not ranked:
        return frame.select(POS).sort(POS).head(want).to_arrow()
    keyed = frame.filter(pl.col(RANK_KEY).is_not_null()).select(POS, RANK_KEY)
    return keyed.sort([RANK_KEY, POS], descending=[desc, False]).head(want).to_arrow()


def _text_hash_batch(batch, field: str):
    """Each alive row's normalised dedup text hashed (null for an empty text, which is never a duplicate)."""
    from tamis.runtime.dedup import dedup_text, normalise
    from tamis.runtime.rowhash import row_hashes

    frame = batch_frame(batch)
    texts = normalise(dedup_text(frame, field))
    hashed = row_hashes(texts.to_frame("t"), ["t"]) if frame.height else pl.Series([], dtype=pl.String)
    keep = frame[ALIVE] & (texts != "")
    return frame.with_columns(pl.when(keep).then(hashed).otherwise(None).alias(TEXT_HASH)).to_arrow()


def _text_batch(batch, field: str, positions):
    """POS, id and dedup text of the rows at `positions`."""
    import ray

    from tamis.runtime.dedup import dedup_text

    frame = batch_frame(batch)
    frame = frame.with_columns(dedup_text(frame, field).alias("⟨text⟩"))
    return frame.filter(pl.col(POS).is_in(ray.get(positions).implode())).to_arrow()


def _remove(batch, removed, cols: list[str]):
    import ray

    frame = batch_frame(batch)
    gone = pl.col(POS).is_in(ray.get(removed).implode())
    return frame.with_columns((pl.col(ALIVE) & ~gone).alias(ALIVE)).drop(cols, strict=False).to_arrow()


def _replace(batch, values, column: str, keep_as: str | None):
    """The rows' `column` replaced by `values` (POS, column) where given (the others: null, as dropped rows
    are); with `keep_as`, the old values first copied there."""
    import ray

    frame = batch_frame(batch)
    if keep_as is not None:
        frame = frame.with_columns(pl.col(column).alias(keep_as))
    new = ray.get(values)
    return frame.drop(column).join(new, on=POS, how="left", maintain_order="left").select(frame.columns).to_arrow()


def _restore(batch, scored_as: dict):
    """The scores output's view: each changed column with its values as scored."""
    frame = batch_frame(batch)
    return frame.with_columns(*[pl.col(hidden).alias(c) for c, hidden in scored_as.items()]).to_arrow()


def _pick(batch, picked):
    import ray

    frame = batch_frame(batch)
    frame = frame.drop(ORDER, strict=False).join(ray.get(picked), on=POS, how="left", maintain_order="left")
    return frame.with_columns((pl.col(ALIVE) & pl.col(ORDER).is_not_null()).alias(ALIVE)).to_arrow()


# --------------------------------------------------------------------------- writing


class RayFrame:
    """A selection or scores left on the workers: what the CLI's writers need (`write_ndjson`,
    `write_parquet`, `height`), each worker writing its part in order, the parts joined into the
    writer's temporary file (renamed into place by it, atomically)."""

    def __init__(self, ds, order: str, columns: list[str], height: int, *, only_alive: bool) -> None:
        self.ds, self.order, self.columns, self.height, self.only_alive = ds, order, columns, height, only_alive

    def write_ndjson(self, tmp) -> None:
        self._write(Path(tmp), "jsonl")

    def write_parquet(self, tmp) -> None:
        self._write(Path(tmp), "parquet")

    def to_polars(self) -> pl.DataFrame:
        """Gathered on the driver (tests, a `.json` output)."""
        parts = [pl.from_arrow(b) for b in self._rows().iter_batches(batch_size=None, batch_format="pyarrow")]
        frame = pl.concat(parts, how="vertical_relaxed") if parts else pl.DataFrame(schema=self._schema())
        return frame.sort(self.order).select(self.columns)

    def to_dicts(self) -> list[dict]:
        return self.to_polars().to_dicts()

    def _schema(self) -> dict:
        s = _schema(self.ds)
        return {c: s[c] for c in [*self.columns, self.order]}

    def _rows(self):
        keep = self.only_alive
        return self.ds.map_batches(_rows_of, fn_kwargs={"alive": keep, "cols": [*self.columns, self.order]},
                                   batch_format="pyarrow")

    def _write(self, tmp: Path, fmt: str) -> None:
        parts = tmp.with_name(tmp.name + ".parts")
        parts.mkdir()
        try:
            if self.height:
                self._rows().sort(self.order).map_batches(
                    _write_part, fn_kwargs={"folder": str(parts), "fmt": fmt, "order": self.order,
                                            "cols": self.columns}, batch_format="pyarrow", batch_size=None).take_all()
            files = sorted(parts.iterdir())
            if fmt == "jsonl":
                with open(tmp, "wb") as out:
                    for f in files:
                        with open(f, "rb") as fh:
                            shutil.copyfileobj(fh, out, 1 << 20)
            else:
                _join_parquet(files, tmp, pl.DataFrame(schema={c: self._schema()[c] for c in self.columns}))
        finally:
            shutil.rmtree(parts, ignore_errors=True)


def _rows_of(batch, alive: bool, cols: list[str]):
    frame = batch_frame(batch)
    return (frame.filter(pl.col(ALIVE)) if alive else frame).select(cols).to_arrow()


def _write_part(batch, folder: str, fmt: str, order: str, cols: list[str]):
    """One sorted block of the output, named by its first row's order (the parts sort as the rows do)."""
    frame = batch_frame(batch)
    if frame.height == 0:
        return {"rows": [0]}
    first = int(frame[order][0])
    path = Path(folder) / f"part-{first:020d}.{fmt}"
    body = frame.select(cols)
    if fmt == "jsonl":
        body.write_ndjson(path)
    else:
        body.write_parquet(path)
    return {"rows": [frame.height]}


def _join_parquet(files: list[Path], tmp: Path, empty: pl.DataFrame) -> None:
    """The parts' row groups, in order, in one Parquet file (a part at a time in memory)."""
    import pyarrow.parquet as pq

    if not files:
        empty.write_parquet(tmp)
        return
    schema = empty.to_arrow().schema
    with pq.ParquetWriter(tmp, schema) as writer:
        for f in files:
            writer.write_table(pq.read_table(f).cast(schema))

"""The local executor: runs a compiled recipe graph over a pool on one machine.

Operators run in dependency order; each node's output is computed once (shared
sub-graphs included). Expensive scores go through the content-addressed cache in
chunks, so a killed run resumes where it stopped. Row-picking stages and score
algebra run in Polars.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import polars as pl

from tamis.errors import ModelError, TamisError

# What the local executor can run today; everything else fails at plan time, before any work.
RUNNABLE_SCORERS = {"length", "mtld", "loss", "ppl", "ifd", "rating", "complexity", "quality"}
RUNNABLE_OPS = {"score", "let", "where", "rank", "top", "topk", "sample", "intersect", "union", "diverse"}
RUNNABLE_SAMPLERS = {"repr_filter", "kcenter", "facility_location"}
RUNNABLE_MODELS = {"pfm", "hf", "proxy", "warmup", "encoder", "api"}
LM_SCORERS = {"loss", "ppl", "ifd"}
JUDGE_SCORERS = {"rating"}
DIGIT_SCORERS = {"complexity", "quality"}


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
    chunk_rows: int = 64  # rows scored between cache writes: the most a kill can lose
    model_paths: dict[str, str] = field(default_factory=dict)  # hf/api("name") -> a local path, for offline machines
    api_base: str | None = None  # OpenAI-compatible endpoint for api("name") models without a local binding
    progress: bool = True


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
    """Fail before any work when a node has no local implementation, or names an API
    model that neither a local model (--model NAME=PATH) nor an endpoint serves."""
    out = g.graph["output"]
    needed = nx.ancestors(g, out)
    problems = []
    for n in needed:
        a = g.nodes[n]
        where = f" (line {a['line']})" if a.get("line") else ""
        if a["kind"] == "op":
            if a["op"] not in RUNNABLE_OPS:
                problems.append(f"stage `{a['label']}`{where}: `{a['op']}` has no local runtime yet")
            elif a["op"] == "score" and a["params"]["scorer"] not in RUNNABLE_SCORERS:
                problems.append(f"stage `{a['label']}`{where}: scorer `{a['params']['scorer']}` has no local runtime yet")
            elif a["op"] == "diverse" and a["params"]["sampler"] not in RUNNABLE_SAMPLERS:
                problems.append(f"stage `{a['label']}`{where}: sampler `{a['params']['sampler']}` has no local runtime yet")
        elif a["kind"] == "model" and a["ctor"] not in RUNNABLE_MODELS:
            problems.append(f"model `{a['label']}`{where}: `{a['ctor']}` models have no local runtime yet")
        elif a["kind"] == "model" and a["ctor"] == "api" and _binding(a, cfg) is None:
            name = a["params"]["name"]
            problems.append(f"model `{a['label']}`{where}: nothing serves it; bind a local chat model with "
                            f"--model {name}=PATH, or name an OpenAI-compatible endpoint with --api-base URL "
                            "(or $OPENAI_BASE_URL; the key comes from $OPENAI_API_KEY)")
        elif a["kind"] == "dataset" and a.get("source") not in ("pool", "warmup_sample"):
            problems.append(f"dataset `{a['label']}`{where}: `{a['source']}` has no local runtime yet")
    if problems:
        raise PlanError("this recipe cannot run locally yet:\n  " + "\n  ".join(sorted(problems))
                        + f"\nrunnable scorers: {', '.join(sorted(RUNNABLE_SCORERS))}")


def _binding(model_node: dict, cfg: "RunConfig | None"):
    from tamis.runtime.api_client import judge_binding

    p = model_node["params"]
    return judge_binding(p["name"], p.get("base_url"), cfg.model_paths if cfg else {}, cfg.api_base if cfg else None)


def _size_rows(size: dict, n: int) -> int:
    if "fraction" in size:
        return max(1, int(round(size["fraction"] * n)))
    return min(int(size["count"]), n)


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
        self._models: dict[str, Any] = {}
        self.model_info: dict[str, dict] = {}
        self.stages: list[StageReport] = []
        self.scores: pl.DataFrame | None = None
        self.pool_size = 0

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
        self.pool_size = pool.height
        self._frames["data:pool"] = pool
        self.scores = pool.select("id")
        out = self.g.graph["output"]
        needed = nx.ancestors(self.g, out)
        for n in nx.topological_sort(self.g):
            if n in needed and self.g.nodes[n]["kind"] == "op":
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

        out = frame.with_columns(to_polars(a["expr"]).alias(a["params"]["name"]))
        report.histogram = _histogram(out[a["params"]["name"]]) if out[a["params"]["name"]].dtype.is_numeric() else None
        return out

    def _op_where(self, n, a, frame, report):
        from tamis.runtime.exprs import to_polars

        return frame.filter(to_polars(a["expr"]).fill_null(False))

    def _sorted(self, a, frame) -> pl.DataFrame:
        from tamis.runtime.exprs import to_polars

        # the key stays beside the rows (nulls and NaNs as null, sorted last) so that a later
        # `top` can tell rows with no key, which it never picks
        key = to_polars(a["expr"])
        return (frame.with_columns(key.cast(pl.Float64).fill_nan(None).alias(RANK_KEY))
                .sort(RANK_KEY, descending=a["params"]["order"] == "desc", nulls_last=True, maintain_order=True))

    def _op_rank(self, n, a, frame, report):
        return self._sorted(a, frame)

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
        return self._top(a, frame, report)

    def _op_topk(self, n, a, frame, report):
        return self._top(a, self._sorted(a, frame), report)

    def _op_sample(self, n, a, frame, report):
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
        from tamis.runtime import embeddings, samplers

        p = a["params"]
        budget = _size_rows(p["budget"], self.pool_size)
        texts = embeddings.sample_texts(frame)
        node = self._model_of(n)
        t0 = time.perf_counter()
        if self.g.nodes[node]["ctor"] == "encoder":
            from tamis.runtime.models import resolve_device

            emb = embeddings.encode(self.g.nodes[node]["params"]["name"], texts, self.cfg.model_paths,
                                    str(resolve_device(self.cfg.device)),
                                    progress=self.cfg.progress)
        else:
            emb = embeddings.llm_last_token(self._model(node), texts)
        report.model_seconds = time.perf_counter() - t0
        if p["sampler"] == "repr_filter":
            keep = samplers.repr_filter(emb, budget, p["threshold"])
        elif p["sampler"] == "facility_location":
            keep = samplers.facility_location(emb, budget, p["metric"])
        else:
            keep = samplers.kcenter(emb, budget)
        return frame[keep]

    def _op_score(self, n, a, frame, report):
        p = a["params"]
        scorer = p["scorer"]
        main = next(iter(a["columns_out"]))
        if scorer in LM_SCORERS:
            cols = self._lm_score(n, a, frame, report)
        elif scorer in JUDGE_SCORERS:
            cols = self._judge_score(n, a, frame, report)
        elif scorer in DIGIT_SCORERS:
            cols = self._digit_score(n, a, frame, report)
        else:
            cols = self._text_score(scorer, p, frame).alias(main).to_frame().with_columns(frame["id"])
        out = frame.join(cols, on="id", how="left", maintain_order="left")
        self._record_scores(cols)
        report.histogram = _histogram(out[main])
        return out

    def _record_scores(self, cols: pl.DataFrame) -> None:
        new = [c for c in cols.columns if c != "id" and c not in self.scores.columns]
        if new:
            self.scores = self.scores.join(cols.select("id", *new), on="id", how="left", maintain_order="left")

    def _text_score(self, scorer: str, p: dict, frame: pl.DataFrame) -> pl.Series:
        from tamis.runtime import text_scorers

        if scorer == "length":
            return text_scorers.length(frame, p["field"], p["unit"])
        return text_scorers.mtld(frame, p["field"], p["threshold"])

    # ---- model scores, through the cache -------------------------------------------
    def _cached_rows(self, semantic: dict, frame: pl.DataFrame, report: StageReport, schema: dict,
                     compute, names: dict[str, str]) -> pl.DataFrame:
        """`frame`'s ids and result columns (renamed by `names`: result column → stage column),
        from the cache where present; `compute(chunk)` gives the rest chunk by chunk (a dict of
        lists in `schema`, which has a "reason" column), each persisted as it is done."""
        from tamis.runtime.cache import fingerprint, row_content_hashes

        key = fingerprint(semantic)
        self.cache.scores.describe(key, semantic)
        row_keys = row_content_hashes(frame)
        by_key = dict(zip(row_keys, range(frame.height)))
        found, missing = self.cache.scores.get(key, list(dict.fromkeys(row_keys)))
        report.cached_rows = len(found)
        todo = [by_key[k] for k in missing]
        for start in range(0, len(todo), self.cfg.chunk_rows):
            idx = todo[start:start + self.cfg.chunk_rows]
            rows = pl.DataFrame({"id": [row_keys[i] for i in idx], **compute(frame[idx])},
                                schema={"id": pl.String, **schema})
            self.cache.scores.put(key, rows)  # persisted chunk by chunk: a kill loses at most one chunk
            found.update({r["id"]: r for r in rows.iter_rows(named=True)})
            report.scored_rows += len(idx)
        values = [found[k] for k in row_keys]
        report.skipped = dict(sorted(Counter(v["reason"] for v in values if v["reason"]).items()))
        return pl.DataFrame({"id": frame["id"], **{name: pl.Series([v[col] for v in values], dtype=schema[col])
                                                   for col, name in names.items()}})

    def _stage_model(self, n: str, report: StageReport):
        """The model a stage uses, built (or warmed up) on first use; that time is the stage's model_seconds."""
        t0 = time.perf_counter()
        model = self._model(self._model_of(n))
        report.model_seconds = time.perf_counter() - t0
        return model

    def _lm_score(self, n, a, frame, report) -> pl.DataFrame:
        from tamis.runtime.lm_scoring import score_answers

        p = a["params"]
        scorer = p["scorer"]
        main = next(iter(a["columns_out"]))
        lm = self._stage_model(n, report)
        semantic = {"op": "score", "scorer": scorer, "form": p.get("form"), "template": p["template"],
                    "max_length": p["max_length"], "turns": p["turns"], "model": lm.fingerprint}

        def compute(chunk: pl.DataFrame) -> dict:
            table = score_answers(lm, chunk, metric=scorer, ifd_form=p.get("form") or "loss_ratio",
                                  template=p["template"], max_length=p["max_length"], combine=p["turns"],
                                  batch_tokens=self.cfg.batch_tokens, progress=self.cfg.progress)
            return {"value": table.value, "cond": table.cond_loss, "direct": table.direct_loss, "reason": table.reason}

        names = {"value": main, **({"cond": f"{main}_cond", "direct": f"{main}_direct"} if scorer == "ifd" else {}),
                 "reason": f"{main}_reason"}
        return self._cached_rows(semantic, frame, report, {"value": pl.Float64, "cond": pl.Float64,
                                                           "direct": pl.Float64, "reason": pl.String}, compute, names)

    def _judge_score(self, n, a, frame, report) -> pl.DataFrame:
        from tamis.runtime.judge import JUDGE_DECODING, rate

        p = a["params"]
        main = next(iter(a["columns_out"]))
        lm = self._stage_model(n, report)
        semantic = {"op": "score", "scorer": "rating", "prompt": p["prompt"], "max_tokens": p["max_tokens"],
                    "decoding": JUDGE_DECODING, "model": lm.fingerprint}

        def compute(chunk: pl.DataFrame) -> dict:
            table = rate(lm, chunk, prompt=p["prompt"], max_tokens=p["max_tokens"],
                         batch_tokens=self.cfg.batch_tokens, progress=self.cfg.progress)
            return {"value": table.value, "reason": table.reason, "first_line": table.first_line}

        return self._cached_rows(semantic, frame, report, {"value": pl.Float64, "reason": pl.String,
                                                           "first_line": pl.String}, compute,
                                 {"value": main, "reason": f"{main}_reason", "first_line": f"{main}_said"})

    def _digit_score(self, n, a, frame, report) -> pl.DataFrame:
        from tamis.runtime.digit_scorers import DIGIT_TEMPLATES, digit_scores

        p = a["params"]
        scorer = p["scorer"]
        main = next(iter(a["columns_out"]))
        lm = self._stage_model(n, report)
        semantic = {"op": "score", "scorer": scorer, "template": DIGIT_TEMPLATES[scorer],
                    "max_length": p["max_length"], "model": lm.fingerprint}

        def compute(chunk: pl.DataFrame) -> dict:
            got = digit_scores(lm, chunk, scorer, max_length=p["max_length"], progress=self.cfg.progress)
            return {"value": got.value, "reason": got.reason}

        return self._cached_rows(semantic, frame, report, {"value": pl.Float64, "reason": pl.String}, compute,
                                 {"value": main, "reason": f"{main}_reason"})

    # ---- models ---------------------------------------------------------------------
    def _model(self, node: str):
        if node not in self._models:
            self._models[node] = self._build_model(node)
        return self._models[node]

    def _build_model(self, node: str):
        from tamis.runtime.models import load_causal_lm

        a = self.g.nodes[node]
        ctor = a["ctor"]
        bases = [p for p, _, d in self.g.in_edges(node, data=True) if d["flow"] == "base"]
        if ctor == "pfm":
            if not self.cfg.pfm:
                raise ModelError("this recipe uses `pfm`: pass --pfm PATH_OR_NAME (a local folder, a .gguf file, "
                                 "or a hub name already in the local cache)")
            lm = load_causal_lm(self.cfg.pfm, device=self.cfg.device, dtype=self.cfg.dtype)
        elif ctor == "hf":
            name = self.cfg.model_paths.get(a["params"]["name"], a["params"]["name"])
            lm = load_causal_lm(name, device=self.cfg.device, dtype=self.cfg.dtype, gguf_file=a["params"].get("gguf"))
        elif ctor == "api":  # check_runnable made sure something serves it
            binding = _binding(a, self.cfg)
            if binding.local_path:
                lm = load_causal_lm(binding.local_path, device=self.cfg.device, dtype=self.cfg.dtype)
            else:
                from tamis.runtime.api_client import ChatEndpoint

                endpoint = ChatEndpoint(binding.base_url, binding.name)
                self.model_info[node] = {"label": a["label"], "name": endpoint.name, "fingerprint": endpoint.fingerprint,
                                         "device": "remote", "dtype": "remote"}
                return endpoint
        elif ctor == "proxy":
            # proxy(of, model): the stand-in is the second base edge's model (the non-PFM one)
            stand_in = next(b for b in bases if self.g.nodes[b]["ctor"] != "pfm" or len(bases) == 1)
            lm = self._model(stand_in)
        elif ctor == "warmup":
            lm = self._warmup(node, a, bases[0])
        else:  # pragma: no cover - check_runnable rejects it first
            raise PlanError(f"no runtime for model {a['label']}")
        self.model_info[node] = {"label": a["label"], "name": lm.name, "fingerprint": lm.fingerprint,
                                 "device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", "")}
        return lm

    def _warmup(self, node: str, a: dict, base_node: str):
        from tamis.runtime.warmup import warm_up

        base = self._model(base_node)
        pool = self._frames["data:pool"]
        lm, info = warm_up(base, pool, a["params"], self.cache.artifacts, self.cfg, label=a["label"])
        self.model_info[node + ":training"] = info
        return lm

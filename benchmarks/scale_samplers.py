#!/usr/bin/env python
"""Diversity samplers at scale: tamis' samplers against faithful re-implementations of their references.

One process, the same seeded random L2-normalised float32 embeddings (dim 384) per pool size, a budget of
10 % of the pool unless capped (caps are printed, with the reason), and for each sampler:

  repr_filter        DEITA's loop: for each candidate in visiting order, its max cosine to the kept set
                     (one matrix-vector product over a preallocated kept matrix), keep if ≤ threshold,
                     stop at the budget.
  kcenter            the plain numpy farthest-first loop, two ways: (R1) distances as norms of differences
                     (`dist = minimum(dist, norm(emb - emb[c]))`, the loop whose selections tamis reproduces
                     exactly), and (R2) squared distances from dot products, updated in place (faster; on
                     near-ties its selections can differ from R1's).
  facility_location  Superfiltering-D through submodlib's dense mode: the dense N×N kernel
                     exp(-euclidean distance / dim), lazy greedy with a heap. It runs only where its
                     ≈24.5·N² bytes fit in half of the memory available; elsewhere the table says so.

Reported per phase: wall time (best of `--repeats` interleaved runs below 100k rows, one run above), the
peak resident memory above the phase's start (Linux VmHWM, reset before each phase) and the process's
peak (embeddings included), CUDA's peak allocation where tamis used the GPU, the speed ratio
reference/tamis, and agreement (identical selections; for facility location the dense objective of
tamis' sparse selection relative to the reference's). The CPU model (/proc/cpuinfo), dtype, device and
load average are printed; the last line is one JSON object.

Each sampler and reference first runs once on 200 rows (BLAS threads, CUDA context). On a shared VM,
OPENBLAS_NUM_THREADS=1 gives steadier numbers: a threaded BLAS call stalls while another process holds
a core, for the references and tamis alike.

    python benchmarks/scale_samplers.py                     # 1k, 10k, 100k
    python benchmarks/scale_samplers.py --max-n 1000000     # adds 1M (facility location needs a GPU there)
    python benchmarks/scale_samplers.py --sizes 1000 --samplers kcenter --repeats 5
    python benchmarks/scale_samplers.py --kcenter-work 2e7  # smaller kcenter budgets (rows × picks)
"""

from __future__ import annotations

import argparse
import heapq
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model as _cpu_model, machine, machine_line  # noqa: E402


def _load_samplers() -> Any:
    """tamis.runtime.samplers; on a machine without tamis' other dependencies (a bare GPU box), the module
    itself, which needs only numpy (and torch for CUDA)."""
    try:
        from tamis.runtime import samplers as module
    except ImportError:
        spec = importlib.util.spec_from_file_location("samplers", ROOT / "tamis" / "runtime" / "samplers.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


samplers = _load_samplers()

DIM = 384
THRESHOLD = 0.9  # repr_filter's DEITA default
# Budget caps (picks), so every reference finishes in minutes on a 2-core VM; None = 10 % always.
KCENTER_WORK = 10**8  # kcenter: pool rows × picks (the plain loop reads the whole pool per pick)
REPR_CAP = 20_000  # repr_filter: the reference's work grows with budget²
FACILITY_CAP = 10_000  # facility location: "a small budget" at 1M


# --------------------------------------------------------------------------- references


def ref_repr_filter(emb: np.ndarray, budget: int, threshold: float = THRESHOLD) -> list[int]:
    """DEITA's representation filter, one candidate at a time."""
    kept: list[int] = []
    kept_vecs = np.empty((min(budget, len(emb)), emb.shape[1]), dtype=emb.dtype)
    for i in range(len(emb)):
        if len(kept) >= budget:
            break
        if kept and float(np.max(kept_vecs[:len(kept)] @ emb[i])) > threshold:
            continue
        kept_vecs[len(kept)] = emb[i]
        kept.append(i)
    return kept


def ref_kcenter_norms(emb: np.ndarray, budget: int) -> list[int]:
    """R1: farthest-first with distances as norms of differences."""
    chosen = [0]
    dist = np.linalg.norm(emb - emb[0], axis=1)
    while len(chosen) < min(budget, len(emb)):
        nxt = int(np.argmax(dist))
        if dist[nxt] == 0:
            break
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(emb - emb[nxt], axis=1))
    return chosen


def ref_kcenter_dots(emb: np.ndarray, budget: int) -> list[int]:
    """R2: farthest-first with squared distances 2 - 2·x·c of unit rows, updated in place."""
    n = len(emb)
    dist = np.full(n, np.inf, dtype=emb.dtype)
    d = np.empty(n, dtype=emb.dtype)
    chosen, j = [], 0
    while True:
        chosen.append(j)
        if len(chosen) >= min(budget, n):
            break
        np.matmul(emb, emb[j], out=d)
        d *= -2
        d += 2
        np.minimum(dist, d, out=dist)
        j = int(np.argmax(dist))
        if dist[j] <= 0:
            break
    return chosen


def ref_dense_kernel(emb: np.ndarray) -> np.ndarray:
    """submodlib's dense euclidean kernel: exp(-distance / dim), float32."""
    x = emb.astype(np.float64)
    sq = np.sum(x * x, axis=1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0))
    return np.exp(-dist / x.shape[1]).astype(np.float32)


def ref_facility_location(emb: np.ndarray, budget: int) -> list[int]:
    """Superfiltering-D: submodlib's dense kernel, lazy greedy on f(S) = Σ_i max_{j∈S} s_ij."""
    sims = ref_dense_kernel(emb)
    n = len(sims)
    covered = np.zeros(n, dtype=np.float32)
    heap = [(-float(np.maximum(sims[:, j], 0.0).sum()), j) for j in range(n)]
    heapq.heapify(heap)
    chosen: list[int] = []
    while heap and len(chosen) < min(budget, n):
        _, j = heapq.heappop(heap)
        gain = float(np.maximum(sims[:, j] - covered, 0.0).sum())
        if heap and gain < -heap[0][0] - 1e-12:
            heapq.heappush(heap, (-gain, j))
            continue
        chosen.append(j)
        covered = np.maximum(covered, sims[:, j])
    return chosen


def dense_objective(emb: np.ndarray, chosen: list[int]) -> float:
    """f(S) under the dense kernel, without the N×N matrix: Σ_i max_{j∈S} exp(-|x_i - x_j| / dim)."""
    x, s = emb.astype(np.float64), emb[chosen].astype(np.float64)
    total, sq_s = 0.0, np.sum(s * s, axis=1)
    for a in range(0, len(x), 4096):
        xa = x[a:a + 4096]
        d2 = np.sum(xa * xa, axis=1)[:, None] + sq_s[None, :] - 2 * xa @ s.T
        total += float(np.exp(-np.sqrt(np.maximum(d2, 0.0)) / x.shape[1]).max(axis=1).sum())
    return total


# --------------------------------------------------------------------------- measuring


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


@dataclass
class Phase:
    name: str
    seconds: float
    peak_above_start_mb: float
    process_peak_mb: float
    cuda_peak_mb: float | None = None
    selected: list[int] = field(default_factory=list, repr=False)


def measure(name: str, fn: Callable[[], list[int]], torch: Any) -> Phase:
    """One run of fn: wall time, peak RSS above the start (VmHWM reset first), CUDA's peak allocation."""
    exact_peak = _reset_peak()
    start_kb = _status_kb("VmRSS")
    if torch is not None:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    hwm = _status_kb("VmHWM") if exact_peak else _status_kb("VmRSS")
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if torch is not None else None
    return Phase(name, seconds, (hwm - start_kb) / 1024, hwm / 1024, cuda_peak, out)


def best_of(runs: list[Phase]) -> Phase:
    """The fastest run, with the largest memory seen over all runs."""
    best = min(runs, key=lambda p: p.seconds)
    return Phase(best.name, best.seconds, max(p.peak_above_start_mb for p in runs),
                 max(p.process_peak_mb for p in runs), best.cuda_peak_mb, best.selected)


def cpu_model() -> str:
    return f"{_cpu_model()} ({os.cpu_count()} cores)"


def mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------- runs


def budget_for(sampler: str, n: int, kcenter_work: int) -> tuple[int, str]:
    """10 % of the pool, capped where a reference would run for hours; the note says why."""
    budget = max(1, n // 10)
    if sampler == "kcenter" and n * budget > kcenter_work:
        return kcenter_work // n, f"capped from {budget:,}: the plain loop reads all {n:,} rows per pick"
    if sampler == "repr_filter" and budget > REPR_CAP:
        return REPR_CAP, f"capped from {budget:,}: DEITA's loop costs budget² row products"
    if sampler == "facility_location" and budget > FACILITY_CAP:
        return FACILITY_CAP, f"capped from {budget:,}: a small budget at this size"
    return budget, ""


def run_one(sampler: str, emb: np.ndarray, repeats: int, device: str, torch: Any, kcenter_work: int) -> dict[str, Any]:
    n = len(emb)
    budget, note = budget_for(sampler, n, kcenter_work)
    gpu = torch if (torch is not None and device != "cpu" and sampler != "repr_filter") else None
    refs: list[tuple[str, Callable[[], list[int]]]] = []
    if sampler == "repr_filter":
        ours = lambda: samplers.repr_filter(emb, budget, THRESHOLD)  # noqa: E731
        refs = [("DEITA loop", lambda: ref_repr_filter(emb, budget))]
    elif sampler == "kcenter":
        ours = lambda: samplers.kcenter(emb, budget, device=device)  # noqa: E731
        refs = [("R1 norms", lambda: ref_kcenter_norms(emb, budget)),
                ("R2 dots", lambda: ref_kcenter_dots(emb, budget))]
    else:
        ours = lambda: samplers.facility_location(emb, budget, "euclidean", device=device)  # noqa: E731
        need = 24.5 * n * n
        if need <= 0.5 * mem_available_bytes():
            refs = [("submodlib dense", lambda: ref_facility_location(emb, budget))]
        else:
            note = (note + "; " if note else "") + f"dense reference cannot run: needs ≈{need / 1e9:,.0f} GB"
    _warm_up(sampler, emb[:200], "cuda" if gpu is not None else "cpu")  # one-time costs: BLAS threads, CUDA
    phases: dict[str, list[Phase]] = {}
    for _ in range(repeats):  # interleaved: every reference, then tamis, `repeats` times
        for label, fn, dev in [(label, fn, None) for label, fn in refs] + [("tamis", ours, gpu)]:
            phases.setdefault(label, []).append(measure(label, fn, dev))
    best = [best_of(runs) for runs in phases.values()]
    tamis = best[-1]
    row: dict[str, Any] = {"sampler": sampler, "n": n, "budget": budget, "note": note, "selected": len(tamis.selected),
                           "tamis": _phase_json(tamis), "references": {}}
    for ref in best[:-1]:
        info = _phase_json(ref)
        info["speedup"] = ref.seconds / tamis.seconds if tamis.seconds else None
        info["identical"] = ref.selected == tamis.selected
        if sampler == "facility_location":
            info["overlap"] = len(set(ref.selected) & set(tamis.selected)) / max(len(ref.selected), 1)
            info["objective_ratio"] = dense_objective(emb, tamis.selected) / dense_objective(emb, ref.selected)
        row["references"][ref.name] = info
    return row


def _warm_up(sampler: str, emb: np.ndarray, device: str) -> None:
    """Run tamis' sampler and its references once on a small slice."""
    if sampler == "repr_filter":
        samplers.repr_filter(emb, 50, THRESHOLD), ref_repr_filter(emb, 50)
    elif sampler == "kcenter":
        samplers.kcenter(emb, 20, device=device), ref_kcenter_norms(emb, 20), ref_kcenter_dots(emb, 20)
    else:
        samplers.facility_location(emb, 20, k=8, dense_limit=100, device=device), ref_facility_location(emb, 20)


def _phase_json(p: Phase) -> dict[str, Any]:
    out = {"seconds": round(p.seconds, 4), "peak_above_start_mb": round(p.peak_above_start_mb, 1),
           "process_peak_mb": round(p.process_peak_mb, 1)}
    if p.cuda_peak_mb is not None:
        out["cuda_peak_mb"] = round(p.cuda_peak_mb, 1)
    return out


def print_row(row: dict[str, Any]) -> None:
    t = row["tamis"]
    cuda = f", CUDA peak {t['cuda_peak_mb']:,.0f} MB" if "cuda_peak_mb" in t else ""
    head = f"{row['sampler']:<18} {row['n']:>9,} {row['budget']:>7,}"
    print(f"{head}  tamis {t['seconds']:>9.3f} s  +{t['peak_above_start_mb']:>7,.0f} MB "
          f"(process {t['process_peak_mb']:,.0f} MB{cuda})")
    for name, r in row["references"].items():
        agree = "identical" if r["identical"] else "differs"
        if "objective_ratio" in r:
            agree += f"; overlap {r['overlap']:.0%}, dense objective {r['objective_ratio']:.4f}× the reference's"
        print(f"{'':<36}  {name:<15} {r['seconds']:>9.3f} s  +{r['peak_above_start_mb']:>7,.0f} MB   "
              f"tamis {r['speedup']:.2f}× faster, {agree}")
    if row["note"]:
        print(f"{'':<36}  note: {row['note']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    ap.add_argument("--max-n", type=int, default=100_000, help="skip pool sizes above this (1000000 adds 1M)")
    ap.add_argument("--samplers", nargs="+", default=["repr_filter", "kcenter", "facility_location"],
                    choices=["repr_filter", "kcenter", "facility_location"])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs below 100k rows (best is kept)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="tamis' device argument")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kcenter-work", type=float, default=KCENTER_WORK,
                    help="kcenter's budget is capped so that rows × picks stays under this")
    args = ap.parse_args()

    torch = None
    try:  # imported up front, so no phase pays for it; used for CUDA's peak memory
        import torch as _torch

        torch = _torch if _torch.cuda.is_available() else None
    except ImportError:
        pass
    device_name = torch.cuda.get_device_name(0) if torch is not None and args.device != "cpu" else "CPU only"
    info = machine(dtype="float32", device=f"{args.device} ({device_name})")
    print(machine_line(info) + f"; dim {DIM}; BLAS threads {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}",
          flush=True)
    rows = []
    for n in sorted(s for s in args.sizes if s <= args.max_n):
        emb = np.random.default_rng(args.seed).standard_normal((n, DIM), dtype=np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        for sampler in args.samplers:
            if sampler == "facility_location" and n >= 1_000_000 and torch is None:
                print(f"{sampler:<18} {n:>9,}  skipped: its k-NN search is ≈N²·dim flops, hours on a CPU", flush=True)
                rows.append({"sampler": sampler, "n": n, "skipped": "its k-NN search is ≈N²·dim flops: hours on a "
                             "CPU (a GPU runs it)"})
                continue
            row = run_one(sampler, emb, args.repeats if n < 100_000 else 1, args.device, torch, int(args.kcenter_work))
            print_row(row)
            sys.stdout.flush()
            rows.append(row)
        del emb
    print(json.dumps({"cpu": cpu_model(), "device": device_name, "dtype": "float32", "dim": DIM,
                      "load_average": os.getloadavg()[0], "machine": info, "results": rows}))


if __name__ == "__main__":
    main()

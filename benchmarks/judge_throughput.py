#!/usr/bin/env python
"""AlpaGasus rating throughput: the reference's per-row review loop versus tamis' judge.

One process, one judge model, the same rows:

  (a) reference — gpt4life/alpagasus ``rating/chatgpt_rating.py`` with the API call
      replaced by the same judge running here: each row's system + user messages through
      the chat template, greedy decoding (temperature 0) of the whole review, up to the
      reference's 256 new tokens, one row at a time (``model.generate``); then
      ``get_scores.py``'s parse: ``float`` of the first line, -1 when that fails;
  (b) tamis — `tamis.runtime.judge.rate`: the same prompt and parse, batched greedy
      decoding that stops each row at the end of its first line.

Reported: seconds, rows/s, new tokens generated, and agreement: rows whose first line is
identical, and rows whose score is identical (tamis' null is the reference's -1). The last
line is one JSON object.

    python benchmarks/judge_throughput.py --quick      # < 2 minutes on 2 CPU cores
    python benchmarks/judge_throughput.py --n 32
    python benchmarks/judge_throughput.py --model /path/to/chat-model
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _machine import machine, machine_line  # noqa: E402
from ifd_throughput import best_of, measured, sharegpt_first_turns  # noqa: E402

from tamis.runtime.judge import ALPAGASUS, rate  # noqa: E402
from tamis.runtime.models import LoadedLM, load_causal_lm, resolve_device, smollm2_asset  # noqa: E402


def reference_reviews(lm: LoadedLM, rows: list[dict[str, str]], max_tokens: int) -> tuple[list[str], int]:
    """Whole greedy reviews, one row at a time, as the API would return them."""
    tok = lm.tokenizer
    reviews, generated = [], 0
    with torch.inference_mode():
        for row in rows:
            enc = tok.apply_chat_template(ALPAGASUS.messages(row), add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True).to(lm.device)
            out = lm.model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                    pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
            new = out[0, enc["input_ids"].shape[1]:]
            generated += int(new.numel())
            reviews.append(tok.decode(new, skip_special_tokens=True))
    return reviews, generated


def get_scores_parse(review: str) -> float:
    """get_scores.py, verbatim in behaviour: float of the first line, else -1."""
    try:
        return float(review.split("\n")[0])
    except ValueError:
        return -1.0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a chat model: folder, .gguf or cached hub name (default: offline SmolLM2)")
    ap.add_argument("--n", type=int, default=None, help="rows (default 32; --quick: 8)")
    ap.add_argument("--max-tokens", type=int, default=256, help="new tokens at most (the reference's 256)")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved repeats; the fastest counts")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="fp32", help="the judge's dtype for both phases (default fp32)")
    ap.add_argument("--quick", action="store_true", help="a reduced run, under two minutes on 2 CPU cores")
    args = ap.parse_args(argv)
    n = args.n or (8 if args.quick else 32)
    device = resolve_device(args.device)
    model_path = args.model or smollm2_asset()
    info = machine(dtype=args.dtype, device=str(device))
    print("# " + machine_line(info), flush=True)
    print(f"# device {device} ({torch.get_num_threads()} threads), dtype {args.dtype}, judge {model_path}, rows {n}, "
          f"max_tokens {args.max_tokens}, load {os.getloadavg()[0]:.2f}")
    rows = sharegpt_first_turns(n)
    lm = load_causal_lm(model_path, device=device, dtype=args.dtype)
    rate(lm, rows[:1], max_tokens=4, progress=False)  # warm-up

    runs: dict[str, list[Any]] = {"reference": [], "tamis": []}
    for _ in range(max(1, args.repeat)):
        with measured("reference", device) as ph:
            reviews, ref_tokens = reference_reviews(lm, rows, args.max_tokens)
        runs["reference"].append(ph)
        with measured("tamis", device) as ph:
            table = rate(lm, rows, max_tokens=args.max_tokens, progress=False)
        runs["tamis"].append(ph)
    ph_ref, ph_t = best_of(runs["reference"]), best_of(runs["tamis"])

    ref_lines = [r.split("\n")[0] for r in reviews]
    ref_scores = [get_scores_parse(r) for r in reviews]
    ours = [-1.0 if v is None else v for v in table.value]
    same_line = sum(a == b for a, b in zip(ref_lines, table.first_line))
    same_score = sum(a == b for a, b in zip(ref_scores, ours))
    print(f"{'phase':<10} {'seconds':>8} {'rows/s':>7} {'new tokens':>10} {'peak MB':>8}")
    for ph, tokens in ((ph_ref, ref_tokens), (ph_t, table.new_tokens)):
        print(f"{ph.name:<10} {ph.seconds:8.1f} {n / ph.seconds:7.2f} {tokens:10d} {ph.peak_mem_mb:8.0f}")
    parsed = sum(s != -1.0 for s in ref_scores)
    print(f"# first lines identical: {same_line}/{n}; scores identical: {same_score}/{n}; "
          f"reference reviews with a number on the first line: {parsed}/{n}")
    result = {
        "speedup": ph_ref.seconds / ph_t.seconds,
        "rows_per_s": n / ph_t.seconds,
        "rows_per_s_reference": n / ph_ref.seconds,
        "new_tokens": table.new_tokens,
        "new_tokens_reference": ref_tokens,
        "first_line_agreement": same_line / n,
        "score_agreement": same_score / n,
        "parsed_scores": parsed,
        "rows": n,
        "device": str(device),
        "dtype": args.dtype,
        "load_avg": round(os.getloadavg()[0], 2),
        "machine": info,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

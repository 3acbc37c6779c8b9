#!/usr/bin/env python
"""Nuggets golden-score throughput: the reference loop versus tamis' one-shot scorer.

One process, one model, the same candidates and anchors:

  (a) reference — a re-implementation of pldlgb/nuggets instruction_main.py with
      tasks/loader.py (TokenizedForGenRightPad) and models/meta_optimizer.py at kv_iter=1:
      anchors padded to max_length=200; zero-shot: full logits, log-softmax over the whole
      vocabulary, gather, sum; then per candidate, the demonstration's keys/values from a
      full forward (LM head included), and the anchors in batches of `--ref-batch` over the
      expanded keys/values, again with full logits and log-softmax. The only change:
      transformers 5 takes the keys/values as a `DynamicCache`, not as a list of pairs, and
      padding uses an existing token (the reference adds a `[PAD]` row to the embeddings;
      padded positions are masked either way, so the scored tokens see the same inputs).
  (b) tamis — `score loss … template="nuggets"` for the zero-shot side and
      `tamis.runtime.nuggets.OneShotScorer` for the one-shot side.

Golden score of a candidate = share of anchors whose answer log-probability the one-shot
prompt raises. Reported: seconds of each, `speedup` (a / b), `max_abs_diff` of the
per-token answer losses (reference sums divided by the tokens scored), `golden_equal`
(share of candidates with identical golden scores). The last line is one JSON object.

    python benchmarks/nuggets_throughput.py --quick     # a few minutes on 2 CPU cores
    python benchmarks/nuggets_throughput.py --candidates 32 --anchors 16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _machine import machine, machine_line  # noqa: E402
from ifd_throughput import rows_file, sharegpt_first_turns  # noqa: E402

from tamis.runtime.lm_scoring import score_answers  # noqa: E402
from tamis.runtime.models import LoadedLM, dtype_name, load_causal_lm, smollm2_asset  # noqa: E402
from tamis.runtime.nuggets import OneShotScorer, demonstration_ids, plan_anchors  # noqa: E402


# --------------------------------------------------------------------------- the reference


def _promptify(row: dict[str, str]) -> tuple[str, str]:
    """tasks/alpaca.py multiple_gen_promptify ("sp"), on dataset_preprocess's stripped fields."""
    ins, inp, out = row["instruction"].strip(), (row.get("input") or "").strip(), row["output"].strip()
    query = f"Instruction:\n{ins}\nInput:\n{inp}\nResponse:\n" if inp else f"Instruction:\n{ins}\nResponse:\n"
    return query, query + out


def _ref_tokenize(tok, rows: list[dict[str, str]], max_length: int):
    """TokenizedForGenRightPad: (input_ids, attention_mask, choice_start, choice_end) per anchor."""
    out = []
    for row in rows:
        query, full = _promptify(row)
        q = tok(query, add_special_tokens=False)["input_ids"]
        f_nopad = tok(full, add_special_tokens=False)["input_ids"]
        f = tok(full, padding="max_length", max_length=max_length, add_special_tokens=False, truncation=True)
        out.append((torch.tensor(f["input_ids"]), torch.tensor(f["attention_mask"]), len(q), len(f_nopad)))
    return out


def _ref_logp(logits: torch.Tensor, items) -> list[float]:
    """do_infer_probs*: log-softmax over the vocabulary, gather the choice tokens, sum."""
    logprobs = F.log_softmax(logits, dim=-1)
    sums = []
    for (ids, _, start, end), lp in zip(items, logprobs):
        choice = ids[start:end].unsqueeze(1).to(lp.device)
        extracted = torch.gather(lp[start - 1 : end - 1], -1, choice).squeeze(-1)
        sums.append(torch.sum(extracted).item())
    return sums


def reference_golden(lm: LoadedLM, candidates, anchors, max_length: int, batch: int):
    from transformers import DynamicCache

    tok, model, dev = lm.tokenizer, lm.model, lm.device
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    items = _ref_tokenize(tok, anchors, max_length)
    batches = [items[i : i + batch] for i in range(0, len(items), batch)]
    with torch.no_grad():
        zero = []
        for b in batches:
            ids = torch.stack([x[0] for x in b]).to(dev)
            mask = torch.stack([x[1] for x in b]).to(dev)
            zero += _ref_logp(model(input_ids=ids, attention_mask=mask).logits, b)
        icl = []
        for row in candidates:
            demo = tok(_promptify(row)[1])  # tokenize_demonstration: special tokens, no truncation
            ctx = torch.tensor([demo["input_ids"]], device=dev)
            kv = model(input_ids=ctx, attention_mask=torch.ones_like(ctx), use_cache=True).past_key_values
            pairs = [(layer.keys, layer.values) for layer in kv.layers]
            sums = []
            for b in batches:
                bs = len(b)
                ids = torch.stack([x[0] for x in b]).to(dev)
                mask = torch.stack([x[1] for x in b]).to(dev)
                merged = torch.cat((torch.ones((bs, ctx.shape[1]), dtype=mask.dtype, device=dev), mask), dim=1)
                cache = DynamicCache(ddp_cache_data=[(k.expand(bs, -1, -1, -1), v.expand(bs, -1, -1, -1))
                                                     for k, v in pairs])
                sums += _ref_logp(model(input_ids=ids, attention_mask=merged, past_key_values=cache).logits, b)
            icl.append(sums)
    zero_a = np.array(zero)
    icl_a = np.array(icl)
    golden = (icl_a > zero_a).sum(axis=1) / len(zero)
    n_tokens = np.array([max(0, min(end, max_length) - start) for _, _, start, end in items])
    return golden, zero_a, icl_a, n_tokens


# --------------------------------------------------------------------------- tamis


def tamis_golden(lm: LoadedLM, candidates, anchors, max_length: int, batch_tokens: int | None):
    zero = score_answers(lm, anchors, metric="loss", template="nuggets", max_length=max_length, progress=False)
    z = np.array([np.nan if v is None else v for v in zero.value])
    scorer = OneShotScorer(lm, anchors, max_length=max_length, batch_tokens=batch_tokens)
    one = np.stack([scorer.losses(p) for p in demonstration_ids(lm, candidates)])
    with np.errstate(invalid="ignore"):
        golden = (one < z).sum(axis=1) / len(z)
    return golden, z, one


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder or .gguf (default: offline SmolLM2-135M)")
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--anchors", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=200, help="anchor truncation (Nuggets: 200)")
    ap.add_argument("--ref-batch", type=int, default=1,
                    help="the reference's anchor batch size (its run script takes it as an argument)")
    ap.add_argument("--batch-tokens", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="6 candidates x 8 anchors")
    ap.add_argument("--rows", type=Path, default=None, help="a JSONL file of rows instead of the packaged ShareGPT")
    args = ap.parse_args(argv)
    if args.quick:
        args.candidates, args.anchors = 6, 8

    lm = load_causal_lm(args.model or smollm2_asset(), device=args.device, dtype="fp32")
    info = machine(dtype=dtype_name(lm.dtype), device=str(lm.device))
    print(machine_line(info))
    n = args.candidates + args.anchors
    rows = rows_file(args.rows, n) if args.rows else sharegpt_first_turns(n)
    candidates, anchors = rows[: args.candidates], rows[args.candidates :]
    print(f"model {lm.name} on {lm.device}, {dtype_name(lm.dtype)}; {len(candidates)} candidates x "
          f"{len(anchors)} anchors, max_length {args.max_length}, reference batch {args.ref_batch}")

    # Untimed warm-up of both paths (CUDA context, kernels, allocator): one candidate x two anchors.
    reference_golden(lm, candidates[:1], anchors[:2], args.max_length, args.ref_batch)
    tamis_golden(lm, candidates[:1], anchors[:2], args.max_length, args.batch_tokens)

    t0 = time.perf_counter()
    g_ref, zero_ref, icl_ref, n_tok = reference_golden(lm, candidates, anchors, args.max_length, args.ref_batch)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    g_tam, zero_tam, one_tam = tamis_golden(lm, candidates, anchors, args.max_length, args.batch_tokens)
    t_tam = time.perf_counter() - t0

    scored = n_tok > 0
    ref_loss_zero = -zero_ref[scored] / n_tok[scored]
    ref_loss_one = -icl_ref[:, scored] / n_tok[scored]
    diff = max(float(np.nanmax(np.abs(ref_loss_zero - zero_tam[scored]))),
               float(np.nanmax(np.abs(ref_loss_one - one_tam[:, scored]))))
    plan = plan_anchors(lm, anchors, args.max_length)
    result = {
        "benchmark": "nuggets_throughput", "machine": info, "model": lm.name, "device": str(lm.device),
        "dtype": dtype_name(lm.dtype), "candidates": len(candidates), "anchors": len(anchors),
        "anchor_tokens": int(sum(len(s) for s in plan.seqs)), "ref_batch": args.ref_batch,
        "reference_seconds": round(t_ref, 2), "tamis_seconds": round(t_tam, 2),
        "speedup": round(t_ref / t_tam, 2), "max_abs_diff": diff,
        "golden_equal": float(np.mean(g_ref == g_tam)),
    }
    print(f"reference {t_ref:.1f} s, tamis {t_tam:.1f} s: {result['speedup']}x; "
          f"max |d loss| {diff:.2e}; golden scores equal for {result['golden_equal']:.0%} of candidates")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

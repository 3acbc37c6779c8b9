#!/usr/bin/env python
"""LESS gradient-feature throughput: the reference loop versus tamis' batched features.

One process, one model (the offline SmolLM2-135M, fp32), one LoRA warmup, the same rows:

  (a) reference — a re-implementation of princeton-nlp/LESS less/data_selection/
      collect_grad_reps.py (collect_grads): batch size 1, ``model(**batch).loss`` over
      full-vocabulary logits, one ``backward()`` per row, the ``p.grad`` of every LoRA
      weight concatenated, Adam-preconditioned with the checkpoint's moments (training
      rows) or left plain (target rows), ``model.zero_grad()``, and the stacked gradients
      projected every 16 rows, rows L2-normalised at the end. Differences, on purpose:
      the projection is tamis' `RademacherProjector` (not TRAK's, so both sides give the
      same features), applied in float32 (the reference casts the gradients to fp16 first),
      and, like TRAK's, it keeps no matrix between calls (tamis' sign cache is off for it);
  (b) tamis — `tamis.runtime.less.gradient_features`: length-bucketed batches, one
      forward + backward per batch, per-row LoRA gradients from hooks, answer-only LM
      head, projection of every buffered row per pass over the matrix.

The adapter: a real LoRA warmup (`train_warmup`, save_optimizer_state=True) on a few
ShareGPT rows, two epochs (two checkpoints with Adam moments and mean learning rates).
Training rows get Adam features, target rows plain ones, at every checkpoint; influence
is LESS's matching (`tamis.runtime.less.influence`, two target subtasks).

Reported: seconds and features/s of each, the time by phase (model forward+backward,
Adam step, projection — of which generating the matrix), tokens, `speedup` (a / b),
`max_rel_diff` (max over rows and checkpoints of |f_tamis - f_ref| / |f_ref|),
`influence_spearman` (Spearman correlation of the training rows' influence scores, tamis
vs reference). The last line is one JSON object.

    python benchmarks/less_gradients.py --quick         # a few minutes on 2 CPU cores
    python benchmarks/less_gradients.py --rows 256 --dim 8192 --device cuda
    python benchmarks/less_gradients.py --device cuda --rows 128 --fp64-audit   # + distances from fp64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
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

from tamis.runtime import less  # noqa: E402
from tamis.runtime.less import (  # noqa: E402
    RademacherProjector,
    adam_precondition,
    adapter,
    checkpoint_weights,
    gradient_features,
    influence,
)
from tamis.runtime.models import LoadedLM, dtype_name, load_causal_lm, smollm2_asset  # noqa: E402
from tamis.runtime.training import TrainConfig, encode_training_examples, load_optimizer_moments, train_warmup  # noqa: E402

PROJECT_INTERVAL = 16  # collect_grads: project every 16 rows


# --------------------------------------------------------------------------- the reference


def reference_features(lm: LoadedLM, checkpoint: Path, examples, dim: int, adam: bool,
                       exact_loss: bool = False) -> tuple[np.ndarray, dict]:
    """collect_grads, row by row (see the module note). Returns ([n, dim] normalised, phase seconds).

    ``exact_loss`` (the fp64 audit's ground truth): the cross-entropy in the model's dtype.
    transformers' loss casts the logits to fp32 first, which for an fp64 model would round
    exactly the quantity that decides a confident token's gradient (p - 1)."""
    # TRAK's projector keeps no matrix between calls: every 16-row projection generates it
    # again (BasicProjector; the CUDA one generates it inside its kernel). tamis' process-wide
    # sign cache is therefore off while the reference runs.
    saved = less.SIGN_CACHE_BYTES
    less.SIGN_CACHE_BYTES = 0
    try:
        return _reference_features(lm, checkpoint, examples, dim, adam, exact_loss)
    finally:
        less.SIGN_CACHE_BYTES = saved


def _reference_features(lm: LoadedLM, checkpoint: Path, examples, dim: int, adam: bool,
                        exact_loss: bool) -> tuple[np.ndarray, dict]:
    dev = lm.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t = {"model": 0.0, "precondition": 0.0, "projection": 0.0}
    with adapter(lm, checkpoint) as model:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if adam:  # prepare_optimizer_state
            m, v, _ = load_optimizer_moments(checkpoint)
            avg = torch.cat([m[n].view(-1) for n in names]).to(dev)
            avg_sq = torch.cat([v[n].view(-1) for n in names]).to(dev)
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        projector = RademacherProjector(n_params, dim, seed=0, device=dev)
        full, projected = [], []

        def project() -> None:
            sync()
            t0 = time.perf_counter()
            projected.append(projector.project(torch.stack(full)).cpu())
            sync()
            t["projection"] += time.perf_counter() - t0
            full.clear()

        for count, ex in enumerate(examples, 1):
            sync()
            t0 = time.perf_counter()
            ids = torch.tensor([ex.input_ids], device=dev)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([ex.labels], device=dev)}
            if exact_loss:
                logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
                loss = F.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=-100)
            else:
                loss = model(**batch).loss
            loss.backward()
            g = torch.cat([p.grad.view(-1) for _, p in model.named_parameters() if p.grad is not None])
            sync()
            t1 = time.perf_counter()
            if adam:  # obtain_gradients_with_adam
                g = adam_precondition(g, avg, avg_sq)
            sync()
            t2 = time.perf_counter()
            full.append(g)
            model.zero_grad()
            t["model"] += t1 - t0
            t["precondition"] += t2 - t1
            if count % PROJECT_INTERVAL == 0:
                project()
        if full:
            project()
    t["generating"] = projector.seconds_generating
    return F.normalize(torch.cat(projected), dim=1).numpy(), t


# --------------------------------------------------------------------------- fp64 audit


def _rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row |a - b| / |b|."""
    return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)


def fp64_audit(args, lm32: LoadedLM, jobs, ref32: list[np.ndarray], tam32: list[np.ndarray]) -> dict:
    """How far each fp32 side is from the fp64 value, same checkpoints and rows (untimed).

    The fp64 value ("truth") is the reference loop on the model in fp64 with its
    cross-entropy in fp64 too. tamis in fp64 against it says whether the two algorithms
    are the same (they then agree to fp64 rounding); each fp32 side against it says how
    much of a difference between the fp32 sides is fp32 rounding, and whose. A confident
    answer token's gradient is a sum of vocabulary terms that nearly cancel (p - 1 against
    the other p's), so fp32 loses digits there on both sides, in an order each kernel picks.
    Also tamis in fp32 with the LM head's backward as one matrix product (as autograd's
    linear backward does it) instead of tamis' blocks of 4096 vocabulary entries.
    `jobs` and the feature lists are in the same order: the train jobs of every checkpoint,
    then the target jobs (as the timed loop appends them).
    """
    order = [j for j in jobs if j[2]] + [j for j in jobs if not j[2]]

    def tamis(lm: LoadedLM) -> list[np.ndarray]:
        return [gradient_features(lm, c, ex, dim=args.dim, seed=0, precondition="adam" if adam else "none",
                                  batch_tokens=args.batch_tokens, progress=False).features for c, ex, adam in order]

    saved = less._VOCAB_BLOCK
    less._VOCAB_BLOCK = 1 << 30
    try:
        one32 = tamis(lm32)
    finally:
        less._VOCAB_BLOCK = saved
    lm = load_causal_lm(args.model or smollm2_asset(), device=args.device, dtype=torch.float64)
    truth = [reference_features(lm, c, ex, args.dim, adam, exact_loss=True)[0] for c, ex, adam in order]
    tam64 = tamis(lm)
    del lm
    f64 = lambda x: np.concatenate(x).astype(np.float64)  # noqa: E731
    t = f64(truth)
    stats = lambda x: {"median": float(np.median(x)), "max": float(np.max(x))}  # noqa: E731
    out = {
        "tamis_fp64_vs_truth": stats(_rel(f64(tam64), t)),
        "reference_fp32_vs_truth": stats(_rel(f64(ref32), t)),
        "tamis_fp32_vs_truth": stats(_rel(f64(tam32), t)),
        "tamis_fp32_one_head_product_vs_truth": stats(_rel(f64(one32), t)),
        "tamis_fp32_one_head_product_vs_reference_fp32": stats(_rel(f64(one32), f64(ref32))),
    }
    print("fp64 audit (per-row relative difference, median / max):\n"
          + "\n".join(f"  {k}: {v['median']:.2e} / {v['max']:.2e}" for k, v in out.items()), flush=True)
    return out


# --------------------------------------------------------------------------- main


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder or .gguf (default: offline SmolLM2-135M)")
    ap.add_argument("--rows", type=int, default=64, help="training rows to featurise")
    ap.add_argument("--targets", type=int, default=8, help="target rows (plain gradients), split into two subtasks")
    ap.add_argument("--warmup-rows", type=int, default=16)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-targets", default="q_proj,v_proj")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-tokens", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--quick", action="store_true",
                    help="16 rows, 4 targets, warmup on 4, r=8 on q/v, dim 1024, max_length 256")
    ap.add_argument("--data", type=Path, default=None, help="a JSONL file of rows instead of the packaged ShareGPT")
    ap.add_argument("--fp64-audit", action="store_true",
                    help="after the timed run, recompute both sides' features with the model in fp64 (untimed) and "
                         "report how far each fp32 side is from its fp64 value, and the two fp64 sides from each other")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.targets, args.warmup_rows, args.dim, args.max_length = 16, 4, 4, 1024, 256

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_causal_lm(args.model or smollm2_asset(), device=args.device, dtype="fp32")
    info = machine(dtype=dtype_name(lm.dtype), device=str(lm.device))
    print(machine_line(info), flush=True)
    if lm.device.type == "cuda":  # fp32 matmuls must be IEEE fp32 here, not TF32
        print(f"CUDA fp32 matmul: allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
              f"precision={torch.get_float32_matmul_precision()}; cuDNN allow_tf32={torch.backends.cudnn.allow_tf32}",
              flush=True)
    # Rows whose prompt leaves room for an answer within max_length (others have no feature).
    want = args.warmup_rows + args.rows + args.targets
    pool = rows_file(args.data, 4 * want) if args.data else sharegpt_first_turns(4 * want)
    examples, _ = encode_training_examples(lm, pool, "alpaca", args.max_length)
    usable = [pool[e.row] for e in examples]
    if len(usable) < want:
        raise SystemExit(f"only {len(usable)} of {len(pool)} rows fit max_length {args.max_length}; {want} needed")
    warm_rows = usable[: args.warmup_rows]
    train_rows = usable[args.warmup_rows : args.warmup_rows + args.rows]
    target_rows = usable[args.warmup_rows + args.rows : want]

    cfg = TrainConfig(lora_r=args.lora_r, lora_alpha=4 * args.lora_r, lora_dropout=0.1,
                      target_modules=tuple(args.lora_targets.split(",")), epochs=2, batch_size=2,
                      learning_rate=1e-3, warmup_ratio=0.0, max_length=args.max_length, save_optimizer_state=True)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train_warmup(lm, warm_rows, cfg, Path(tmp) / "warmup", progress=False)
        t_warm = time.perf_counter() - t0
        ckpts, weights = checkpoint_weights(Path(tmp) / "warmup")
        train_ex, _ = encode_training_examples(lm, train_rows, cfg.template, cfg.max_length)
        target_ex, _ = encode_training_examples(lm, target_rows, cfg.template, cfg.max_length)
        tokens = sum(len(e.input_ids) for e in train_ex + target_ex)
        answer = sum(e.n_answer_tokens for e in train_ex + target_ex)
        print(f"model {lm.name} on {lm.device}, {dtype_name(lm.dtype)}; LoRA r={args.lora_r} on {args.lora_targets}; "
              f"warmup on {len(warm_rows)} rows, {len(ckpts)} checkpoints ({t_warm:.1f} s); {len(train_ex)} training rows "
              f"(Adam) + {len(target_ex)} target rows (plain) per checkpoint; dim {args.dim}; max_length {args.max_length}; "
              f"{tokens} tokens per checkpoint, {answer / tokens:.0%} of them answer tokens", flush=True)

        # Untimed warm-up of both paths (one-time costs: the split check, allocator, kernels).
        reference_features(lm, ckpts[0], train_ex[:2], 64, adam=True)
        gradient_features(lm, ckpts[0], train_ex[:2], dim=64, progress=False)

        # Interleaved (reference, tamis, tamis, reference, ...) so that a busy machine slows both alike.
        ref_train, ref_target, tam_train, tam_target = [], [], [], []
        ref_t = {"model": 0.0, "precondition": 0.0, "projection": 0.0, "generating": 0.0}
        tam_t = dict(ref_t)
        t_ref = t_tam = 0.0
        batches = padded = 0
        jobs = [(c, ex, adam) for c in ckpts for ex, adam in ((train_ex, True), (target_ex, False))]
        for k, (c, ex, adam) in enumerate(jobs):
            for side in (("ref", "tamis") if k % 2 == 0 else ("tamis", "ref")):
                t0 = time.perf_counter()
                if side == "ref":
                    f, t = reference_features(lm, c, ex, args.dim, adam)
                    t_ref += time.perf_counter() - t0
                    (ref_train if adam else ref_target).append(f)
                    for key in ref_t:
                        ref_t[key] += t[key]
                else:
                    r = gradient_features(lm, c, ex, dim=args.dim, seed=0, precondition="adam" if adam else "none",
                                          batch_tokens=args.batch_tokens, progress=False)
                    t_tam += time.perf_counter() - t0
                    (tam_train if adam else tam_target).append(r.features)
                    s = r.stats
                    tam_t["model"] += s.seconds_gradients
                    tam_t["precondition"] += s.seconds_precondition
                    tam_t["projection"] += s.seconds_projection
                    tam_t["generating"] += s.seconds_generating
                    batches += s.batches
                    padded += s.padded_tokens
        audit = (fp64_audit(args, lm, jobs, ref_train + ref_target, tam_train + tam_target)
                 if args.fp64_audit else None)

    ref_all = np.concatenate(ref_train + ref_target)
    tam_all = np.concatenate(tam_train + tam_target)
    rel = float(np.max(np.linalg.norm(tam_all - ref_all, axis=1) / np.linalg.norm(ref_all, axis=1)))
    subtasks = [j % 2 for j in range(len(target_ex))]
    inf_ref = influence(np.stack(ref_train, axis=1), np.stack(ref_target, axis=1), weights, subtasks)
    inf_tam = influence(np.stack(tam_train, axis=1), np.stack(tam_target, axis=1), weights, subtasks)
    rho = _spearman(inf_ref, inf_tam)
    n_feat = len(ckpts) * (len(train_ex) + len(target_ex))
    phases = lambda t: ", ".join(f"{k} {v:.1f} s" for k, v in t.items())  # noqa: E731
    print(f"reference: {t_ref:.1f} s, {n_feat / t_ref:.2f} features/s ({phases(ref_t)}); "
          f"{n_feat} rows one at a time, {sum(-(-len(e) // PROJECT_INTERVAL) for e in (train_ex, target_ex)) * len(ckpts)} projection passes")
    print(f"tamis:     {t_tam:.1f} s, {n_feat / t_tam:.2f} features/s ({phases(tam_t)}); "
          f"{batches} batches, {padded} padded tokens for {tokens * len(ckpts)} real")
    print(f"speedup {t_ref / t_tam:.2f}x (model phase {ref_t['model'] / max(tam_t['model'], 1e-9):.2f}x); "
          f"max relative feature difference {rel:.2e}; influence Spearman {rho:.6f}")
    result = {
        "benchmark": "less_gradients", "machine": info, "model": lm.name, "device": str(lm.device),
        "dtype": dtype_name(lm.dtype), "rows": len(train_ex), "targets": len(target_ex), "checkpoints": len(ckpts),
        "dim": args.dim, "lora_r": args.lora_r, "lora_targets": args.lora_targets, "max_length": args.max_length,
        "tokens_per_checkpoint": tokens, "answer_token_share": round(answer / tokens, 3),
        "reference_seconds": round(t_ref, 2), "tamis_seconds": round(t_tam, 2),
        "reference_phases": {k: round(v, 2) for k, v in ref_t.items()},
        "tamis_phases": {k: round(v, 2) for k, v in tam_t.items()},
        "reference_features_per_second": round(n_feat / t_ref, 3), "tamis_features_per_second": round(n_feat / t_tam, 3),
        "speedup": round(t_ref / t_tam, 2), "model_phase_speedup": round(ref_t["model"] / max(tam_t["model"], 1e-9), 2),
        "max_rel_diff": rel, "influence_spearman": rho,
    }
    if audit is not None:
        result["fp64_audit"] = audit
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""Instruction-Mining and InstructionGPT-4 end to end on real ShareGPT rows with the offline SmolLM2.

    .venv/bin/python examples/probes_demo.py [--out out/probes-demo] [--probes 6] [--probe-rows 40]

The probes are real: SmolLM2-135M-Instruct fine-tuned (LoRA) on each subset and evaluated on held-out
ShareGPT rows. The reward model and the UniEval evaluator of the published recipes have no offline
weights here, so this demo binds their names to tiny randomly initialised encoders built on the spot
(the machinery runs for real; their scores mean nothing); on your machine, bind the real ones:
`--model OpenAssistant/reward-model-deberta-v3-large=PATH --model MingZhong/unieval-dialog=PATH`.
InstructionGPT-4's GPT-4 rating is served by SmolLM2 as a local judge (`--model gpt-4=PATH`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/probes-demo")
    ap.add_argument("--pool-rows", type=int, default=300)
    ap.add_argument("--eval-rows", type=int, default=40)
    ap.add_argument("--probes", type=int, default=6)
    ap.add_argument("--probe-rows", type=int, default=40)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", default="0.0005", help="a probe's LoRA learning rate (tiny probes need more than 2e-5)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--only", choices=["instruction_mining", "instructiongpt4"], default=None)
    ap.add_argument("--igpt4-features", default='["reward", "length"]',
                    help="InstructionGPT-4's selector features: SmolLM2 never answers the GPT-4 rating prompt with "
                         "a number, so gpt4_score is left out by default (it is still scored, and null)")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_encoders import build_tiny_rm, build_tiny_t5

    from tamis.runtime.data import load_pool, sharegpt_asset_path
    from tamis.runtime.models import smollm2_asset
    from tamis.runtime.outputs import write_jsonl

    out = Path(args.out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    rows = load_pool(str(sharegpt_asset_path()), skip_bad=True, limit=args.pool_rows + args.eval_rows).frame
    pool, evaluation = out / "pool.jsonl", out / "eval.jsonl"
    write_jsonl(rows.head(args.pool_rows), pool)  # the probes train on subsets of the pool's rows
    write_jsonl(rows.tail(args.eval_rows), evaluation)  # held out: never in the pool
    rm = out / "models" / "tiny_rm"
    t5 = out / "models" / "tiny_unieval"
    if not (rm / "config.json").exists():
        rm.mkdir(exist_ok=True)
        build_tiny_rm(rm)
    if not (t5 / "config.json").exists():
        t5.mkdir(exist_ok=True)
        build_tiny_t5(t5, [])
    smol = smollm2_asset()
    tamis = str(Path(sys.executable).with_name("tamis"))
    common = ["--pool", str(pool), "--pfm", smol, "--cache-dir", str(out / "cache"),
              "--param", f"n_probes={args.probes}", "--param", f"probe_rows={args.probe_rows}",
              "--param", f"max_length={args.max_length}", "--param", f"lr={args.lr}", "--param", f"batch={args.batch}",
              "--model", f"OpenAssistant/reward-model-deberta-v3-large={rm}"]
    runs = {
        "instruction_mining": ["--param", f"train_file=\"{pool}\"", "--param", f"eval_file=\"{evaluation}\"",
                               "--param", "size=30", "--model", f"MingZhong/unieval-dialog={t5}"],
        "instructiongpt4": ["--param", f"train_file=\"{pool}\"", "--param", "size=30", "--model", f"gpt-4={smol}",
                            "--param", f"features={args.igpt4_features}"],
    }
    for recipe, extra in runs.items():
        if args.only and recipe != args.only:
            continue
        cmd = [tamis, "run", recipe, *common, *extra, "-o", str(out / f"{recipe}.jsonl")]  # + .report.md beside
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        print(f"{recipe}: {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()

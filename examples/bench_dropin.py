"""Benchmark: Megatron-LM drop-in features of issue 21 slice A, end to end on --mock-data.

Runs ``megatron_tst.pretrain`` in this process once per variant (same model, data, seed) and reports
each variant's median step time over the steps after --warmup (from its metrics.jsonl), and the
ratio to the first variant:
  fp32          the reference
  bf16          --bf16
  fp16          --fp16 (dynamic loss scaling from --initial-loss-scale 1024; skipped steps counted)
  workers=2     fp32 with --num-workers 2 (samples read by DataLoader workers)
  ramp          fp32 with --train-samples and --rampup-batch-size (the per-step batch grows; time per
                sample is reported instead of per step)
Variants run one after another: run it on a quiet machine, and compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import megatron_tst  # noqa: F401  (first: the CPU compatibility layer)

from megatron_tst import pretrain

VARIANTS = {
    "fp32": [],
    "bf16": ["--bf16"],
    "fp16": ["--fp16", "--initial-loss-scale", "1024"],
    "workers=2": ["--num-workers", "2"],
}


def rows(save):
    with open(os.path.join(save, "metrics.jsonl")) as handle:
        return [row for row in map(json.loads, handle) if "loss" in row]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8191, help="NullTokenizer's --vocab-size N (vocabulary N+1)")
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the median")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 layers, hidden 64, L=32, 4 steps")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.hidden, args.vocab, args.seq_length, args.steps, args.warmup = 2, 64, 511, 32, 4, 1
    common = ["--num-layers", str(args.layers), "--hidden-size", str(args.hidden), "--num-attention-heads", "4",
              "--seq-length", str(args.seq_length), "--max-position-embeddings", str(args.seq_length),
              "--vocab-size", str(args.vocab), "--tokenizer-type", "NullTokenizer", "--mock-data",
              "--micro-batch-size", str(args.micro_batch), "--lr", "1e-4", "--log-interval", "1",
              "--hidden-dropout", "0", "--attention-dropout", "0"]
    variants = dict(VARIANTS)
    samples = args.steps * args.global_batch
    variants["ramp"] = ["--train-samples", str(samples), "--rampup-batch-size", str(args.micro_batch),
                        str(args.micro_batch), str(samples // 4)]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, extra in variants.items():
            save = os.path.join(folder, name.replace("=", "_"))
            schedule = [] if "--train-samples" in extra else ["--train-iters", str(args.steps)]
            argv = common + ["--global-batch-size", str(args.global_batch), "--save", save] + schedule + extra
            if pretrain.main(argv) != 0:
                sys.exit(f"{name}: pretrain failed")
            steps = rows(save)
            positions = [b["latent_positions"] - a["latent_positions"]
                         for a, b in zip([{"latent_positions": 0}] + steps, steps)]
            timed = list(zip(steps, positions))[args.warmup:]
            results[name] = dict(step=statistics.median(row["step_time_s"] for row, _ in timed),
                                 sample=statistics.median(row["step_time_s"] * args.seq_length / p for row, p in timed),
                                 skipped=sum(row["grad_norm"] is None for row in steps))
    base = results["fp32"]
    print(f"{'variant':10s} {'step ms':>9s} {'x fp32':>7s} {'ms/sample':>10s} {'x fp32':>7s} skipped")
    for name, result in results.items():
        print(f"{name:10s} {1e3 * result['step']:9.1f} {result['step'] / base['step']:7.2f} "
              f"{1e3 * result['sample']:10.2f} {result['sample'] / base['sample']:7.2f} {result['skipped']:7d}")


if __name__ == "__main__":
    main()

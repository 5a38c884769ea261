"""Benchmark: a phase-1 TST step vs a baseline next-token step of the same model, equal latent length.

One TSTGPTModel (``build_gpt_model(arch, transformer_config(arch), tst=True)``), L latent positions
per sample, b samples:
  baseline   tokens (b, L), labels (b, L) = (raw[:, :-1], raw[:, 1:]) of raw (b, L+1): megatron-core's
             own cross-entropy path
  TST s      tokens (b, L, s), labels (b, L, s) = split_sample(raw, s) of raw (b, s*L+1): bag
             embedding + fused multi-hot CE
Both: position ids arange(L) expanded to (b, L), attention mask None (causal), loss =
out.sum() / num_valid_targets(labels), backward, and (unless --no-optimizer) torch AdamW step.
Steps are interleaved (baseline, TST s1, TST s2, ..., repeated) so machine noise hits every kind
alike; the script reports each kind's median step time and the TST/baseline ratio, and the ratio
of the per-round medians (TST step / the baseline step of the same round) as a second estimate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import megatron_tst  # noqa: F401  (first: the CPU compatibility layer)

import torch

from megatron_tst import parallel
from megatron_tst.models import build_gpt_model, preset, transformer_config
from megatron_tst.tst import num_valid_targets, split_sample


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--groups", type=int, default=2, help="query groups (GQA)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-length", type=int, default=256, help="latent length L")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--bag-sizes", type=int, nargs="+", default=[4, 6, 16])
    parser.add_argument("--steps", type=int, default=15, help="timed rounds (one step of each kind per round)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--no-optimizer", action="store_true", help="forward + backward only")
    parser.add_argument("--bf16", action="store_true", help="bf16 parameters and activations")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 layers, vocab 4096, L=64, 3 steps")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.vocab, args.seq_length, args.steps, args.warmup = 2, 4096, 64, 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    parallel.initialize(seed=1)
    arch = preset("tiny", num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                  num_attention_heads=args.heads, num_query_groups=args.groups, vocab_size=args.vocab,
                  max_position_embeddings=args.seq_length)
    model = build_gpt_model(arch, transformer_config(arch, bf16=args.bf16), tst=True, seq_length=args.seq_length)
    if args.bf16:
        model = model.bfloat16()
    model.train()
    optimizer = None if args.no_optimizer else torch.optim.AdamW(model.parameters(), lr=1e-4)
    positions = torch.arange(args.seq_length).expand(args.batch, args.seq_length)
    generator = torch.Generator().manual_seed(0)

    def batch(bag):
        raw = torch.randint(0, args.vocab, (args.batch, max(bag, 1) * args.seq_length + 1), generator=generator)
        return (raw[:, :-1], raw[:, 1:]) if bag == 0 else split_sample(raw, bag)

    def step(tokens, labels):
        started = time.perf_counter()
        loss = model(tokens, positions, None, labels=labels).sum() / num_valid_targets(labels)
        model.zero_grad(set_to_none=True)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        return time.perf_counter() - started

    kinds = [0, *args.bag_sizes]  # 0: the baseline next-token step
    batches = {kind: batch(kind) for kind in kinds}
    for tokens, labels in batches.values():
        assert tokens.shape[:2] == (args.batch, args.seq_length) and labels.shape[:2] == tokens.shape[:2]
    parameters = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"model: {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, heads {args.heads}, "
          f"groups {args.groups}, vocab {args.vocab} ({parameters / 1e6:.1f}M parameters), L={args.seq_length}, "
          f"b={args.batch}, {'bf16' if args.bf16 else 'fp32'}, "
          f"{'forward+backward' if args.no_optimizer else 'forward+backward+AdamW'}", flush=True)
    started = time.time()
    for _ in range(args.warmup):
        for kind in kinds:
            step(*batches[kind])
    times = {kind: [] for kind in kinds}
    for _ in range(args.steps):
        for kind in kinds:
            times[kind].append(step(*batches[kind]))
    baseline = statistics.median(times[0])
    print(f"median of {args.steps} interleaved rounds after {args.warmup} warm-up rounds "
          f"({time.time() - started:.0f} s, load average {os.getloadavg()[0]:.2f})\n")
    print("| step | raw tokens / sample | median ms | min ms | vs baseline (medians) | vs baseline (per-round median) |")
    print("|---|---|---|---|---|---|")
    print(f"| baseline next-token | {args.seq_length + 1} | {1000 * baseline:.1f} | {1000 * min(times[0]):.1f} "
          f"| 1.000x | 1.000x |")
    for bag in args.bag_sizes:
        median = statistics.median(times[bag])
        paired = statistics.median(t / b for t, b in zip(times[bag], times[0]))
        print(f"| TST s={bag} | {bag * args.seq_length + 1} | {1000 * median:.1f} | {1000 * min(times[bag]):.1f} "
              f"| {median / baseline:.3f}x | {paired:.3f}x |")
    parallel.shutdown()


if __name__ == "__main__":
    main()

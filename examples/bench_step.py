"""Benchmark: a phase-1 TST step vs a baseline next-token step of the same model and latent length.

Both steps are forward + backward + AdamW on the same megatron-core model (TSTGPTModel), L latent
positions per sample: the TST step takes bags (b, L, s) and next-bag labels (b, L, s), i.e. s times
the raw tokens; the baseline takes tokens (b, L) and labels (b, L). Steps are interleaved
(baseline, TST s1, TST s2, ..., repeated) so machine noise hits all alike; the script reports the
median step time of each and the TST/baseline ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import megatron_tst  # noqa: F401  (first: CPU platform layer)

import torch

from megatron_tst import parallel
from megatron_tst.models import build_gpt_model, preset, transformer_config
from megatron_tst.tst import num_valid_targets, split_sample


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--bag-sizes", type=int, nargs="+", default=[4, 6, 16])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    parallel.initialize(seed=1)
    arch = preset("tiny", num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden,
                  num_attention_heads=max(1, args.hidden // 64), num_query_groups=max(1, args.hidden // 128),
                  vocab_size=args.vocab, max_position_embeddings=args.seq_length)
    model = build_gpt_model(arch, transformer_config(arch, bf16=args.bf16), seq_length=args.seq_length)
    if args.bf16:
        model = model.bfloat16()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    positions = torch.arange(args.seq_length).expand(args.batch, args.seq_length)
    generator = torch.Generator().manual_seed(0)

    def batch(bag):
        raw = torch.randint(0, args.vocab, (args.batch, max(bag, 1) * args.seq_length + 1), generator=generator)
        return (raw[:, :-1], raw[:, 1:]) if bag == 0 else split_sample(raw, bag)

    def step(tokens, labels):
        started = time.perf_counter()
        loss = model(tokens, positions, None, labels=labels).sum() / num_valid_targets(labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - started

    kinds = [0, *args.bag_sizes]  # 0: the baseline next-token step
    batches = {kind: batch(kind) for kind in kinds}
    for kind in kinds:  # warm-up
        step(*batches[kind])
    times = {kind: [] for kind in kinds}
    for _ in range(args.steps):
        for kind in kinds:
            times[kind].append(step(*batches[kind]))
    baseline = statistics.median(times[0])
    print(f"model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, L={args.seq_length}, "
          f"b={args.batch}, {'bf16' if args.bf16 else 'fp32'}; median of {args.steps} interleaved steps")
    print(f"  baseline next-token step: {1000 * baseline:7.1f} ms")
    for bag in args.bag_sizes:
        median = statistics.median(times[bag])
        print(f"  TST phase-1 step, s={bag:2d}: {1000 * median:7.1f} ms  ({median / baseline:.3f}x baseline, "
              f"{bag}x the raw tokens)")
    parallel.shutdown()


if __name__ == "__main__":
    main()

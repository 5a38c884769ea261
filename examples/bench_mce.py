"""Benchmark: the fused MCE vs the paper's Listing-3 loop vs one ordinary cross-entropy.

Same logits for every method: N latent positions x V vocabulary, bf16 with requires_grad (what the
output layer hands the loss in bf16 training; every method computes in fp32 inside). Forward and
backward are timed together. Methods:
  fused      megatron_tst's fused_vocab_parallel_mce with s targets per position
  listing3   the paper's loop: fp32 logits, s calls of F.cross_entropy, weighted mean
  megatron   ONE ordinary CE, megatron-core's vocab_parallel_cross_entropy (the baseline it replaces)
  torch      ONE ordinary CE, F.cross_entropy on the fp32-cast logits
Time: median over --repeats runs after a warm-up, methods interleaved. Peak memory: each
(method, V, s) runs once more in a fresh process, which samples its resident memory every 0.2 ms
during forward+backward and reports the peak minus the level before (inputs already allocated).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import megatron_tst  # noqa: F401  (first: CPU platform layer)

import torch
import torch.nn.functional as F

METHODS = ("fused", "listing3", "megatron", "torch")


def make_inputs(positions: int, vocab: int, bag: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(positions, vocab, generator=generator) * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (positions, bag), generator=generator)
    return logits, labels


def loss_of(method: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from megatron_tst.tst import fused_vocab_parallel_mce, mce_target_weights

    if method == "fused":
        return fused_vocab_parallel_mce(logits, labels, mce_target_weights(labels)).mean()
    if method == "listing3":
        pred = logits.float()
        return sum(F.cross_entropy(pred, labels[:, i]) for i in range(labels.shape[1])) / labels.shape[1]
    if method == "megatron":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        return vocab_parallel_cross_entropy(logits, labels[:, 0]).mean()
    if method == "torch":
        return F.cross_entropy(logits.float(), labels[:, 0])
    raise ValueError(method)


def run_once(method, logits, labels) -> float:
    logits.grad = None
    started = time.perf_counter()
    loss_of(method, logits, labels).backward()
    return time.perf_counter() - started


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_child(args) -> None:
    """In a fresh process: the peak resident-memory increase (MiB) during one forward+backward,
    sampled every 0.2 ms by a thread (torch kernels release the GIL), inputs already allocated."""
    from megatron_tst import parallel

    parallel.initialize()
    logits, labels = make_inputs(args.positions, args.vocab_one, args.bag_one, getattr(torch, args.dtype))
    loss_of(args.method, *make_inputs(8, 64, args.bag_one, getattr(torch, args.dtype))).backward()  # warm up
    before, peak, done = current_rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], current_rss_bytes())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    run_once(args.method, logits, labels)
    done.set()
    sampler.join()
    peak[0] = max(peak[0], current_rss_bytes())
    print(json.dumps({"peak_mib": (peak[0] - before) / 2**20}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--positions", type=int, default=None, help="latent positions (default 2048 at 32k, "
                        "1024 at 128k)")
    parser.add_argument("--bag-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 repeats")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--vocab-one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bag-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if args.child:
        return peak_memory_child(args)
    if args.quick:
        args.vocab, args.repeats = [4096], 2

    from megatron_tst import parallel

    parallel.initialize()
    dtype = getattr(torch, args.dtype)
    rows = []
    for vocab in args.vocab:
        positions = args.positions or (2048 if vocab <= 65536 else 1024)
        if args.quick:
            positions = 256
        for bag in args.bag_sizes:
            logits, labels = make_inputs(positions, vocab, bag, dtype)
            # the one-target CEs run in every row too, so each ratio compares runs under the same
            # conditions (the Listing-3 loop's large allocations change page-fault costs for all)
            methods = list(METHODS)
            times = {m: [] for m in methods}
            for m in methods:
                run_once(m, logits, labels)  # warm-up
            for _ in range(args.repeats):
                for m in methods:
                    times[m].append(run_once(m, logits, labels))
            medians = {m: statistics.median(t) for m, t in times.items()}
            memory = {}
            if not args.no_memory:
                for m in methods:
                    command = [sys.executable, __file__, "--child", "--method", m, "--vocab-one", str(vocab),
                               "--bag-one", str(bag), "--positions", str(positions), "--dtype", args.dtype]
                    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                    memory[m] = json.loads(output.strip().splitlines()[-1])["peak_mib"]
            row = dict(vocab=vocab, positions=positions, bag=bag, time_ms={m: 1000 * t for m, t in medians.items()},
                       peak_mib=memory)
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\nV, N, s | time ms: fused, listing3, megatron CE, torch CE | fused/megatron time | "
          f"peak MiB: fused, listing3, megatron CE | fused/megatron memory  ({args.dtype} logits, "
          f"median of {args.repeats})")
    for row in rows:
        t, m = row["time_ms"], row["peak_mib"]
        memory = (f"{m['fused']:7.0f} {m['listing3']:7.0f} {m['megatron']:7.0f} | {m['fused'] / m['megatron']:.2f}x"
                  if m and m["megatron"] > 0 else "n/a")
        print(f"{row['vocab']:6d} {row['positions']:5d} {row['bag']:2d} | {t['fused']:8.1f} {t['listing3']:8.1f} "
              f"{t['megatron']:8.1f} {t['torch']:8.1f} | {t['fused'] / t['megatron']:.2f}x | {memory}")
    parallel.shutdown()


if __name__ == "__main__":
    main()

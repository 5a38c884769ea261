"""A tiny two-phase TST run on CPU next to a baseline of the same steps, on real text.

The corpus is the running interpreter's standard library (.py files), tokenised as bytes. The TST
run trains on bags of s byte tokens for the first r of the steps (phase 1, multi-hot CE), then on
ordinary next-token samples from the same weights (phase 2); the baseline does next-token training
throughout. Both see the same number of latent positions per step, so their steps cost the same;
phase 1 eats s times the raw tokens. Prints the losses as they go and next-token validation losses
side by side. This is a smoke run of the method (megatron-core model, fused MCE, bag embedding), not
a benchmark: ``python -m megatron_tst.pretrain`` (issue 4) is the real training entry.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sysconfig
import time

import megatron_tst  # noqa: F401  (first: CPU platform layer)

import numpy as np
import torch

from megatron_tst import parallel
from megatron_tst.models import build_gpt_model, preset, transformer_config
from megatron_tst.tst import TSTPlan, num_valid_targets, split_sample


def stdlib_bytes(limit: int) -> np.ndarray:
    """Up to ``limit`` bytes of the standard library's source, files in sorted order."""
    chunks, total = [], 0
    for path in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in path.parts:
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return np.frombuffer(b"".join(chunks)[:limit], dtype=np.uint8).astype(np.int64)


class Stream:
    """Reads consecutive, non-overlapping samples from a token range, so no token is read twice."""

    def __init__(self, tokens: np.ndarray):
        self.tokens, self.position = tokens, 0

    def next_batch(self, batch: int, sample_length: int) -> torch.Tensor:
        # consecutive samples share their boundary token, as Megatron's samples of seq_length + 1 do
        needed = batch * (sample_length - 1) + 1
        if self.position + needed > len(self.tokens):
            raise RuntimeError(
                f"corpus too small: need {needed} more tokens at position {self.position} of "
                f"{len(self.tokens)}; lower --iters or --batch"
            )
        window = torch.from_numpy(self.tokens[self.position:self.position + needed])
        self.position += needed - 1
        return window.unfold(0, sample_length, sample_length - 1)


def validation_loss(model, tokens: np.ndarray, seq_length: int, batch: int) -> float:
    model.eval()
    samples = Stream(tokens).next_batch(batch, seq_length + 1)
    positions = torch.arange(seq_length).expand(batch, seq_length)
    with torch.no_grad():
        losses = model(samples[:, :-1], positions, None, labels=samples[:, 1:])
    model.train()
    return losses.mean().item()


def train(args, plan: TSTPlan | None, train_tokens: np.ndarray, valid_tokens: np.ndarray, label: str):
    parallel.initialize(seed=args.seed)
    arch = preset("tiny", num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden,
                  vocab_size=256)
    model = build_gpt_model(arch, transformer_config(arch), seq_length=args.seq_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    stream = Stream(train_tokens)
    positions = torch.arange(args.seq_length).expand(args.batch, args.seq_length)
    started, history = time.time(), []
    for iteration in range(args.iters):
        for group in optimizer.param_groups:  # linear warm-up, constant, linear decay over the last 20%
            warm = min(1.0, (iteration + 1) / args.warmup)
            decay = min(1.0, (args.iters - iteration) / (0.2 * args.iters))
            group["lr"] = args.lr * min(warm, decay)
        superposition = plan is not None and plan.phase(iteration) == "superposition"
        if superposition:
            raw = stream.next_batch(args.batch, plan.sample_length(args.seq_length, iteration))
            tokens, labels = split_sample(raw, plan.bag_size)
        else:
            raw = stream.next_batch(args.batch, args.seq_length + 1)
            tokens, labels = raw[:, :-1], raw[:, 1:]
        loss = model(tokens, positions, None, labels=labels).sum() / num_valid_targets(labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append(loss.item())
        if (iteration + 1) % args.log_interval == 0 or iteration + 1 == args.iters:
            recent = float(np.mean(history[-args.log_interval:]))
            phase = "superposition (MCE)" if superposition else "next-token"
            extra = f"  MCE - log s {recent - math.log(plan.bag_size):6.3f}" if superposition else ""
            print(f"[{label}] iter {iteration + 1:5d}  {phase:19s} loss {recent:6.3f}{extra}  "
                  f"raw tokens {stream.position:9d}  {time.time() - started:5.1f} s", flush=True)
        if plan is not None and iteration + 1 == plan.switch_iter:
            print(f"[{label}] switch to next-token recovery at iter {iteration + 1}: "
                  f"validation loss {validation_loss(model, valid_tokens, args.seq_length, args.batch):.3f}",
                  flush=True)
    result = validation_loss(model, valid_tokens, args.seq_length, 4 * args.batch)
    parallel.shutdown()
    return result, stream.position


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--tst-bag-size", type=int, default=4)
    parser.add_argument("--tst-ratio", type=float, default=0.3)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--log-interval", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    plan = TSTPlan(bag_size=args.tst_bag_size, total_iters=args.iters, ratio=args.tst_ratio)
    needed = sum(plan.raw_tokens(args.seq_length, args.batch).values()) + args.batch
    corpus = stdlib_bytes(needed + 8 * args.batch * (args.seq_length + 1))
    valid_tokens, train_tokens = corpus[-4 * args.batch * (args.seq_length + 1):], corpus[:needed]
    print(f"corpus: {len(corpus):,} bytes of the Python standard library; TST plan: s={plan.bag_size}, "
          f"switch at iter {plan.switch_iter} of {plan.total_iters}")
    baseline, baseline_tokens = train(args, None, train_tokens, valid_tokens, "baseline")
    tst, tst_tokens = train(args, plan, train_tokens, valid_tokens, "TST")
    print(f"\nnext-token validation loss after {args.iters} equal-FLOPs steps:")
    print(f"  baseline  {baseline:.4f}   ({baseline_tokens:,} raw training tokens)")
    print(f"  TST       {tst:.4f}   ({tst_tokens:,} raw training tokens, s={plan.bag_size}, r={args.tst_ratio})")


if __name__ == "__main__":
    main()

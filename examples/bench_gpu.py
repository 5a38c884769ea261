"""GPU benchmark: training-step time, tokens/s and MFU of a baseline and a TST phase-1 step, and the
fused MCE against megatron-core's fused cross-entropy. One GPU, bf16; tools/gpu_check.sh runs it.

Steps (the 270M preset at seq 2048 by default), each built and run the way ``megatron_tst.pretrain``
does it (``build_model``, ``build_optimizer``, ``run_step``: megatron-core DDP, optimizer and
schedule; host batches copied to the GPU by ``device.batch_to_device``):
  gptmodel   megatron-core's own GPTModel, next-token (what a run without TST flags trains)
  tst-ntp    TSTGPTModel fed next-token batches (the subclass's overhead, if any)
  tst-s6     TSTGPTModel phase-1 step, bags of s=6 at the same latent length (s times the tokens)
Step time is the median over --steps timed steps after --warmup, the three models interleaved
round by round (each kept built), ratios also per round. MFU = model FLOPs (``metrics``
accounting: 3 x forward) / step time / peak bf16 FLOP/s (--peak-tflops, or the device's dense
bf16 figure when known: H100/H200 SXM 989). Peak memory per model is measured apart: each model
built alone (the others freed), peak statistics reset, two steps (torch.cuda.max_memory_allocated).
Micro-batch layouts (--layouts, default 4x2 and 8x1: the same global batch) time the GPTModel step
each way. --profile prints the top kernels by device time (CPU ops on a CPU) of one GPTModel step
and one TST phase-1 step (torch.profiler), to show where a step goes.

Losses (V=128256 by default, N latent positions, bf16 logits, forward + backward, medians):
  mce-s{s}        fused_vocab_parallel_mce with s targets per position, s in --bag-sizes
  megatron-fused  megatron-core's fused_vocab_parallel_cross_entropy (cross_entropy_loss_fusion)
  megatron        megatron-core's vocab_parallel_cross_entropy
Peak memory from torch.cuda.max_memory_allocated on top of the inputs.

  python examples/bench_gpu.py --output bench_gpu.json
  python examples/bench_gpu.py --quick          # tiny shapes: checks the script, on CPU too
  python examples/bench_gpu.py --profile --steps 5 --bag-sizes 6   # where the time goes
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import megatron_tst  # noqa: F401  (first: the CPU layer where there is no GPU)

import torch

from megatron_tst import device, parallel

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "B200": 2250.0, "A100": 312.0}


def sync():
    if device.cuda():
        torch.cuda.synchronize()


def peak_tflops(given: float | None) -> float | None:
    if given:
        return given
    if not device.cuda():
        return None
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)


# ---- training steps ---------------------------------------------------------------------------------

def step_config(args, bag_size: int | None):
    from megatron_tst.arguments import parse_args

    shape = ["--model-preset", args.preset] if args.preset else []
    argv = shape + list(getattr(args, "model_flags", [])) + ["--seq-length", str(args.seq_length),
            "--micro-batch-size", str(args.micro_batch_size),
            "--global-batch-size", str(args.micro_batch_size * args.micro_batches),
            "--train-iters", "100000", "--lr", "1e-4", "--tokenizer-type", "NullTokenizer",
            "--attention-backend", args.attention_backend]
    if args.bf16:
        argv.append("--bf16")
    if bag_size:
        argv += ["--tst-bag-size", str(bag_size), "--tst-ratio", "0.5"]
    return parse_args(argv)


def host_batches(vocab: int, seq_length: int, micro_batch_size: int, bag_size: int | None, seed: int):
    """Endless host micro-batches shaped as TSTData makes them (next-token, or folded bags)."""
    from megatron_tst.tst import split_sample

    generator = torch.Generator().manual_seed(seed)
    s = bag_size or 1
    while True:
        raw = torch.randint(0, vocab, (micro_batch_size, s * seq_length + 1), generator=generator)
        tokens, labels = split_sample(raw, s) if bag_size else (raw[:, :-1], raw[:, 1:])
        yield {"tokens": tokens, "labels": labels,
               "position_ids": torch.arange(seq_length).expand(micro_batch_size, seq_length)}


class Trainer:
    """One model, optimizer and data stream, stepped as pretrain's loop steps them."""

    def __init__(self, args, name: str, bag_size: int | None, tst_model: bool):
        from megatron_tst.models import padded_vocab_size
        from megatron_tst.pretrain import build_model, build_optimizer
        from megatron_tst.tst import TSTPlan

        self.config = step_config(args, bag_size)
        self.arch = self.config.model.architecture()
        plan = TSTPlan(bag_size=bag_size or 1, total_iters=100000, ratio=0.5) if tst_model else None
        self.chunks, model_config = build_model(self.config, self.arch, plan)
        self.optimizer, _ = build_optimizer(self.config, self.chunks, model_config)
        from megatron.core.distributed import finalize_model_grads

        model_config.no_sync_func = self.chunks[0].no_sync
        model_config.grad_scale_func = self.optimizer.scale_loss
        model_config.finalize_model_grads_func = finalize_model_grads
        self.name, self.bag_size = name, bag_size
        self.batches = [host_batches(padded_vocab_size(self.arch.vocab_size), args.seq_length,
                                     args.micro_batch_size, bag_size, seed=len(name))]
        self.micro_batches = args.micro_batches
        self.times: list[float] = []

    def step(self, record: bool) -> float:
        from megatron_tst.pretrain import run_step

        sync()
        started = time.perf_counter()
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        totals = run_step(self.chunks, self.batches, self.micro_batches, self.config)
        self.optimizer.step()
        loss = (totals[0] / totals[1]).item()
        sync()
        elapsed = time.perf_counter() - started
        if record:
            self.times.append(elapsed)
        return loss


def step_specs(args):
    return [("gptmodel", None, False), ("tst-ntp", None, True), (f"tst-s{args.bag_size}", args.bag_size, True)]


def free_memory():
    gc.collect()
    if device.cuda():
        torch.cuda.empty_cache()


def peak_memory(args) -> dict:
    """Each step's peak memory with only its own model alive (GiB; None on a CPU)."""
    if not device.cuda():
        return {}
    peaks = {}
    for name, bag, tst in step_specs(args):
        free_memory()
        torch.cuda.reset_peak_memory_stats()
        trainer = Trainer(args, name, bag, tst)
        for _ in range(2):
            trainer.step(record=False)
        peaks[name] = torch.cuda.max_memory_allocated() / 2**30
        del trainer
    free_memory()
    return peaks


def bench_layouts(args) -> list[dict]:
    """The GPTModel step at each micro-batch layout (micro-batch size x micro-batches) of --layouts."""
    trainers = []
    for layout in args.layouts:
        size, count = (int(x) for x in layout.split("x"))
        trainers.append((layout, Trainer(argparse.Namespace(**{**vars(args), "micro_batch_size": size,
                                                               "micro_batches": count}), "gptmodel", None, False)))
    for round_index in range(args.warmup + args.steps):
        for _, trainer in trainers:
            trainer.step(record=round_index >= args.warmup)
    first = statistics.median(trainers[0][1].times)
    rows = [dict(layout=layout, samples=int(layout.split("x")[0]) * int(layout.split("x")[1]),
                 median_ms=1e3 * statistics.median(t.times), vs_first=statistics.median(t.times) / first)
            for layout, t in trainers]
    del trainers
    free_memory()
    return rows


def profile_steps(args, top: int) -> dict:
    """torch.profiler over one GPTModel step and one TST phase-1 step (after a warm-up step each):
    the top operators/kernels by device time (self CPU time on a CPU), as printable tables."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.cuda() else [])
    sort = "self_device_time_total" if device.cuda() else "self_cpu_time_total"
    tables = {}
    for name, bag, tst in (step_specs(args)[0], step_specs(args)[2]):
        trainer = Trainer(args, name, bag, tst)
        trainer.step(record=False)
        with profile(activities=activities) as prof:
            trainer.step(record=False)
        tables[name] = prof.key_averages().table(sort_by=sort, row_limit=top)
        del trainer
        free_memory()
    return tables


def bench_steps(args) -> list[dict]:
    from megatron_tst.metrics import model_flops_per_position

    trainers = [Trainer(args, name, bag, tst) for name, bag, tst in step_specs(args)]
    for round_index in range(args.warmup + args.steps):
        for trainer in trainers:
            trainer.step(record=round_index >= args.warmup)
    base = trainers[0]
    positions = args.micro_batch_size * args.micro_batches * args.seq_length
    flops = 3 * model_flops_per_position(base.arch, args.seq_length) * positions
    peak = peak_tflops(args.peak_tflops)
    rows = []
    for trainer in trainers:
        median = statistics.median(trainer.times)
        per_round = statistics.median(t / b for t, b in zip(trainer.times, base.times))
        raw_tokens = positions * (trainer.bag_size or 1)
        rows.append(dict(step=trainer.name, median_ms=1e3 * median, min_ms=1e3 * min(trainer.times),
                         vs_gptmodel_medians=median / statistics.median(base.times), vs_gptmodel_per_round=per_round,
                         latent_positions_per_s=positions / median, raw_tokens_per_s=raw_tokens / median,
                         mfu=(flops / median / (peak * 1e12)) if peak else None))
    del trainers
    free_memory()
    peaks = peak_memory(args)
    for row in rows:
        row["peak_memory_gib"] = peaks.get(row["step"])
    return rows


# ---- losses ------------------------------------------------------------------------------------------

def loss_call(method: str, logits: torch.Tensor, bags: torch.Tensor):
    from megatron.core import parallel_state
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_tst.tst import fused_vocab_parallel_mce, mce_target_weights

    if method.startswith("mce"):
        return fused_vocab_parallel_mce(logits, bags, mce_target_weights(bags)).sum()
    target = bags[..., 0].contiguous()
    if method == "megatron-fused":
        return fused_vocab_parallel_cross_entropy(logits, target, parallel_state.get_tensor_model_parallel_group()).sum()
    return vocab_parallel_cross_entropy(logits, target).sum()


def bench_losses(args) -> list[dict]:
    from megatron_tst.tst import fold_labels

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    generator = torch.Generator().manual_seed(0)
    # [L, b, V] as GPTModel hands it to the loss
    base = (torch.randn(args.loss_positions, 1, args.vocab, generator=generator) * 2).to(dtype).to(device.current())
    rows = []
    for s in args.bag_sizes:
        flat = torch.randint(0, args.vocab, (1, s * args.loss_positions), generator=generator)
        bags = fold_labels(flat, s).transpose(0, 1).contiguous().to(device.current())  # [L, 1, s]
        methods = [f"mce-s{s}", "megatron-fused", "megatron"]
        times = {method: [] for method in methods}
        memory = {}
        for repeat in range(args.warmup + args.loss_repeats):
            for method in methods:
                logits = base.detach().clone().requires_grad_()
                sync()
                if device.cuda():
                    torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated() if device.cuda() else 0
                started = time.perf_counter()
                loss_call(method, logits, bags).backward()
                sync()
                if repeat >= args.warmup:
                    times[method].append(time.perf_counter() - started)
                if device.cuda():
                    memory[method] = (torch.cuda.max_memory_allocated() - before) / 2**20
                del logits
        reference = statistics.median(times["megatron-fused"])
        for method in methods:
            median = statistics.median(times[method])
            rows.append(dict(s=s, method=method, vocab=args.vocab, positions=args.loss_positions,
                             median_ms=1e3 * median, vs_megatron_fused=median / reference,
                             peak_mib=memory.get(method)))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="270M")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--bag-size", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--loss-positions", type=int, default=8192)
    parser.add_argument("--bag-sizes", type=int, nargs="+", default=[1, 6, 16])
    parser.add_argument("--loss-repeats", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of the device")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--attention-backend", default="auto", help="as megatron_tst.pretrain's flag")
    parser.add_argument("--layouts", nargs="*", default=["4x2", "8x1"],
                        help="micro-batch size x micro-batches of the GPTModel step to compare (none: skip)")
    parser.add_argument("--profile", action="store_true", help="also print the top kernels of one baseline "
                        "and one TST step (torch.profiler)")
    parser.add_argument("--profile-top", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, to check the script (CPU too)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.seq_length, args.micro_batch_size, args.micro_batches = "tiny", 64, 2, 2
        args.steps, args.warmup, args.vocab, args.loss_positions, args.loss_repeats = 2, 1, 1000, 64, 2
        args.bf16 = device.cuda()
        args.layouts = [layout for layout in ("2x2", "4x1") if args.layouts]
    if not device.cuda() and not args.quick:
        print("error: examples/bench_gpu.py measures a CUDA GPU and none is visible; run it on a GPU machine "
              "(tools/gpu_check.sh), or pass --quick to check the script here", file=sys.stderr)
        return 1
    parallel.initialize(seed=1234)
    where = torch.cuda.get_device_name() if device.cuda() else "cpu"
    results = dict(device=where, torch=torch.__version__, date=time.strftime("%Y-%m-%d"), args=vars(args),
                   steps=bench_steps(args), layouts=bench_layouts(args) if args.layouts else [],
                   losses=bench_losses(args))
    if args.profile:
        results["profile"] = profile_steps(args, args.profile_top)
    parallel.shutdown()
    print(f"device: {where}; {args.preset} at seq {args.seq_length}, micro-batch {args.micro_batch_size} x "
          f"{args.micro_batches}, {'bf16' if args.bf16 else 'fp32'}")
    print("| step | median ms | min ms | vs GPTModel (medians) | (per round) | latent pos/s | raw tokens/s | MFU "
          "| peak GiB (alone) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in results["steps"]:
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        gib = f"{row['peak_memory_gib']:.1f}" if row["peak_memory_gib"] is not None else "n/a"
        print(f"| {row['step']} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | {row['vs_gptmodel_medians']:.3f}x | "
              f"{row['vs_gptmodel_per_round']:.3f}x | {row['latent_positions_per_s']:,.0f} | "
              f"{row['raw_tokens_per_s']:,.0f} | {mfu} | {gib} |")
    if results["layouts"]:
        print("\nGPTModel step by micro-batch layout (micro-batch size x micro-batches)")
        print("| layout | samples | median ms | vs first |")
        print("|---|---|---|---|")
        for row in results["layouts"]:
            print(f"| {row['layout']} | {row['samples']} | {row['median_ms']:.1f} | {row['vs_first']:.3f}x |")
    for name, table in results.get("profile", {}).items():
        print(f"\nprofile: one {name} step, top {args.profile_top} by {'device' if device.cuda() else 'CPU'} time")
        print(table)
    print(f"\nlosses at V={args.vocab}, N={args.loss_positions}, forward + backward")
    print("| s | method | median ms | vs megatron fused CE | peak MiB |")
    print("|---|---|---|---|---|")
    for row in results["losses"]:
        mib = f"{row['peak_mib']:.0f}" if row["peak_mib"] is not None else "n/a"
        print(f"| {row['s']} | {row['method']} | {row['median_ms']:.2f} | {row['vs_megatron_fused']:.3f}x | {mib} |")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU benchmark: training-step time, tokens/s and MFU of a baseline and a TST phase-1 step, the loss
kernels against megatron-core's fused cross-entropy, and what --output-layer-loss-fusion buys in
memory. One GPU, bf16; tools/gpu_check.sh runs it in sections (each in its own process, under its
own time limit) and tools/gpu_summary.py turns the JSON into the targets table.

Sections (--sections, run in the order given; the JSON is rewritten after each, so a run cut short
keeps what it measured):
  steps    the step models (--step-models) built the way ``megatron_tst.pretrain`` does
           (``build_model``, ``build_optimizer``, ``run_step``: megatron-core DDP, optimizer and
           schedule; host batches copied to the GPU by ``device.batch_to_device``), interleaved
           round by round (all kept built):
             gptmodel  the baseline, what pretrain builds without TST flags (on CUDA the TSTGPTModel,
                       whose next-token loss is the compiled single kernel; megatron-core's
                       GPTModel elsewhere)
             tst-ntp   TSTGPTModel fed next-token batches
             tst       TSTGPTModel phase-1 step, bags of --bag-size at the same latent length
                       (s times the tokens; reported as tst-s{s})
           Step time is the median over --steps timed steps after --warmup; ratios also per round.
           MFU = model FLOPs (``metrics`` accounting: 3 x forward) / step time / peak bf16 FLOP/s
           (--peak-tflops, or the device's dense bf16 figure when known: H100/H200 SXM 989).
  memory   each step model's peak memory with only itself alive (torch.cuda.max_memory_allocated
           over two steps)
  local    the baseline with --attention-backend local (megatron-core's DotProductAttention),
           alone: --local-steps timed steps and its peak (what "auto" is measured against)
  losses   V=--vocab, N=--loss-positions latent positions, bf16 logits, forward + backward:
             mce-s{s}        fused_vocab_parallel_mce (the phase-1 kernel) with s targets per position
             single-s{s}     single_kernel_mce (compiled on CUDA: Triton), gradient written in place
             megatron-fused  megatron-core's fused_vocab_parallel_cross_entropy (one target)
             megatron        megatron-core's vocab_parallel_cross_entropy (one target)
           peak memory from torch.cuda.max_memory_allocated on top of the inputs
  loss-fusion  the TST phase-1 and next-token steps with --output-layer-loss-fusion off and on, at
           micro-batch sizes --fusion-micro-batches (default the micro-batch and its double, one
           micro-batch a step), each alone: step time and peak memory; out of memory is recorded,
           not fatal (the data for its default on CUDA and for "the micro-batch doubled in the same
           memory")
  layouts  the baseline step at each micro-batch layout of --layouts (4x2 against 8x1)
  profile  torch.profiler over one baseline and one TST step: the top kernels by device time (CPU
           ops on a CPU), to show where a step goes

Exit status 3: the steps section ran out of GPU memory (tools/gpu_check.sh then retries the 3B
preset with recomputation); the JSON says so.

  python examples/bench_gpu.py --output bench_gpu.json                       # steps memory layouts losses
  python examples/bench_gpu.py --sections steps memory local losses --output bench_gpu.json
  python examples/bench_gpu.py --preset 3B --micro-batch-size 1 --micro-batches 8 --sections steps --step-models gptmodel
  python examples/bench_gpu.py --quick --sections steps local loss-fusion    # tiny shapes: checks the script, on CPU too
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import statistics
import sys
import time

import megatron_tst  # noqa: F401  (first: the CPU layer where there is no GPU)

import torch

from megatron_tst import device, parallel

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "B200": 2250.0, "A100": 312.0}
SECTIONS = ("steps", "memory", "local", "losses", "loss-fusion", "layouts", "profile")
STEP_MODELS = ("gptmodel", "tst-ntp", "tst")


class OutOfMemory(Exception):
    """A section's step did not fit the GPU (the JSON records it; exit status 3)."""


def out_of_memory_error():
    return getattr(torch.cuda, "OutOfMemoryError", RuntimeError)


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


def core_attention_name(chunk) -> str:
    """The class of the core attention a chunk was built with (what --attention-backend chose)."""
    return next((type(m).__name__ for n, m in chunk.named_modules() if n.endswith("core_attention")), "none")


class Trainer:
    """One model, optimizer and data stream, stepped as pretrain's loop steps them."""

    def __init__(self, args, name: str, bag_size: int | None, tst_model: bool):
        from megatron_tst.models import padded_vocab_size
        from megatron_tst.optimizer import is_fused
        from megatron_tst.pretrain import build_model, build_optimizer
        from megatron_tst.tst import TSTPlan

        # megatron-core's models export their attention backend as TE's NVTE_* variables and assert
        # that a later model agrees: models of two backends in one process need them cleared (without
        # TE nothing reads them)
        for variable in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"):
            os.environ.pop(variable, None)
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
        self.fused_adamw = is_fused(self.optimizer)
        self.core_attention = core_attention_name(self.chunks[0])

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


def step_specs(args, models=None):
    """(row name, bag size, TST model) of each of --step-models."""
    specs = {"gptmodel": ("gptmodel", None, False), "tst-ntp": ("tst-ntp", None, True),
             "tst": (f"tst-s{args.bag_size}", args.bag_size, True)}
    return [specs[m] for m in (models or args.step_models)]


def with_args(args, **changes):
    return argparse.Namespace(**{**vars(args), **changes})


def free_memory():
    gc.collect()
    if device.cuda():
        torch.cuda.empty_cache()


def reset_peak():
    free_memory()
    if device.cuda():
        torch.cuda.reset_peak_memory_stats()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if device.cuda() else None


def mfu(args, arch, seconds: float) -> float | None:
    from megatron_tst.metrics import model_flops_per_position

    peak = peak_tflops(args.peak_tflops)
    positions = args.micro_batch_size * args.micro_batches * args.seq_length
    flops = 3 * model_flops_per_position(arch, args.seq_length) * positions
    return flops / seconds / (peak * 1e12) if peak else None


def step_row(args, trainer, base_times=None) -> dict:
    median = statistics.median(trainer.times)
    positions = args.micro_batch_size * args.micro_batches * args.seq_length
    raw_tokens = positions * (trainer.bag_size or 1)
    row = dict(step=trainer.name, median_ms=1e3 * median, min_ms=1e3 * min(trainer.times),
               latent_positions_per_s=positions / median, raw_tokens_per_s=raw_tokens / median,
               mfu=mfu(args, trainer.arch, median), fused_adamw=trainer.fused_adamw,
               core_attention=trainer.core_attention, attention_backend=args.attention_backend,
               micro_batch_size=args.micro_batch_size, micro_batches=args.micro_batches,
               model_flags=list(getattr(args, "model_flags", [])))
    if base_times:
        row["vs_gptmodel_medians"] = median / statistics.median(base_times)
        if len(base_times) == len(trainer.times):
            row["vs_gptmodel_per_round"] = statistics.median(t / b for t, b in zip(trainer.times, base_times))
    return row


def bench_steps(args) -> list[dict]:
    """The step models interleaved round by round (all alive); the process peak with all of them."""
    reset_peak()
    trainers = [Trainer(args, name, bag, tst) for name, bag, tst in step_specs(args)]
    for round_index in range(args.warmup + args.steps):
        for trainer in trainers:
            trainer.step(record=round_index >= args.warmup)
    base = next((t.times for t in trainers if t.name == "gptmodel"), None)
    rows = [step_row(args, trainer, base) for trainer in trainers]
    for row in rows:
        row["process_peak_gib"] = peak_gib()  # every model alive: an upper bound of each alone
    del trainers
    free_memory()
    return rows


def peak_memory(args) -> dict:
    """Each step's peak memory with only its own model alive (GiB; None on a CPU)."""
    peaks = {}
    for name, bag, tst in step_specs(args):
        reset_peak()
        trainer = Trainer(args, name, bag, tst)
        for _ in range(2):
            trainer.step(record=False)
        peaks[name] = peak_gib()
        del trainer
    free_memory()
    return peaks


def bench_local(args, base_row: dict | None) -> dict:
    """The baseline with megatron-core's DotProductAttention (--attention-backend local), alone."""
    local = with_args(args, attention_backend="local", steps=args.local_steps, warmup=min(args.warmup, 2))
    reset_peak()
    trainer = Trainer(local, "gptmodel-local", None, False)
    for round_index in range(local.warmup + local.steps):
        trainer.step(record=round_index >= local.warmup)
    row = step_row(local, trainer)
    row["peak_memory_gib"] = peak_gib()
    if base_row:  # ours (the steps section's gptmodel) over megatron-core's: not interleaved
        row["ours_vs_local"] = base_row["median_ms"] / row["median_ms"]
    del trainer
    free_memory()
    return row


def bench_loss_fusion(args, rows: list[dict], save) -> list[dict]:
    """--output-layer-loss-fusion off and on, per micro-batch size, the TST step models alone; each
    configuration appended to ``rows`` and ``save()`` called after it (eight builds: a run cut short
    keeps the ones done)."""
    sizes = args.fusion_micro_batches or [args.micro_batch_size, 2 * args.micro_batch_size]
    for name, bag, tst in step_specs(args, ["tst", "tst-ntp"]):
        for size in sizes:
            for fused in (False, True):
                flags = list(getattr(args, "model_flags", [])) + (["--output-layer-loss-fusion"] if fused else [])
                run = with_args(args, micro_batch_size=size, micro_batches=1, model_flags=flags,
                                steps=args.fusion_steps, warmup=min(args.warmup, 2))
                row = dict(step=name, micro_batch_size=size, output_layer_loss_fusion=fused)
                trainer = None
                try:
                    reset_peak()
                    trainer = Trainer(run, name, bag, tst)
                    for round_index in range(run.warmup + run.steps):
                        trainer.step(record=round_index >= run.warmup)
                    row.update(median_ms=1e3 * statistics.median(trainer.times), peak_memory_gib=peak_gib(),
                               raw_tokens_per_s=size * args.seq_length * (bag or 1) / statistics.median(trainer.times))
                except out_of_memory_error() as error:
                    row.update(out_of_memory=True, error=str(error).splitlines()[0][:200])
                del trainer
                free_memory()
                rows.append(row)
                save()
                print(f"  loss-fusion {name} mb {size} fusion {'on ' if fused else 'off'}: "
                      + (f"{row['median_ms']:.1f} ms, peak {fmt(row['peak_memory_gib'], '.2f')} GiB"
                         if "median_ms" in row else "out of memory"), flush=True)
    return rows


def bench_layouts(args) -> list[dict]:
    """The baseline step at each micro-batch layout (micro-batch size x micro-batches) of --layouts."""
    trainers = []
    for layout in args.layouts:
        size, count = (int(x) for x in layout.split("x"))
        trainers.append((layout, Trainer(with_args(args, micro_batch_size=size, micro_batches=count),
                                         "gptmodel", None, False)))
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
    """torch.profiler over one baseline step and one TST phase-1 step (after a warm-up step each):
    the top operators/kernels by device time (self CPU time on a CPU), as printable tables."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.cuda() else [])
    sort = "self_device_time_total" if device.cuda() else "self_cpu_time_total"
    tables = {}
    for name, bag, tst in step_specs(args, ["gptmodel", "tst"]):
        trainer = Trainer(args, name, bag, tst)
        trainer.step(record=False)
        with profile(activities=activities) as prof:
            trainer.step(record=False)
        tables[name] = prof.key_averages().table(sort_by=sort, row_limit=top)
        del trainer
        free_memory()
    return tables


# ---- losses ------------------------------------------------------------------------------------------

def loss_call(method: str, logits: torch.Tensor, bags: torch.Tensor):
    from megatron.core import parallel_state
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_tst.tst import fused_vocab_parallel_mce, mce_target_weights, single_kernel_mce

    if method.startswith("mce"):
        return fused_vocab_parallel_mce(logits, bags, mce_target_weights(bags)).sum()
    if method.startswith("single"):
        # the gradient written into the logits buffer, as for the output layer's logits in a model
        # (each call gets a fresh copy)
        return single_kernel_mce(logits, bags, mce_target_weights(bags), inplace_backward=True).sum()
    target = bags[..., 0].contiguous()
    if method == "megatron-fused":
        return fused_vocab_parallel_cross_entropy(logits, target, parallel_state.get_tensor_model_parallel_group()).sum()
    return vocab_parallel_cross_entropy(logits, target).sum()


def bench_losses(args) -> list[dict]:
    from megatron_tst.tst import fold_labels

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    where = device.current()
    # [L, b, V] as GPTModel hands it to the loss; made on the device (an 8192 x 128256 fp32 draw on
    # the host costs seconds)
    base = (torch.randn(args.loss_positions, 1, args.vocab, generator=torch.Generator(where).manual_seed(0),
                        device=where) * 2).to(dtype)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for s in args.bag_sizes:
        flat = torch.randint(0, args.vocab, (1, s * args.loss_positions), generator=generator)
        bags = fold_labels(flat, s).transpose(0, 1).contiguous().to(where)  # [L, 1, s]
        methods = [f"{kernel}-s{s}" for kernel in args.loss_kernels] + ["megatron-fused", "megatron"]
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
    del base
    free_memory()
    return rows


def loss_kernel_compile() -> str:
    """Whether the compiled loss kernels ran compiled (they fall back to eager, with a warning, where
    torch.compile fails: the figures would then be the eager kernels')."""
    from megatron_tst.tst import loss_kernels

    if loss_kernels._COMPILE_FAILED:
        return f"failed, eager fallback: {loss_kernels._COMPILE_FAILED[0][:300]}"
    return "compiled" if device.cuda() else "eager (CPU default)"


# ---- printing ----------------------------------------------------------------------------------------

def fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def ratio_text(value) -> str:
    return "n/a" if value is None else f"{value:.3f}x"


def print_steps(rows: list[dict]) -> None:
    print("| step | attention | median ms | min ms | vs GPTModel (medians) | (per round) | latent pos/s | raw tokens/s "
          "| MFU | peak GiB (alone) | fused AdamW |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        mfu_text = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "n/a"
        print(f"| {row['step']} | {row['core_attention']} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | "
              f"{ratio_text(row.get('vs_gptmodel_medians'))} | {ratio_text(row.get('vs_gptmodel_per_round'))} | "
              f"{row['latent_positions_per_s']:,.0f} | {row['raw_tokens_per_s']:,.0f} | {mfu_text} | "
              f"{fmt(row.get('peak_memory_gib'), '.1f')} | {row['fused_adamw']} |", flush=True)


def print_section(name: str, results: dict, args) -> None:
    if name == "steps":
        print(f"\n[steps] {args.preset} at seq {args.seq_length}, micro-batch {args.micro_batch_size} x "
              f"{args.micro_batches}, {'bf16' if args.bf16 else 'fp32'}")
        print_steps(results["steps"])
    elif name == "memory":
        print("\n[memory] peak GiB of each step with only its own model alive: " + ", ".join(
            f"{step} {fmt(gib, '.2f')}" for step, gib in results["peak_memory_alone_gib"].items()))
    elif name == "local":
        print("\n[local] the baseline with --attention-backend local, alone")
        local = results["steps"][-1]
        print_steps([local])
        print(f"ours (auto) / local step time: {ratio_text(local.get('ours_vs_local'))}")
    elif name == "layouts":
        print("\n[layouts] baseline step by micro-batch layout (micro-batch size x micro-batches)")
        print("| layout | samples | median ms | vs first |\n|---|---|---|---|")
        for row in results["layouts"]:
            print(f"| {row['layout']} | {row['samples']} | {row['median_ms']:.1f} | {row['vs_first']:.3f}x |")
    elif name == "profile":
        for model, table in results["profile"].items():
            print(f"\n[profile] one {model} step, top {args.profile_top} by {'device' if device.cuda() else 'CPU'} time")
            print(table)
    elif name == "losses":
        print(f"\n[losses] V={args.vocab}, N={args.loss_positions}, forward + backward")
        print("| s | method | median ms | vs megatron fused CE | peak MiB |\n|---|---|---|---|---|")
        for row in results["losses"]:
            print(f"| {row['s']} | {row['method']} | {row['median_ms']:.2f} | {row['vs_megatron_fused']:.3f}x | "
                  f"{fmt(row['peak_mib'], '.0f')} |")
    elif name == "loss-fusion":
        print("\n[loss-fusion] --output-layer-loss-fusion off/on, one micro-batch a step, each model alone")
        print("| step | micro-batch | fusion | median ms | raw tokens/s | peak GiB |\n|---|---|---|---|---|---|")
        for row in results["loss_fusion"]:
            if row.get("out_of_memory"):
                print(f"| {row['step']} | {row['micro_batch_size']} | {row['output_layer_loss_fusion']} | out of memory | | |")
            else:
                print(f"| {row['step']} | {row['micro_batch_size']} | {row['output_layer_loss_fusion']} | "
                      f"{row['median_ms']:.1f} | {row['raw_tokens_per_s']:,.0f} | {fmt(row['peak_memory_gib'], '.2f')} |")
    sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="270M")
    parser.add_argument("--model-flags", default="", help="more pretrain flags for every model, one string, given as --model-flags=... "
                        "(e.g. \"--recompute-granularity full --recompute-method uniform --recompute-num-layers 1\")")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--bag-size", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=None,
                        help="what to measure, in this order (default: steps memory layouts losses, + profile)")
    parser.add_argument("--step-models", nargs="+", choices=STEP_MODELS, default=list(STEP_MODELS))
    parser.add_argument("--local-steps", type=int, default=8, help="timed steps of the local-attention baseline")
    parser.add_argument("--fusion-micro-batches", type=int, nargs="+", default=None,
                        help="micro-batch sizes of the loss-fusion section (default: the micro-batch and its double)")
    parser.add_argument("--fusion-steps", type=int, default=4, help="timed steps per loss-fusion configuration")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--loss-positions", type=int, default=8192)
    parser.add_argument("--bag-sizes", type=int, nargs="+", default=[1, 6, 16])
    parser.add_argument("--loss-kernels", nargs="+", choices=("mce", "single"), default=["mce", "single"])
    parser.add_argument("--loss-repeats", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of the device")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--attention-backend", default="auto", help="as megatron_tst.pretrain's flag")
    parser.add_argument("--layouts", nargs="*", default=["4x2", "8x1"],
                        help="micro-batch size x micro-batches of the baseline step to compare")
    parser.add_argument("--profile", action="store_true", help="add the profile section")
    parser.add_argument("--profile-top", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, to check the script (CPU too)")
    parser.add_argument("--output", default=None, help="write the results as JSON here (after every section)")
    args = parser.parse_args(argv)
    args.model_flags = shlex.split(args.model_flags)
    if args.sections is None:
        args.sections = ["steps", "memory"] + (["layouts"] if args.layouts else []) + ["losses"]
    if args.profile and "profile" not in args.sections:
        args.sections.append("profile")
    if args.quick:
        args.preset, args.seq_length, args.micro_batch_size, args.micro_batches = "tiny", 64, 2, 2
        args.steps, args.warmup, args.vocab, args.loss_positions, args.loss_repeats = 2, 1, 1000, 64, 2
        args.local_steps, args.fusion_steps = 2, 2
        args.bf16 = device.cuda()
        args.layouts = [layout for layout in ("2x2", "4x1") if args.layouts]
    if not device.cuda() and not args.quick:
        print("error: examples/bench_gpu.py measures a CUDA GPU and none is visible; run it on a GPU machine "
              "(tools/gpu_check.sh), or pass --quick to check the script here", file=sys.stderr)
        return 1
    if "layouts" in args.sections and not args.layouts:
        print("error: --sections layouts needs --layouts (e.g. --layouts 4x2 8x1)", file=sys.stderr)
        return 1
    parallel.initialize(seed=1234)
    where = torch.cuda.get_device_name() if device.cuda() else "cpu"
    results = dict(device=where, torch=torch.__version__, date=time.strftime("%Y-%m-%d"), args=vars(args),
                   gpu_memory_gib=(torch.cuda.get_device_properties(0).total_memory / 2**30 if device.cuda() else None),
                   sections_done=[], steps=[], layouts=[], losses=[], loss_fusion=[])

    def save():
        if args.output:
            with open(args.output, "w") as handle:
                json.dump(results, handle, indent=2)

    status = 0
    for section in args.sections:
        started = time.perf_counter()
        try:
            if section == "steps":
                results["steps"] = bench_steps(args)
            elif section == "memory":
                peaks = peak_memory(args)
                for row in results["steps"]:
                    row["peak_memory_gib"] = peaks.get(row["step"], row.get("peak_memory_gib"))
                results["peak_memory_alone_gib"] = peaks
            elif section == "local":
                base = next((r for r in results["steps"] if r["step"] == "gptmodel"), None)
                results["steps"] = [r for r in results["steps"] if r["step"] != "gptmodel-local"]
                results["steps"].append(bench_local(args, base))
            elif section == "losses":
                results["losses"] = bench_losses(args)
            elif section == "loss-fusion":
                results["loss_fusion"] = []
                bench_loss_fusion(args, results["loss_fusion"], save)
            elif section == "layouts":
                results["layouts"] = bench_layouts(args)
            elif section == "profile":
                results["profile"] = profile_steps(args, args.profile_top)
        except out_of_memory_error() as error:
            results["out_of_memory"] = dict(section=section, error=str(error).splitlines()[0][:300])
            print(f"error: section {section} ran out of GPU memory ({results['out_of_memory']['error']}); use a "
                  "smaller --micro-batch-size or recomputation (--model-flags)", file=sys.stderr)
            status = 3
            save()
            break
        results["sections_done"].append(section)
        results["loss_kernel_compile"] = loss_kernel_compile()
        results.setdefault("section_seconds", {})[section] = time.perf_counter() - started
        save()
        print_section(section, results, args)
    parallel.shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())

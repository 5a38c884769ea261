"""Our training step against a torch-native peer on the same device, shape, batch and dtype.

Ours: the baseline step as ``megatron_tst.pretrain`` runs it (megatron-core GPTModel with the
layer spec --attention-backend picks, DDP, megatron-core's optimizer with torch's fused AdamW,
megatron-core's schedule; examples/bench_gpu.py's Trainer). The peer: Hugging Face transformers'
``LlamaForCausalLM`` with ``attn_implementation="sdpa"`` (the same Llama shape: RMSNorm, SwiGLU,
RoPE, grouped-query attention, untied embeddings), torch AdamW (fused where torch has it) with the
same hyper-parameters and gradient clipping at 1.0. Both see ``--micro-batch-size`` samples of
``--seq-length`` tokens per step (one micro-batch), fp32 on a CPU, bf16 on a GPU (--bf16/--no-bf16).

Time: median of --steps steps after --warmup, the models interleaved step by step in one
process (all alive), the ratio also per round. Memory: each model alone in a fresh process (this
script re-runs itself): on a GPU torch.cuda.max_memory_allocated from before the model is built;
on a CPU the growth of the process's peak resident set from just before the model is built to
after the steps (getrusage ru_maxrss when the peak falls in the run, else a 1 ms sampler of
/proc/self/statm), which counts weights, optimizer state, activations and allocator slack alike.
--seq-scaling A B also measures both peaks at sequence lengths A and B (attention memory linear in
the sequence means the ratio stays near B/A for the activations). At 8 layers x 512, micro-batch 4,
seq 4096 a child needs about 20 GiB (the 32000-wide logits and their gradients alone are 2 GiB a
copy), more than the 23 GiB CPU machine has beside other jobs: the kernel kills it. Measure the
scaling on the small shape below. --fusions compare builds ours twice, with and without
megatron-core's compiled SwiGLU and bias-dropout-add; on a CPU the compiled build's peak also holds
torch.compile's own memory (about 20 MB: it dominates at --quick shapes).

  python examples/bench_peer.py                                   # 8 layers x 512, seq 1024, fp32 on CPU
  python examples/bench_peer.py --num-layers 2 --hidden-size 256 --ffn-hidden-size 768 --num-attention-heads 4 \
      --num-query-groups 2 --micro-batch-size 2 --no-memory --seq-scaling 1024 4096   # memory against seq
  python examples/bench_peer.py --fusions compare                 # ours with and without the compiled fusions
  python examples/bench_peer.py --micro-batch-size 2 --warmup 2 --profile   # one step of each, op by op
  python examples/bench_peer.py --quick                           # tiny shapes: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import megatron_tst  # noqa: F401  (first: the CPU layer where there is no GPU)

import torch

from megatron_tst import device, parallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_gpu  # noqa: E402  (its Trainer steps our model as pretrain does)


def model_flags(args) -> list[str]:
    return ["--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
            "--ffn-hidden-size", str(args.ffn_hidden_size), "--num-attention-heads", str(args.num_attention_heads),
            "--num-query-groups", str(args.num_query_groups), "--vocab-size", str(args.vocab_size),
            "--max-position-embeddings", str(max(args.seq_length, 4096)),
            "--untie-embeddings-and-output-weights", "--rotary-base", "500000",
            # the Llama shape (without a preset the flags' defaults are Megatron-LM's GPT: LayerNorm, GeLU, ...)
            "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--disable-bias-linear",
            "--attention-dropout", "0", "--hidden-dropout", "0"]


# megatron-core's torch.compile fusions without TE (on by default on a GPU, asked for on a CPU)
FUSION_FLAGS = {"default": [], "on": ["--bias-swiglu-fusion", "--bias-dropout-fusion"],
                "off": ["--no-bias-swiglu-fusion", "--no-bias-dropout-fusion"]}


class Ours:
    def __init__(self, args, fusions: str = "default"):
        ns = argparse.Namespace(preset=None, model_flags=model_flags(args) + FUSION_FLAGS[fusions],
                                seq_length=args.seq_length,
                                micro_batch_size=args.micro_batch_size, micro_batches=1, bf16=args.bf16,
                                attention_backend=args.attention_backend)
        self.trainer = bench_gpu.Trainer(ns, "ours", None, False)
        self.parameters = sum(p.numel() for c in self.trainer.chunks for p in c.module.parameters())

    def step(self) -> float:
        return self.trainer.step(record=False)


class Peer:
    def __init__(self, args):
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.ffn_hidden_size,
            num_hidden_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
            num_key_value_heads=args.num_query_groups, max_position_embeddings=max(args.seq_length, 4096),
            rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, attention_dropout=0.0,
            attn_implementation="sdpa",
        )
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        self.model = LlamaForCausalLM(config).to(device=device.current(), dtype=dtype).train()
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                                           weight_decay=0.1, fused=True)
        self.generator = torch.Generator().manual_seed(1)
        self.args = args

    def step(self) -> float:
        args = self.args
        bench_gpu.sync()
        tokens = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length), generator=self.generator)
        tokens = tokens.to(device.current(), non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        value = loss.item()
        bench_gpu.sync()
        return value


MODELS = ("ours", "ours-unfused", "peer")  # ours-unfused: --fusions compare's second build of ours


def model_names(args) -> list[str]:
    return ["ours", "ours-unfused", "peer"] if args.fusions == "compare" else ["ours", "peer"]


def build(name: str, args):
    if name == "peer":
        return Peer(args)
    if name == "ours-unfused":
        return Ours(args, "off")
    return Ours(args, "on" if args.fusions == "compare" else args.fusions)


def memory_child(args) -> dict:
    """Build one model in this (fresh) process, run warm-up + a few steps, report its peak."""
    parallel.initialize(seed=1234)
    if device.cuda():
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        sampler = RSSSampler()
        before, lifetime_peak = _current_rss(), _max_rss()
    model = build(args.memory_child, args)
    for _ in range(args.warmup + 2):
        model.step()
    if device.cuda():
        peak = torch.cuda.max_memory_allocated() - before
    else:
        # the kernel's exact peak when it was reached during the run (not in the imports before),
        # else the sampled one
        sampled = sampler.stop()
        peak = (_max_rss() if _max_rss() > lifetime_peak else sampled) - before
    parallel.shutdown()
    return dict(model=args.memory_child, seq_length=args.seq_length, peak_bytes=peak, parameters=model.parameters)


class RSSSampler:
    """The largest resident set seen by a thread reading /proc/self/statm every millisecond."""

    def __init__(self):
        import threading

        self.peak, self._stop = _current_rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _current_rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _current_rss())


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def profile_models(args, top: int) -> dict:
    """torch.profiler over one step of each model (after --warmup steps), op by op: self time (device
    time on a GPU, CPU time on a CPU), call counts and, on a CPU, the memory each op allocates itself.
    Compare shares and counts: on a loaded machine wall-clock is noise."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.cuda()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    tables = {}
    for name in model_names(args):
        model = build(name, args)
        for _ in range(args.warmup):
            model.step()
        with profile(activities=activities, profile_memory=True) as prof:
            model.step()
        tables[name] = prof.key_averages().table(sort_by=sort, row_limit=top)
        del model
    return tables


def measure_memory(args, name: str, seq_length: int) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--memory-child", name, "--seq-length", str(seq_length)]
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "vocab_size", "micro_batch_size", "warmup", "attention_backend", "fusions"):
        argv += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    argv.append("--bf16" if args.bf16 else "--no-bf16")
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode == -9:  # SIGKILL: on Linux, the kernel's out-of-memory killer
        raise RuntimeError(f"memory run of {name} at seq {seq_length} was killed (SIGKILL), most likely out of "
                           "memory; use a smaller --micro-batch-size, --num-layers or --hidden-size")
    if done.returncode != 0:
        raise RuntimeError(f"memory run of {name} at seq {seq_length} failed (exit {done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--ffn-hidden-size", type=int, default=1536)
    parser.add_argument("--num-attention-heads", type=int, default=8)
    parser.add_argument("--num-query-groups", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=32000, help="a multiple of 128 (ours pads to it)")
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--bf16", dest="bf16", action="store_true", default=None)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--seq-scaling", type=int, nargs=2, metavar=("A", "B"), default=None,
                        help="also measure both models' peak memory at sequence lengths A and B")
    parser.add_argument("--fusions", choices=("default", "on", "off", "compare"), default="default",
                        help="megatron-core's compiled SwiGLU and bias-dropout-add in ours: default (on with a GPU, "
                        "off on a CPU), on, off, or compare (ours with and without them, side by side)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="time only")
    parser.add_argument("--profile", action="store_true", help="print the top ops of one step of each model "
                        "(torch.profiler) and stop")
    parser.add_argument("--profile-top", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, to check the script (CPU too)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--memory-child", choices=sorted(MODELS), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bf16 is None:
        args.bf16 = device.cuda()
    if args.quick:
        args.num_layers, args.hidden_size, args.ffn_hidden_size = 2, 64, 128
        args.num_attention_heads, args.num_query_groups, args.vocab_size = 4, 2, 512
        args.seq_length, args.micro_batch_size, args.steps, args.warmup = 64, 2, 2, 1
        args.seq_scaling = [32, 64] if args.seq_scaling else None
    if args.vocab_size % 128:
        print(f"error: --vocab-size {args.vocab_size} must be a multiple of 128 (ours pads the vocabulary to "
              "one; the peer would then train a smaller table)", file=sys.stderr)
        return 1
    if args.memory_child:
        print(json.dumps(memory_child(args)))
        return 0

    parallel.initialize(seed=1234)
    if args.profile:
        for name, table in profile_models(args, args.profile_top).items():
            print(f"\nprofile: one {name} step, {args.num_layers} layers x {args.hidden_size}, seq {args.seq_length}, "
                  f"micro-batch {args.micro_batch_size}")
            print(table)
        parallel.shutdown()
        return 0
    models = {name: build(name, args) for name in model_names(args)}
    times = {name: [] for name in models}
    for round_index in range(args.warmup + args.steps):
        for name, model in models.items():
            started = time.perf_counter()
            model.step()
            if round_index >= args.warmup:
                times[name].append(time.perf_counter() - started)
    parameters = {name: model.parameters for name, model in models.items()}
    del models
    parallel.shutdown()
    tokens = args.micro_batch_size * args.seq_length
    median = {name: statistics.median(t) for name, t in times.items()}
    results = dict(
        device=torch.cuda.get_device_name() if device.cuda() else "cpu", torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"), args=vars(args), parameters=parameters,
        median_ms={k: 1e3 * v for k, v in median.items()}, tokens_per_s={k: tokens / v for k, v in median.items()},
        time_ratio=median["ours"] / median["peer"],
        time_ratio_per_round=statistics.median(o / p for o, p in zip(times["ours"], times["peer"])),
    )
    if "ours-unfused" in times:
        results["fusions_time_ratio"] = median["ours"] / median["ours-unfused"]
    save(results, args.output)  # the times, before the memory runs (a run cut short keeps them)
    if args.memory:
        peaks = {name: measure_memory(args, name, args.seq_length)["peak_bytes"] for name in model_names(args)}
        results.update(peak_gib={k: v / 2**30 for k, v in peaks.items()}, memory_ratio=peaks["ours"] / max(peaks["peer"], 1))
    if args.seq_scaling:
        short, long = args.seq_scaling
        scaling = {}
        for name in model_names(args):
            a, b = (measure_memory(args, name, seq)["peak_bytes"] for seq in (short, long))
            scaling[name] = dict(peak_gib={short: a / 2**30, long: b / 2**30}, ratio=b / max(a, 1))
        results["seq_scaling"] = scaling

    print(f"device: {results['device']}; {args.num_layers} layers x {args.hidden_size}, seq {args.seq_length}, "
          f"micro-batch {args.micro_batch_size}, {'bf16' if args.bf16 else 'fp32'}; parameters ours "
          f"{parameters['ours']:,} / peer {parameters['peer']:,}")
    print("| model | median ms | tokens/s | peak GiB (alone) |")
    print("|---|---|---|---|")
    for name in model_names(args):
        gib = f"{results['peak_gib'][name]:.2f}" if args.memory else "n/a"
        print(f"| {name} | {results['median_ms'][name]:.1f} | {results['tokens_per_s'][name]:,.0f} | {gib} |")
    line = f"ours / peer: time {results['time_ratio']:.3f}x (per round {results['time_ratio_per_round']:.3f}x)"
    if args.memory:
        line += f", peak memory {results['memory_ratio']:.3f}x"
    print(line)
    if "fusions_time_ratio" in results:
        line = f"ours with / without the compiled fusions: time {results['fusions_time_ratio']:.3f}x"
        if args.memory:
            line += f", peak memory {results['peak_gib']['ours'] / results['peak_gib']['ours-unfused']:.3f}x"
        print(line)
    for name, row in results.get("seq_scaling", {}).items():
        (a, pa), (b, pb) = row["peak_gib"].items()
        print(f"{name}: peak {pa:.2f} GiB at seq {a}, {pb:.2f} GiB at seq {b}: {row['ratio']:.2f}x for {b / a:.0f}x "
              "the sequence")
    save(results, args.output)
    return 0


def save(results: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    sys.exit(main())

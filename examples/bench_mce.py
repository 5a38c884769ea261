"""Benchmark: the fused MCE vs the paper's Listing-3 loop vs one ordinary cross-entropy.

Every method gets the same logits, N latent positions x V vocabulary (bf16 with requires_grad by
default: what the output layer hands the loss in bf16 training; every method computes in fp32
inside), and forward + backward are timed together. Methods:

  fused     fused_vocab_parallel_mce(logits, labels (N, s), mce_target_weights(labels)).sum()
  listing3  mce_loss_reference: the paper's Listing 3, s calls of F.cross_entropy on fp32 logits
  megatron  ONE ordinary CE: megatron-core's tensor_parallel.vocab_parallel_cross_entropy, .sum()
  torch     ONE ordinary CE: F.cross_entropy(logits.float(), labels, reduction="sum")
  single    single_kernel_mce (megatron_tst/tst/loss_kernels.py), its eager row blocks
  single-compiled  the same through torch.compile (C++ on CPU, Triton on a GPU; compiled in the
            warm-up run, which is not timed)
  megatron-fused   ONE ordinary CE: megatron-core's fusions.fused_vocab_parallel_cross_entropy
            (--cross-entropy-loss-fusion), .sum()

With --linear the methods take hidden states (N, --hidden) and an output weight (V, --hidden)
instead of logits (what a model's output layer + loss costs; grads of both):
  linear-fused     fused_linear_mce (megatron_tst/tst/linear_loss.py): logits never stored
  linear-fused-compiled   the same with its row passes compiled
  linear-mce       the output GEMM + fused_vocab_parallel_mce (today's TST path)
  linear-megatron  the output GEMM + megatron-core's vocab_parallel_cross_entropy (slot 0)
  linear-megatron-fused   the output GEMM + megatron-core's fused CE (slot 0)
With --main-grad the output weight carries an fp32 ``main_grad`` (allocated with the inputs), as
under megatron-core's DDP: the fused layer adds its weight gradient there during the forward
(``main_grad_in_forward``, the upstream gradient being 1 here); the unfused methods still get a
.grad (megatron-core's fused accumulation needs Apex's CUDA extension).

The s targets of position j are the next bag of a random token stream, folded as in training
(``fold_labels``: the last position has s-1 ignored targets); the one-target CEs take slot 0.

Time: median over --repeats runs after --warmup runs, the four methods interleaved within each
(V, s) so that machine noise hits them alike; the fused/megatron ratio is also given for the
fastest run of each (less sensitive to other load on a shared machine). Each call gets its own fresh copy of the logits,
made before its clock starts (fp32 logits are overwritten in place by the fused MCE and by
megatron-core's CE; with bf16 logits they are not, but every method is treated the same).

Peak memory, the peak of the bytes allocated during forward + backward on top of the inputs
(the logits' gradient included, since it stays allocated):
  * CPU: measured in a fresh process per (V, s), which preallocates the inputs, warms each method
    up on small inputs, then for each method in turn
      - "alloc": runs it under torch.profiler(profile_memory=True) and takes the peak of the running
        sum of the CPU allocator's allocation/free events (exact, in bytes, what
        torch.cuda.max_memory_allocated reports on a GPU; the primary figure), and
      - "rss": runs it again without the profiler after resetting the kernel's resident-set
        high-water mark (echo 5 > /proc/self/clear_refs) and reports VmHWM minus VmRSS before the
        call (the real memory of the process, allocator slack included; a cross-check).
  * CUDA (--device cuda): torch.cuda.max_memory_allocated() minus memory_allocated() before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import megatron_tst  # noqa: F401  (first: the CPU compatibility layer)

import torch
import torch.nn.functional as F

METHODS = ("fused", "listing3", "megatron", "torch", "single", "single-compiled", "megatron-fused")
LINEAR_METHODS = ("linear-fused", "linear-fused-compiled", "linear-mce", "linear-megatron", "linear-megatron-fused")
# the ratio columns: (numerator, denominator) when both ran
RATIOS = (("fused", "megatron"), ("single", "fused"), ("single-compiled", "fused"),
          ("single-compiled", "megatron-fused"), ("linear-fused", "linear-mce"),
          ("linear-fused-compiled", "linear-mce"), ("linear-fused", "linear-megatron-fused"))
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MiB = 2**20


def make_inputs(positions: int, vocab: int, bag: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Base logits (N, V) without grad, next-token labels (1, s*N) and their folded bags (N, s)."""
    from megatron_tst.tst import fold_labels

    generator = torch.Generator().manual_seed(seed)
    logits = torch.empty(positions, vocab, dtype=dtype)
    for start in range(0, positions, 256):  # in chunks: no fp32 temporary of the whole matrix
        rows = logits[start:start + 256]
        rows.copy_(torch.randn(rows.shape, generator=generator) * 2)
    flat_labels = torch.randint(0, vocab, (1, bag * positions), generator=generator)
    bags = fold_labels(flat_labels, bag)[0]
    return logits.to(device), flat_labels.to(device), bags.contiguous().to(device)


def make_linear_inputs(positions: int, vocab: int, bag: int, hidden: int, dtype: torch.dtype, device: str,
                       seed: int = 0):
    """(hidden states (N, H), output weight (V, H)) whose logits have std ~2, labels, bags."""
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(positions, hidden, generator=generator).to(dtype)
    weight = (torch.randn(vocab, hidden, generator=generator) * (2 / hidden**0.5)).to(dtype)
    from megatron_tst.tst import fold_labels

    flat_labels = torch.randint(0, vocab, (1, bag * positions), generator=generator)
    bags = fold_labels(flat_labels, bag)[0].contiguous()
    return (states.to(device), weight.to(device)), flat_labels.to(device), bags.to(device)


MAIN_GRAD = False  # --main-grad


def fresh(base):
    if isinstance(base, tuple):
        parts = tuple(fresh(part) for part in base)
        if MAIN_GRAD:  # (states, weight): the weight's DDP gradient buffer
            parts[1].main_grad = torch.zeros(parts[1].shape, dtype=torch.float32, device=parts[1].device)
        return parts
    return base.detach().clone().requires_grad_()


def loss_of(method: str, logits: torch.Tensor, flat_labels: torch.Tensor, bags: torch.Tensor) -> torch.Tensor:
    from megatron_tst.tst import fused_vocab_parallel_mce, mce_loss_reference, mce_target_weights

    if method == "fused":
        return fused_vocab_parallel_mce(logits, bags, mce_target_weights(bags)).sum()
    if method == "listing3":
        return mce_loss_reference(logits.view(1, *logits.shape), flat_labels)
    if method == "megatron":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        return vocab_parallel_cross_entropy(logits, bags[:, 0].contiguous()).sum()
    if method == "torch":
        return F.cross_entropy(logits.float(), bags[:, 0], reduction="sum")
    if method in ("single", "single-compiled"):
        from megatron_tst.tst import single_kernel_mce

        # the gradient written into the logits buffer, as for a model's output-layer logits (a
        # non-leaf); the benchmark's logits are a fresh leaf per call, so that is safe here
        return single_kernel_mce(logits, bags, mce_target_weights(bags), compile=method == "single-compiled",
                                 inplace_backward=True).sum()
    if method == "megatron-fused":
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
        from megatron.core.parallel_state import get_tensor_model_parallel_group

        return fused_vocab_parallel_cross_entropy(logits, bags[:, 0].contiguous(),
                                                  get_tensor_model_parallel_group()).sum()
    if method.startswith("linear-"):
        states, weight = logits
        if method in ("linear-fused", "linear-fused-compiled"):
            from megatron_tst.tst import fused_linear_mce

            return fused_linear_mce(states, weight, bags, mce_target_weights(bags),
                                    compile=method == "linear-fused-compiled", main_grad_in_forward=MAIN_GRAD).sum()
        inner = {"linear-mce": "fused", "linear-megatron": "megatron", "linear-megatron-fused": "megatron-fused"}
        if method in inner:
            return loss_of(inner[method], states @ weight.t(), flat_labels, bags)
    raise ValueError(f"unknown method {method!r}")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_call(method, base, flat_labels, bags, device) -> float:
    logits = fresh(base)
    sync(device)
    started = time.perf_counter()
    loss_of(method, logits, flat_labels, bags).backward()
    sync(device)
    return time.perf_counter() - started


# ---- memory -------------------------------------------------------------------------------------

def proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss_peak_bytes(method, base, flat_labels, bags) -> int:
    logits = fresh(base)
    with open("/proc/self/clear_refs", "w") as handle:  # reset VmHWM to the current VmRSS
        handle.write("5")
    before = proc_status_bytes("VmRSS:")
    loss_of(method, logits, flat_labels, bags).backward()
    return proc_status_bytes("VmHWM:") - before


def allocator_peak_bytes(method, base, flat_labels, bags) -> int:
    from torch.profiler import ProfilerActivity, profile

    logits = fresh(base)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss_of(method, logits, flat_labels, bags).backward()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()) == "DeviceType.CPU"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def cuda_peak_bytes(method, base, flat_labels, bags) -> int:
    logits = fresh(base)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss_of(method, logits, flat_labels, bags).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def memory_child(args) -> None:
    """Fresh process: peak MiB of every method at one (V, s); prints one JSON line."""
    from megatron_tst import parallel

    parallel.initialize()
    dtype = DTYPES[args.dtype]
    small = case_inputs(args, 16, 128, args.bag_one, "cpu", seed=1)
    for method in args.methods:  # warm-up: lazy initialisation, imports, first-call allocations
        loss_of(method, fresh(small[0]), *small[1:]).backward()
    inputs = case_inputs(args, args.positions_one, args.vocab_one, args.bag_one, "cpu")
    result = {}
    for method in args.methods:
        result[method] = {
            "alloc": allocator_peak_bytes(method, *inputs) / MiB,
            "rss": rss_peak_bytes(method, *inputs) / MiB,
        }
    print(json.dumps(result))
    parallel.shutdown()


def memory_case(args, vocab, positions, bag) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--memory-child", "--vocab-one", str(vocab),
               "--positions-one", str(positions), "--bag-one", str(bag), "--dtype", args.dtype,
               "--hidden", str(args.hidden), "--methods", *args.methods] + (["--linear"] if args.linear else []) \
        + (["--main-grad"] if args.main_grad else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"memory child failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- main ---------------------------------------------------------------------------------------

def case_inputs(args, positions, vocab, bag, device, seed=0):
    dtype = DTYPES[args.dtype]
    if args.linear:
        return make_linear_inputs(positions, vocab, bag, args.hidden, dtype, device, seed)
    return make_inputs(positions, vocab, bag, dtype, device, seed)


def ratio(a, b, floor=1e-9):
    return a / b if b is not None and a is not None and b > floor else float("nan")


def fmt(value, spec):
    return "n/a" if value is None or value != value else format(value, spec)


def fmt_ratio(value):
    return "n/a" if value is None or value != value else f"{value:.2f}x"


def print_table(rows, args) -> None:
    methods = args.methods
    unit = "alloc MiB" if args.device == "cpu" else "CUDA MiB"
    pairs = [(a, b) for a, b in RATIOS if a in methods and b in methods]
    head = (["V", "N", "s"] + [f"{m} ms" for m in methods] + [f"{m} {unit}" for m in methods]
            + [f"{a}/{b} {what}" for a, b in pairs
               for what in ("time (medians)", "time (minima)", "mem")])
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        t, m = row["time_ms"], row["peak_mib"]
        cells = [str(row["vocab"]), str(row["positions"]), str(row["bag"])]
        cells += [fmt(t.get(k), ".1f") for k in methods]
        cells += [fmt(m[k]["alloc"] if k in m else None, ".0f") for k in methods]
        low = {k: min(v) for k, v in row["all_ms"].items()}
        for a, b in pairs:
            cells += [fmt_ratio(ratio(t.get(a), t.get(b))), fmt_ratio(ratio(low.get(a), low.get(b))),
                      fmt_ratio(ratio(m.get(a, {}).get("alloc"), m.get(b, {}).get("alloc"), 1.0))]
        print("| " + " | ".join(cells) + " |")
    if args.device == "cpu" and any(row["peak_mib"] for row in rows):
        print("\nresident-set cross-check (VmHWM - VmRSS before, MiB):")
        print("| V | N | s | " + " | ".join(f"{m} rss MiB" for m in methods) + " |")
        print("|" + "---|" * (3 + len(methods)))
        for row in rows:
            m = row["peak_mib"]
            print(f"| {row['vocab']} | {row['positions']} | {row['bag']} | "
                  + " | ".join(fmt(m[k]["rss"] if k in m else None, ".0f") for k in methods) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072], help="vocabulary sizes")
    parser.add_argument("--positions", type=int, default=None,
                        help="latent positions N (default: 2048 for V <= 65536, else 1024)")
    parser.add_argument("--bag-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method and case (median)")
    parser.add_argument("--listing3-repeats", type=int, default=None,
                        help="timed runs of the (slow) Listing-3 loop; default --repeats")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="logits dtype")
    parser.add_argument("--methods", nargs="+", choices=METHODS + LINEAR_METHODS,
                        help=f"default: {' '.join(METHODS)}; with --linear {' '.join(LINEAR_METHODS)}")
    parser.add_argument("--linear", action="store_true",
                        help="output layer + loss: hidden states and an output weight in (the linear-* methods)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size H with --linear")
    parser.add_argument("--main-grad", action="store_true",
                        help="with --linear: the output weight has an fp32 main_grad, as under megatron-core's DDP")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--no-memory", action="store_true", help="time only")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: V=4096, N=256, s in {1, 16}, 2 repeats")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--vocab-one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--positions-one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bag-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global MAIN_GRAD
    MAIN_GRAD = args.main_grad
    if args.main_grad and not args.linear:
        parser.error("--main-grad goes with --linear")
    if args.memory_child:
        return memory_child(args)
    if args.methods is None:
        args.methods = list(LINEAR_METHODS if args.linear else METHODS)
    if args.linear != all(m.startswith("linear-") for m in args.methods):
        parser.error("the linear-* methods go with --linear, the others without it")
    if args.quick:
        args.vocab, args.positions, args.bag_sizes, args.repeats = [4096], 256, [1, 16], 2
        args.hidden = min(args.hidden, 128)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")

    from megatron_tst import parallel

    parallel.initialize()
    dtype = DTYPES[args.dtype]
    started = time.time()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"{args.dtype} logits, load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for vocab in args.vocab:
        positions = args.positions or (2048 if vocab <= 65536 else 1024)
        for bag in args.bag_sizes:
            base, flat_labels, bags = case_inputs(args, positions, vocab, bag, args.device)
            repeats = {m: args.repeats for m in args.methods}
            if "listing3" in repeats and args.listing3_repeats:
                repeats["listing3"] = args.listing3_repeats
            for _ in range(args.warmup):
                for method in args.methods:
                    timed_call(method, base, flat_labels, bags, args.device)
            times = {m: [] for m in args.methods}
            for round_ in range(max(repeats.values())):
                for method in args.methods:
                    if round_ < repeats[method]:
                        times[method].append(timed_call(method, base, flat_labels, bags, args.device))
            memory = {}
            if not args.no_memory:
                if args.device == "cuda":
                    memory = {m: {"alloc": cuda_peak_bytes(m, base, flat_labels, bags) / MiB} for m in args.methods}
                else:
                    del base, flat_labels, bags  # the child makes its own
                    memory = memory_case(args, vocab, positions, bag)
            row = dict(vocab=vocab, positions=positions, bag=bag, dtype=args.dtype, device=args.device,
                       time_ms={m: 1000 * statistics.median(t) for m, t in times.items()},
                       all_ms={m: [round(1000 * x, 2) for x in t] for m, t in times.items()},
                       peak_mib=memory)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:  # after every case: a run cut short keeps what it measured
                with open(args.json, "w") as handle:
                    json.dump(rows, handle, indent=1)
    print_table(rows, args)
    print(f"\ntotal {time.time() - started:.0f} s, load average {os.getloadavg()[0]:.2f}")
    parallel.shutdown()


if __name__ == "__main__":
    main()

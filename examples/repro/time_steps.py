#!/usr/bin/env python
"""Time 20 training steps of each study size (baseline and a phase-1 TST step) to estimate the
study's CPU time: python examples/repro/time_steps.py [--steps 20] [--sizes S M L]

Uses a synthetic Megatron dataset with the study's 4096-token vocabulary (step cost does not depend
on the text), the study's shapes and batch (examples/repro/study.sh), one process. Prints per size
the CPU seconds per training step (start-up excluded) and the median step wall time; on an idle
2-core machine with OMP_NUM_THREADS=2 a step's wall time is between half and all of its CPU time.
"""

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 4096


def study_size_args(size: str) -> list[str]:
    """The shapes of study.sh's size_args, read from the script so the two cannot drift apart."""
    text = open(os.path.join(ROOT, "examples", "repro", "study.sh")).read()
    return re.search(rf'^\s*{size}\) echo "([^"]+)"', text, re.M).group(1).split()


def synthetic_corpus(prefix: str) -> None:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    generator = np.random.RandomState(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(4000):
        document = generator.randint(0, VOCAB - 1, generator.randint(50, 400)).astype(np.int64)
        builder.add_document(torch.from_numpy(np.append(document, VOCAB - 1)), [len(document) + 1])
    builder.finalize(prefix + ".idx")


def _cpu_seconds(prefix: str, save: str, size: str, iters: int, tst: bool) -> tuple[float, list[float]]:
    argv = [sys.executable, "-m", "megatron_tst.pretrain", "--model-preset", "tiny", *study_size_args(size),
            "--untie-embeddings-and-output-weights", "--vocab-size", str(VOCAB - 1), "--tokenizer-type",
            "NullTokenizer", "--data-path", prefix, "--split", "98,2,0", "--seq-length", "64",
            "--max-position-embeddings", "64", "--micro-batch-size", "16", "--global-batch-size", "16",
            "--train-iters", str(iters), "--lr", "1e-3", "--log-interval", "1", "--save", save]
    if tst:
        argv += ["--tst-bag-size", "4", "--tst-ratio", "1.0"]  # every step a phase-1 step
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, check=True, capture_output=True, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows = [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl"))]
    return ((after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            [r["step_time_s"] for r in rows if "step_time_s" in r])


def time_run(prefix: str, tmp: str, size: str, steps: int, tst: bool) -> dict:
    """CPU seconds per step = (CPU of a (5 + steps)-step run - CPU of a 5-step run) / steps: start-up,
    data indexing and the final checkpoint cancel; CPU time is what a busy machine inflates least."""
    name = f"{size}-{'tst' if tst else 'base'}"
    short, _ = _cpu_seconds(prefix, os.path.join(tmp, name + "-short"), size, 5, tst)
    long, step_walls = _cpu_seconds(prefix, os.path.join(tmp, name + "-long"), size, 5 + steps, tst)
    return dict(cpu_per_step=(long - short) / steps, step_wall=statistics.median(step_walls[5:]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sizes", nargs="+", default=["S", "M", "L"])
    args = parser.parse_args()
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "synthetic")
        synthetic_corpus(prefix)
        for size in args.sizes:
            for tst in (False, True):
                result = time_run(prefix, tmp, size, args.steps, tst)
                print(f"{size} {'TST phase 1' if tst else 'baseline   '}: {result['cpu_per_step']:.3f} CPU-s per step, "
                      f"median step wall {result['step_wall']:.3f} s (this machine's load)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

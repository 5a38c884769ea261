"""How long a checkpoint save blocks training, synchronous vs --async-save (CPU, one process).

    OMP_NUM_THREADS=2 python examples/bench_async_save.py [--preset 270M] [--repeats 3] [--quick]

Builds the preset's model with megatron-core's optimizer as pretrain does (one step of random
gradients, so Adam state exists), then saves it ``--repeats`` times each way with
``megatron_tst.checkpointing.save``: the synchronous save's wall time, and for --async-save the time
until save returns (training resumes) and the time until the checkpoint is published. ``--quick``:
the tiny preset, one repeat (checks that the script runs; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="270M")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="where checkpoints go (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="tiny preset, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.repeats = "tiny", 1

    import megatron_tst  # noqa: F401
    import torch

    from megatron_tst import checkpointing, parallel, pretrain
    from megatron_tst.arguments import parse_args

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_async_save_")
    from megatron.core.utils import unwrap_model

    config = parse_args(["--model-preset", args.preset, "--seq-length", "16", "--train-iters", "10"])
    parallel.initialize()
    chunks, model_config = pretrain.build_model(config, config.model.architecture(), None)
    optimizer, scheduler = pretrain.build_optimizer(config, chunks, model_config)
    for chunk in chunks:  # one step of random gradients: Adam state to save, as in training
        for param in chunk.parameters():
            param.main_grad.copy_(torch.randn_like(param.main_grad) * 1e-3)
    optimizer.step()
    modules = unwrap_model(chunks)
    parameters = sum(p.numel() for p in modules[0].parameters())
    saved = (modules, optimizer, scheduler, {}, {"model": args.preset})
    # untimed: the first save starts megatron-core's writer-results helper process
    checkpointing.save(os.path.join(workdir, "warm-up"), 1, *saved)
    blocking, returned, published = [], [], []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        checkpointing.save(os.path.join(workdir, "sync"), repeat + 1, *saved)
        blocking.append(time.perf_counter() - start)
        start = time.perf_counter()
        checkpointing.save(os.path.join(workdir, "async"), repeat + 1, *saved, async_save=True)
        returned.append(time.perf_counter() - start)
        checkpointing.finalize_async_saves()
        published.append(time.perf_counter() - start)
    parallel.shutdown()
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in
               os.walk(checkpointing.checkpoint_dir(os.path.join(workdir, "sync"), args.repeats)) for f in files)
    print(f"preset {args.preset}: {parameters:,} parameters, checkpoint {size / 2**20:,.1f} MiB, "
          f"median of {args.repeats}")
    print(f"  synchronous save:        {statistics.median(blocking):8.3f} s blocking")
    print(f"  --async-save, returns:   {statistics.median(returned):8.3f} s blocking")
    print(f"  --async-save, published: {statistics.median(published):8.3f} s after the call")
    if not args.workdir:
        shutil.rmtree(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

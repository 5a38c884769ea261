"""Run a function on N local processes over gloo, as torchrun would, and collect what each returns."""

from __future__ import annotations

import os
import random
import socket
import tempfile
import time
import traceback
import warnings

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    """A port for the spawned ranks' rendezvous. Under pytest-xdist each worker draws from its own
    band below Linux's ephemeral range (32768-60999): a port the kernel handed out and released can
    be handed to the other worker before our ranks bind it, a band cannot."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw"):
        base = 20000 + 1000 * int(worker[2:])
        for port in random.sample(range(base, base + 1000), 1000):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, world_size, port, result_path, fn, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    import megatron_tst  # noqa: F401  (CPU platform layer, per process)
    from megatron_tst import parallel

    try:
        torch.save(fn(rank, world_size, *args), f"{result_path}.{rank}")
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        parallel.shutdown()


def run_distributed(fn, world_size: int, *args, timeout: float = 240.0):
    """Spawn ``world_size`` processes running ``fn(rank, world_size, *args)``; return their values."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result")
        context = mp.start_processes(
            _entry, args=(world_size, _free_port(), result_path, fn, args), nprocs=world_size,
            join=False, start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{fn.__name__} on {world_size} processes ran past {timeout:.0f} s")
        return [torch.load(f"{result_path}.{rank}", weights_only=False) for rank in range(world_size)]

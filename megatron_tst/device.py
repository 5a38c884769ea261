"""Where the model, its batches and the collectives' tensors live: the one place that decides it.

On a CUDA machine every rank works on ``torch.cuda.current_device()`` (set from LOCAL_RANK by
``parallel.initialize``), and NCCL groups accept only tensors on it. Without CUDA everything stays
on the CPU and these functions hand their inputs back unchanged.
"""

from __future__ import annotations

import torch


def cuda() -> bool:
    return torch.cuda.is_available()


def current() -> torch.device:
    """This rank's device: its GPU, or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if cuda() else torch.device("cpu")


def batch_to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A micro-batch on this rank's device. On a GPU the copy goes through pinned memory and does
    not wait for the host (the next kernel on the stream orders it); on a CPU nothing is copied.
    A broadcast view (``expand``) is made dense first: pinning refuses overlapping memory."""
    if not cuda():
        return batch
    device = current()
    return {key: value.contiguous().pin_memory().to(device, non_blocking=True) for key, value in batch.items()}


def module_to_device(module: torch.nn.Module) -> torch.nn.Module:
    """Move a model chunk to this rank's GPU before DDP wraps it (megatron-core's layers already
    sit there unless use_cpu_initialization; torch norms and buffers may not)."""
    return module.cuda(torch.cuda.current_device()) if cuda() else module


def zeros(*shape, dtype=torch.float32) -> torch.Tensor:
    """A zero tensor on this rank's device, for accumulators that go through collectives."""
    return torch.zeros(*shape, dtype=dtype, device=current())

"""Where megatron-core runs: CUDA/NCCL when present, otherwise CPU/gloo through ``cpu``."""

import torch

from megatron_tst.platform.cpu import install, install_megatron


def distributed_backend() -> str:
    """The torch.distributed backend for this machine."""
    return "nccl" if torch.cuda.is_available() else "gloo"


__all__ = ["distributed_backend", "install", "install_megatron"]

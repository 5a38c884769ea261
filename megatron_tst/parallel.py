"""Process-group set-up shared by the training entry points, examples and tests."""

from __future__ import annotations

import datetime
import math
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from megatron_tst.platform import distributed_backend, install_megatron


def initialize(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    expert_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: float = 10,
) -> None:
    """Join the job's process group (torchrun's env:// variables, or a single process) and build
    megatron-core's model-parallel groups; then seed torch and megatron's RNG tracker.
    ``timeout_minutes`` bounds every collective (and the wait for ranks that never arrive), as
    Megatron-LM's --distributed-timeout-minutes."""
    install_megatron()  # CPU platform layer, megatron-level part (no-op with CUDA)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "WORLD_SIZE" in os.environ:  # torchrun (or any env:// launcher)
            dist.init_process_group(backend=distributed_backend(), timeout=timeout)
        else:  # a single process: an in-memory store, so no port to take (or race for) beside other runs
            dist.init_process_group(backend=distributed_backend(), rank=0, world_size=1,
                                    store=dist.HashStore(), timeout=timeout)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        context_parallel_size=context_parallel_size,
        distributed_timeout_minutes=math.ceil(timeout_minutes),
    )
    # Megatron-LM's seeding: each pipeline stage draws from its own stream (seed + 100 x stage), or
    # stages of the same shape would initialise identical layers
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed) if torch.cuda.is_available() else torch.default_generator.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

import megatron_tst  # noqa: F401  (first: prepares torch so megatron-core runs on CPU without CUDA)

import pytest
import torch

from megatron_tst import parallel


@pytest.fixture
def single_rank():
    """A world of one process with megatron-core's model-parallel groups (all of size 1)."""
    parallel.initialize(seed=1234)
    yield
    parallel.shutdown()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or long tests (run in CI on purpose)")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

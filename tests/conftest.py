import megatron_tst  # noqa: F401  (first: prepares torch so megatron-core runs on CPU without CUDA)

import os

import numpy as np
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
    # under pytest-xdist (make test runs two workers) each worker's launcher/torchrun jobs get their own
    # default MASTER_PORT, so two jobs running at once never race for 29500
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw"):
        os.environ["MASTER_PORT"] = str(29500 + 37 * (int(worker[2:]) + 1))
    config.addinivalue_line("markers", "slow: multi-process or long tests (run in CI on purpose)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (pytest -m gpu; skipped with the reason without one)")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


VOCAB, EOD = 512, 511
NULL_VOCAB = EOD  # NullTokenizer's --vocab-size for this corpus: ids below N, EOD N (Megatron-LM's)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A Megatron indexed dataset of arithmetic sequences mod 500 (learnable, so losses fall within a
    few dozen steps), EOD-terminated documents of 20-200 tokens."""
    return write_corpus(str(tmp_path_factory.mktemp("corpus") / "arith"))


@pytest.fixture(scope="session")
def tst_run(corpus, tmp_path_factory):
    """The default two-phase run (``tests.test_pretrain.args``: 24 steps, s=4, r=0.25) trained once,
    in one process, for the tests that compare against it (they read it, never write into it)."""
    from tests.test_pretrain import args, run

    save = str(tmp_path_factory.mktemp("tst_run") / "run")
    run(args(corpus, save))
    return save


@pytest.fixture(scope="session")
def launched_tst_run(corpus, tmp_path_factory):
    """The same default run through the two-phase launcher (fresh processes, converted checkpoint),
    made once for the tests that compare against it (read only)."""
    from megatron_tst import launch
    from tests.test_pretrain import args

    save = str(tmp_path_factory.mktemp("launched_tst_run") / "run")
    assert launch.main(args(corpus, save)) == 0
    return save


def write_corpus(prefix, documents=3000, seed=0, dtype=np.uint16):
    """The arithmetic corpus above at ``prefix``, with a choice of size, seed and token dtype."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    generator = np.random.RandomState(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for _ in range(documents):
        length = generator.randint(20, 200)
        start, step = generator.randint(0, 500), generator.randint(1, 5)
        document = np.append((start + step * np.arange(length)) % 500 + 1, EOD)
        builder.add_document(torch.from_numpy(document.astype(np.int64)), [length + 1])
    builder.finalize(prefix + ".idx")
    return prefix


TE_ATTENTION_VARIABLES = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")


def clear_te_attention_variables() -> dict:
    """megatron-core's GPTModel writes --attention-backend into NVTE_*_ATTN (for Transformer Engine)
    and asserts that a later model in the same process asks for the same: a test that builds
    models with two backends clears them in between. Returns what was set."""
    import os

    return {name: os.environ.pop(name) for name in TE_ATTENTION_VARIABLES if name in os.environ}


@pytest.fixture(autouse=True)
def _fresh_te_attention_variables():
    import os

    saved = clear_te_attention_variables()
    yield
    clear_te_attention_variables()
    os.environ.update(saved)

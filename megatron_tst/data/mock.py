"""--mock-data: megatron-core's synthetic documents (``MockGPTLowLevelDataset``, as Megatron-LM's
--mock-data: 100,000 documents of 1-4095 tokens, ``1, 2, 3, ... mod vocab`` then EOD, fixed seed) in
place of a .bin/.idx corpus, for benchmarks. ``TSTData`` splits and cuts them into phases exactly as
it does a real corpus (so both TST phases run), with no index cache and repetition allowed (a long
run reads the synthetic documents several times)."""

from __future__ import annotations

from megatron.core.datasets.gpt_dataset import MockGPTLowLevelDataset

PREFIX = "mock"  # what a report row names as the dataset


def low_level_dataset(tokenizer) -> MockGPTLowLevelDataset:
    """megatron-core's mock documents for a tokenizer with ``vocab_size`` and ``eod``."""
    return MockGPTLowLevelDataset(tokenizer)

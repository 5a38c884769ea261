"""TST datasets on real megatron-core indexed datasets whose every token is its own position.

Token t of the corpus has the id ``offset + t``, so the id names the raw token: what a phase read
is exactly the set of ids it returned.
"""

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_tst.data import DataConfig, DataTooSmallError, TSTData
from megatron_tst.tst import IGNORE_INDEX, TSTPlan

EOD = 0
SEQ, BATCH = 8, 4


def write_corpus(prefix, lengths, offset=1):
    """Documents of the given lengths (EOD included as the last token), ids counting from offset."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    position = offset
    for length in lengths:
        body = torch.arange(position, position + length - 1, dtype=torch.int32)
        builder.add_document(torch.cat([body, torch.tensor([EOD], dtype=torch.int32)]), [length])
        position += length - 1
    builder.finalize(f"{prefix}.idx")
    return position


@pytest.fixture
def corpus(tmp_path):
    lengths = np.random.RandomState(0).randint(5, 60, size=400)
    end = write_corpus(str(tmp_path / "a"), lengths)
    return str(tmp_path / "a"), end


def make(prefix_or_paths, end, plan=None, iters=None, tmp=None, **overrides):
    config = DataConfig(
        data_path=prefix_or_paths if isinstance(prefix_or_paths, list) else [prefix_or_paths],
        seq_length=SEQ, global_batch_size=BATCH, vocab_size=end + 1, eod=EOD, split="90,10,0",
        **overrides,
    )
    return TSTData(config, plan, total_iters=iters)


def ids_read(data, phase):
    read = set()
    for index in range(data.samples[phase]):
        sample = data.sample(phase, index)
        for key in ("tokens", "labels"):
            values = sample[key].flatten().tolist()
            read.update(v for v in values if v not in (EOD, IGNORE_INDEX))
    return read


def test_phases_never_read_the_same_raw_token(corpus):
    prefix, end = corpus
    plan = TSTPlan(bag_size=4, total_iters=60, ratio=0.3)
    data = make(prefix, end, plan)
    assert data.samples == {"superposition": 18 * BATCH, "recovery": 42 * BATCH}
    phase1, phase2 = ids_read(data, "superposition"), ids_read(data, "recovery")
    assert not phase1 & phase2
    # phase 1 really ate s times the data per sample
    assert len(phase1) > 0.9 * data.samples["superposition"] * 4 * SEQ
    valid = set()
    for index in range(len(data.valid)):
        valid.update(v for v in data.valid_sample(index)["tokens"].tolist() if v != EOD)
    assert not valid & (phase1 | phase2)  # the valid split is its own documents


def test_phase1_samples_line_up_as_listing3(corpus):
    prefix, end = corpus
    plan = TSTPlan(bag_size=3, total_iters=20, ratio=0.5)
    data = make(prefix, end, plan)
    for index in range(5):
        raw = data.train["superposition"][index]
        text = torch.cat([raw["tokens"][:1], raw["labels"]])  # x_0 .. x_{sL}
        sample = data.sample("superposition", index)
        assert sample["tokens"].shape == (SEQ, 3) and sample["labels"].shape == (SEQ, 3)
        assert torch.equal(sample["tokens"], text[:-1].view(SEQ, 3))
        for j in range(SEQ):
            for i in range(3):
                k = (j + 1) * 3 + i
                assert sample["labels"][j, i] == (text[k] if k <= 3 * SEQ else IGNORE_INDEX)
        assert torch.equal(sample["position_ids"], torch.arange(SEQ))
    recovery = data.sample("recovery", 0)
    assert recovery["tokens"].shape == (SEQ,) and recovery["labels"].shape == (SEQ,)


def test_eod_mask_travels_with_its_target(corpus):
    """Megatron's eod_mask_loss masks the target that follows an EOD input (the next document's
    first token); in bags that target keeps its mask wherever the shift puts it."""
    prefix, end = corpus
    data = make(prefix, end, TSTPlan(bag_size=4, total_iters=20, ratio=0.5), eod_mask_loss=True)
    for index in range(20):
        raw = data.train["superposition"][index]
        text = torch.cat([raw["tokens"][:1], raw["labels"]])
        labels = data.sample("superposition", index)["labels"]
        for j in range(SEQ):
            for i in range(4):
                k = (j + 1) * 4 + i
                if k <= 4 * SEQ:
                    assert (labels[j, i] == IGNORE_INDEX) == (text[k - 1] == EOD)


def test_resuming_mid_phase_gives_the_same_batches(corpus):
    prefix, end = corpus
    plan = TSTPlan(bag_size=2, total_iters=40, ratio=0.5)
    data = make(prefix, end, plan)
    uninterrupted = list(data.micro_batches("superposition", 0, micro_batch_size=2))
    resumed_data = make(prefix, end, plan)  # a new process would rebuild (and load the cache)
    consumed = 7 * BATCH
    resumed = list(resumed_data.micro_batches("superposition", consumed, micro_batch_size=2))
    skip = consumed // 2
    assert len(resumed) == len(uninterrupted) - skip
    for a, b in zip(uninterrupted[skip:], resumed):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])


def test_data_parallel_ranks_split_the_same_global_order(corpus):
    prefix, end = corpus
    data = make(prefix, end, None, iters=10)
    single = [b["tokens"] for b in data.micro_batches("next-token", 0, micro_batch_size=2)]
    ranks = [list(data.micro_batches("next-token", 0, 2, data_parallel_rank=r, data_parallel_size=2))
             for r in range(2)]
    interleaved = [batch["tokens"] for pair in zip(*ranks) for batch in pair]
    assert all(torch.equal(a, b) for a, b in zip(single, interleaved)) and len(single) == len(interleaved)


def test_deterministic_given_the_seed(corpus):
    prefix, end = corpus
    plan = TSTPlan(bag_size=2, total_iters=20, ratio=0.5)
    a, b, c = make(prefix, end, plan), make(prefix, end, plan), make(prefix, end, plan, seed=99)
    first = [a.sample("recovery", i)["tokens"] for i in range(8)]
    assert all(torch.equal(x, b.sample("recovery", i)["tokens"]) for i, x in enumerate(first))
    assert not all(torch.equal(x, c.sample("recovery", i)["tokens"]) for i, x in enumerate(first))


def test_blend_respects_weights(tmp_path):
    end_a = write_corpus(str(tmp_path / "a"), [40] * 600, offset=1)
    end_b = write_corpus(str(tmp_path / "b"), [40] * 600, offset=end_a)
    data = make(["0.25", str(tmp_path / "a"), "0.75", str(tmp_path / "b")], end_b,
                TSTPlan(bag_size=2, total_iters=100, ratio=0.5))
    for phase in ("superposition", "recovery"):
        from_a = sum(int(data.sample(phase, i)["tokens"].flatten()[0] < end_a)
                     for i in range(data.samples[phase]))
        assert abs(from_a / data.samples[phase] - 0.25) < 0.01


def test_too_small_corpus_is_refused_with_the_numbers_unless_repetition_is_allowed(corpus):
    prefix, end = corpus
    plan = TSTPlan(bag_size=6, total_iters=400, ratio=0.3)
    with pytest.raises(DataTooSmallError, match=r"corpus too small for the planned run: the superposition "
                                                r"phase reads [\d,]+ tokens .* holds [\d,]+ in [\d,]+ documents"):
        make(prefix, end, plan)
    data = make(prefix, end, plan, allow_repetition=True)
    epochs = {row["phase"]: row["epochs"] for row in data.report()}
    assert epochs["superposition"] > 1 and epochs["recovery"] > 1
    assert not ids_read(data, "superposition") & ids_read(data, "recovery")  # still disjoint


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.bin not found; --data-path takes the prefix"):
        make(str(tmp_path / "nowhere"), 10, None, iters=2)


def test_dataloader_workers_give_the_same_batches(corpus):
    """--num-workers: a torch DataLoader with worker processes reads exactly the in-process batches."""
    prefix, end = corpus
    data = make(prefix, end, TSTPlan(bag_size=2, total_iters=10, ratio=0.5))
    for phase, consumed in (("superposition", 4), ("recovery", 0)):
        in_process = list(data.micro_batches(phase, consumed, 2, data_parallel_rank=1, data_parallel_size=2))
        workers = list(data.micro_batches(phase, consumed, 2, data_parallel_rank=1, data_parallel_size=2,
                                          num_workers=2))
        assert len(in_process) == len(workers) > 1
        assert all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                   for a, b in zip(in_process, workers))

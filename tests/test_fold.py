import re

import pytest
import torch

from megatron_tst.tst import IGNORE_INDEX, TSTPlan, fold_labels, raw_sample_length, split_sample


@pytest.mark.parametrize("bag_size,latent", [(1, 5), (2, 4), (3, 2), (6, 7), (16, 3)])
def test_arange_full_mode_targets_are_the_next_bag(bag_size, latent):
    raw = torch.arange(bag_size * latent + 1).unsqueeze(0).repeat(2, 1)
    tokens, labels = split_sample(raw, bag_size)
    assert tokens.shape == (2, latent, bag_size) and labels.shape == (2, latent, bag_size)
    for j in range(latent):
        assert tokens[0, j].tolist() == list(range(j * bag_size, (j + 1) * bag_size))
        expected = [t if t <= bag_size * latent else IGNORE_INDEX
                    for t in range((j + 1) * bag_size, (j + 2) * bag_size)]
        assert labels[0, j].tolist() == expected
    valid_last = (labels[:, -1] != IGNORE_INDEX).sum(dim=-1)
    assert valid_last.tolist() == [1, 1]  # the last latent position keeps only x_{sL}
    assert (labels[:, :-1] != IGNORE_INDEX).all()


def test_paper_worked_example_s3_l2():
    labels = torch.arange(1, 7).unsqueeze(0)  # x1..x6
    bags = fold_labels(labels, 3)
    assert bags.tolist() == [[[3, 4, 5], [6, IGNORE_INDEX, IGNORE_INDEX]]]


def test_input_only_targets_the_first_token_of_the_next_bag():
    raw = torch.arange(4 * 5 + 1).unsqueeze(0)
    tokens, labels = split_sample(raw, 4, mode="input-only")
    assert tokens.shape == (1, 5, 4) and labels.shape == (1, 5, 1)
    assert labels[0, :, 0].tolist() == [4, 8, 12, 16, 20]


def test_output_only_targets_the_next_s_tokens_from_an_ordinary_sample():
    length, bag_size = 6, 3
    raw = torch.arange(raw_sample_length(length, bag_size, "output-only")).unsqueeze(0)
    assert raw.shape[1] == length + 1
    tokens, labels = split_sample(raw, bag_size, mode="output-only")
    assert tokens.tolist() == [list(range(length))]
    for t in range(length):
        expected = [k if k <= length else IGNORE_INDEX for k in range(t + 1, t + 1 + bag_size)]
        assert labels[0, t].tolist() == expected


def test_raw_sample_lengths():
    assert raw_sample_length(8, 6) == 49
    assert raw_sample_length(8, 6, "input-only") == 49
    assert raw_sample_length(8, 6, "output-only") == 9


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: split_sample(torch.zeros(1, 10, dtype=torch.long), 0), "bag size s must be an integer >= 1, got 0"),
        (lambda: split_sample(torch.zeros(1, 10, dtype=torch.long), 2), "must hold s*L+1 tokens; got 10 tokens for s=2"),
        (lambda: split_sample(torch.zeros(10, dtype=torch.long), 2), "raw samples must be 2-D"),
        (lambda: fold_labels(torch.zeros(1, 7, dtype=torch.long), 2), "label length 7 is not divisible by the bag size s=2"),
        (lambda: split_sample(torch.zeros(1, 9, dtype=torch.long), 2, mode="both"), "TST mode must be one of"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_values(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_plan_switch_and_token_accounting():
    plan = TSTPlan(bag_size=6, total_iters=20000, ratio=0.3)
    assert plan.switch_iter == 6000
    assert plan.phase(5999) == "superposition" and plan.phase(6000) == "recovery"
    # the paper's 3B row: 6000 x 6 x 2^21 TST tokens + 14000 x 2^21 recovery tokens
    tokens = plan.raw_tokens(seq_length=2048, global_batch=1024)
    assert tokens == {"superposition": 6000 * 6 * 2**21, "recovery": 14000 * 2**21}
    assert plan.sample_length(2048, 0) == 6 * 2048 + 1 and plan.sample_length(2048, 6000) == 2049


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(bag_size=4, total_iters=100, ratio=1.5), r"TST ratio r must be in \(0, 1\], got 1.5"),
        (dict(bag_size=4, total_iters=100, ratio=0.999), "leaves no step in one phase"),
        (dict(bag_size=4, total_iters=100), "give exactly one of"),
        (dict(bag_size=4, total_iters=100, switch_iter=101), r"switch iteration must be in \[1, 100\], got 101"),
        (dict(bag_size=4, total_iters=100, ratio=0.3, loss_weighting=[1.0, 2.0]), "got 2 loss weights for a bag of s=4"),
    ],
)
def test_plan_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TSTPlan(**kwargs)

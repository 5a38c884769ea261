"""Ignored targets inside the sequence, placed after folding (a data loss mask, EOD masking), in
the fused-vs-Listing-3 comparison for s > 1.

The tail of the last latent position only ever ignores slots 1..s-1 of one position; here targets
are ignored in slot 0 with later slots valid, in middle slots, in the last slot, and a whole
position has every slot ignored (its loss and gradient must be exactly 0, not NaN).
"""

import pytest
import torch

from megatron_tst.tst import (
    IGNORE_INDEX,
    bag_weights,
    fold_labels,
    fused_vocab_parallel_mce,
    listing3_target_weights,
    mce_loss_reference,
    mce_target_weights,
    num_valid_targets,
)

BATCH, LATENT, VOCAB = 3, 7, 37
IGNORED = [(0, 1, 0), (0, 3, 2), (1, 0, 1), (1, 2, 0), (1, 2, 1), (1, 5, -1), (2, 0, -1)]  # (b, j, slot)
ALL_IGNORED = (2, 3)  # (b, j): every slot


def _inputs(bag_size, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(BATCH, LATENT, VOCAB, dtype=dtype, generator=generator) * 3
    labels = torch.randint(0, VOCAB, (BATCH, bag_size * LATENT), generator=generator)
    labels[:, 1::bag_size] = labels[:, 0::bag_size]  # a repeated token inside each bag
    # next-token labels whose folded slot (b, j, i) is ignored: label[j*s + s-1 + i] (fold_labels)
    for b, j, slot in IGNORED:
        labels[b, j * bag_size + bag_size - 1 + slot % bag_size] = IGNORE_INDEX
    b, j = ALL_IGNORED
    labels[b, j * bag_size + bag_size - 1:(j + 1) * bag_size + bag_size - 1] = IGNORE_INDEX
    bags = fold_labels(labels, bag_size)
    for b, j, slot in IGNORED:  # the ignores landed where they were meant to, after folding
        assert bags[b, j, slot] == IGNORE_INDEX and (bags[b, j] >= 0).any()
    assert (bags[ALL_IGNORED] == IGNORE_INDEX).all()
    return logits, labels, bags


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("weighting", ["uniform", "power", "exp", [0.5, 2.0, 0.0, 1.0, 3.0, 1.0]])
@pytest.mark.parametrize("bag_size", [4, 6])
def test_fused_equals_listing3_with_ignores_inside_the_sequence(dtype, rtol, weighting, bag_size):
    if isinstance(weighting, list):
        weighting = weighting[:bag_size]
    logits, labels, bags = _inputs(bag_size, dtype)
    reference_logits = logits.clone().requires_grad_()
    reference = mce_loss_reference(reference_logits, labels, weighting)
    reference.backward()

    fused_logits = logits.clone().requires_grad_()
    per_position = fused_vocab_parallel_mce(fused_logits.clone(), bags, listing3_target_weights(bags, weighting))
    per_position.sum().backward()

    assert torch.allclose(per_position.sum(), reference, rtol=rtol, atol=0), (per_position.sum().item(), reference.item())
    assert (fused_logits.grad - reference_logits.grad).abs().max() <= rtol * reference_logits.grad.abs().max()
    # the position with no target contributes exactly nothing
    assert per_position[ALL_IGNORED].item() == 0.0
    assert torch.count_nonzero(fused_logits.grad[ALL_IGNORED]) == 0


@pytest.mark.parametrize("weighting", ["uniform", "power"])
def test_training_loss_with_ignores_is_the_mean_over_valid_targets(weighting):
    """What training uses (mce_target_weights, divided by the valid-target count), against an
    explicit sum over the valid (b, j, i) targets of -log softmax."""
    bag_size = 4
    logits, _, bags = _inputs(bag_size, torch.float64, seed=1)
    losses = fused_vocab_parallel_mce(logits.clone(), bags, mce_target_weights(bags, weighting).double())
    loss = losses.sum() / num_valid_targets(bags)
    weights = bag_weights(bag_size, weighting)
    scaled = [w * bag_size / sum(weights) for w in weights]
    log_probs = torch.log_softmax(logits, dim=-1)
    valid = torch.nonzero(bags >= 0).tolist()
    assert len(valid) == num_valid_targets(bags) == BATCH * LATENT * bag_size - (bag_size - 1) * BATCH \
        - len(IGNORED) - bag_size
    expected = torch.stack([scaled[i] * -log_probs[b, j, bags[b, j, i]] for b, j, i in valid]).mean()
    # mce_target_weights are fp32 (one rounding, <= 2^-24 relative, per weight); the rest is fp64
    assert torch.allclose(loss, expected, rtol=2**-23, atol=0)
    assert losses[ALL_IGNORED].item() == 0.0

"""The fused MCE with bf16 logits (what a bf16 model's output layer produces).

Like megatron-core's vocab_parallel_cross_entropy, the kernel upcasts bf16 logits to fp32 and
works in fp32; only the returned gradient is rounded to bf16. So at s=1 it must be bit-identical
to megatron-core's cross-entropy (values and gradients: tests/test_loss.py), and for s>1 it must match Listing 3
evaluated on the upcast logits as tightly as the fp32 kernel does (plus one bf16 rounding of the
gradient). A kernel that worked in bf16 would miss both by orders of magnitude.
"""

import pytest
import torch

from megatron_tst.tst import (
    IGNORE_INDEX,
    fold_labels,
    fused_vocab_parallel_mce,
    listing3_target_weights,
    mce_loss_reference,
)

BF16_UNIT_ROUNDOFF = 2.0**-8  # 8 significant bits: |round(x) - x| <= 2^-8 |x|
FP32_KERNEL_RTOL = 1e-5  # the fp32 kernel's tolerance against Listing 3 (tests/test_loss.py)


def _bf16_logits(shape, seed, scale=8.0):
    """Logits of realistic spread (std 8, up to ~±35), exactly representable in bf16."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(torch.bfloat16)


@pytest.mark.parametrize("weighting", ["uniform", "power"])
@pytest.mark.parametrize("bag_size", [4, 6])
def test_bf16_fused_equals_reference_on_upcast_logits(weighting, bag_size):
    batch, latent, vocab = 3, 7, 300
    logits = _bf16_logits((batch, latent, vocab), seed=bag_size)
    generator = torch.Generator().manual_seed(10 + bag_size)
    labels = torch.randint(0, vocab, (batch, bag_size * latent), generator=generator)
    labels[:, 1::bag_size] = labels[:, 0::bag_size]  # repeated tokens inside a bag
    bags = fold_labels(labels, bag_size)
    bags[1, 2, 1] = IGNORE_INDEX  # ignored targets inside the sequence, after folding
    bags[2, 4, :] = IGNORE_INDEX

    # Listing 3 on the upcast logits, in fp32 (the exact bf16 values, widened)
    upcast = logits.float().requires_grad_()
    flat = bags.reshape(batch, -1)  # fold_labels(shift left by s-1) undone: un-shift the labels
    unfolded = torch.cat([torch.full((batch, bag_size - 1), IGNORE_INDEX), flat[:, : flat.shape[1] - bag_size + 1]], 1)
    assert torch.equal(fold_labels(unfolded, bag_size), bags)
    reference = mce_loss_reference(upcast, unfolded, weighting)
    reference.backward()

    ours = logits.clone().requires_grad_()
    fused = fused_vocab_parallel_mce(ours.clone(), bags, listing3_target_weights(bags, weighting).float()).sum()
    fused.backward()

    assert fused.dtype == torch.float32 and ours.grad.dtype == torch.bfloat16
    assert abs(fused.item() - reference.item()) <= FP32_KERNEL_RTOL * abs(reference.item())
    # the kernel's fp32 gradient is within the fp32 tolerance; rounding it to bf16 adds <= 2^-8 relative
    bound = BF16_UNIT_ROUNDOFF * upcast.grad.abs() + FP32_KERNEL_RTOL * upcast.grad.abs().max()
    assert ((ours.grad.float() - upcast.grad).abs() <= bound).all(), (ours.grad.float() - upcast.grad).abs().max()

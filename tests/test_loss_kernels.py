"""The single-kernel MCE (megatron_tst.tst.loss_kernels) against Listing 3 in fp64 and today's fused
kernel in fp32: losses and logit gradients, every weighting, ignored targets anywhere (a position
with every slot ignored included), s in {1, 2, 6, 16}, |z| up to 100; the compiled kernel against
the eager one; the in-place gradient."""

import pytest
import torch

from megatron_tst.tst import (
    IGNORE_INDEX,
    fold_labels,
    fused_vocab_parallel_mce,
    listing3_target_weights,
    mce_loss_reference,
    mce_target_weights,
)
from megatron_tst.tst.loss_kernels import single_kernel_mce

WEIGHTINGS = ["uniform", "power", "exp", "first", "mi", "custom"]
BATCH, LATENT, VOCAB = 3, 5, 41


def _weighting(name, bag_size):
    if name == "custom":
        return ([0.5, 2.0, 0.0, 1.0] * bag_size)[:bag_size] if bag_size > 1 else [1.0]
    return "uniform" if name == "first" and bag_size == 1 else name


def extreme_inputs(bag_size, seed=0, batch=BATCH, latent=LATENT, vocab=VOCAB):
    """fp64 logits spread +-50 around row offsets of +-50 (|z| up to 100), next-token labels with a
    repeated token per bag, ignored targets in slot 0, a middle slot and the last slot, and one
    position with every slot ignored."""
    generator = torch.Generator().manual_seed(seed)
    spread = (torch.rand(batch, latent, vocab, generator=generator, dtype=torch.float64) * 2 - 1) * 50
    offsets = torch.where(torch.rand(batch, latent, 1, generator=generator) < 0.5, -50.0, 50.0).double()
    labels = torch.randint(0, vocab, (batch, bag_size * latent), generator=generator)
    if bag_size > 1:
        labels[:, 1::bag_size] = labels[:, 0::bag_size]
    for b, j, slot in [(0, 1, 0), (1, 2, bag_size // 2), (2, 0, bag_size - 1)]:
        labels[b, j * bag_size + bag_size - 1 + slot] = IGNORE_INDEX
    labels[1, 3 * bag_size + bag_size - 1:4 * bag_size + bag_size - 1] = IGNORE_INDEX  # (1, 3): all slots
    bags = fold_labels(labels, bag_size)
    assert (bags[1, 3] == IGNORE_INDEX).all()
    return spread + offsets, labels, bags


@pytest.mark.parametrize("bag_size", [1, 2, 6, 16])
def test_single_kernel_equals_listing3_fp64_and_todays_kernel_fp32(bag_size):
    for name in WEIGHTINGS:
        weighting = _weighting(name, bag_size)
        logits, labels, bags = extreme_inputs(bag_size, seed=bag_size)
        reference_logits = logits.clone().requires_grad_()
        reference = mce_loss_reference(reference_logits, labels, weighting)
        reference.backward()
        # fp64: the Listing-3 weights make the summed per-position losses Listing 3's value
        ours = logits.clone().requires_grad_()
        per_position = single_kernel_mce(ours.clone(), bags, listing3_target_weights(bags, weighting))
        per_position.sum().backward()
        assert torch.allclose(per_position.sum(), reference, rtol=1e-10, atol=0), (name, bag_size)
        scale = reference_logits.grad.abs().max()
        assert (ours.grad - reference_logits.grad).abs().max() <= 1e-10 * scale, (name, bag_size)
        assert per_position[1, 3].item() == 0.0 and torch.count_nonzero(ours.grad[1, 3]) == 0

        # fp32, the training weights, a per-position upstream gradient: against today's kernel
        generator = torch.Generator().manual_seed(1)
        upstream = torch.rand(BATCH, LATENT, generator=generator)
        weights = mce_target_weights(bags, weighting)
        today_logits = logits.float().requires_grad_()
        today = fused_vocab_parallel_mce(today_logits.clone(), bags, weights)
        today.backward(upstream)
        ours32 = logits.float().requires_grad_()
        new = single_kernel_mce(ours32.clone(), bags, weights)
        new.backward(upstream)
        assert new.dtype == torch.float32 and ours32.grad.dtype == torch.float32
        assert torch.allclose(new, today, rtol=1e-5, atol=1e-5 * today.abs().max().item()), (name, bag_size)
        assert (ours32.grad - today_logits.grad).abs().max() <= 1e-5 * today_logits.grad.abs().max()


def test_bf16_gradient_is_the_fp64_gradient_rounded_once_and_written_in_place():
    bag_size = 6
    logits, labels, bags = extreme_inputs(bag_size)
    weights = listing3_target_weights(bags, "power")
    exact = logits.clone().requires_grad_()
    single_kernel_mce(exact.clone(), bags, weights).sum().backward()

    bf16 = logits.to(torch.bfloat16)
    ours = bf16.clone().requires_grad_()
    buffer = ours.clone()  # the output layer's logits: overwritten by their gradient in backward
    losses = single_kernel_mce(buffer, bags, weights.float())
    assert losses.dtype == torch.float32  # a bf16 model still gets fp32 losses
    losses.sum().backward()
    assert ours.grad.dtype == torch.bfloat16
    assert torch.equal(buffer.detach(), ours.grad)  # the gradient was written into the logits buffer
    # the bf16 logits are exact inputs: compare with the fp64 kernel on the same (rounded) values
    rounded = bf16.double().requires_grad_()
    single_kernel_mce(rounded.clone(), bags, weights).sum().backward()
    assert torch.equal(ours.grad, rounded.grad.to(torch.bfloat16))
    assert (rounded.grad - exact.grad).abs().max() > 0  # (the rounding of the logits does matter)

    leaf = bf16.clone().requires_grad_()  # a leaf is the caller's tensor, and a view of it: never overwritten
    for logits in (leaf, leaf.view(-1, VOCAB)):
        shape = logits.shape[:-1] + (bag_size,)
        single_kernel_mce(logits, bags.reshape(shape), weights.float().reshape(shape)).sum().backward()
        assert torch.equal(leaf.detach(), bf16) and torch.equal(leaf.grad, ours.grad)
        leaf.grad = None


def test_compiled_kernel_equals_the_eager_one():
    """torch.compile lowers the two full-row passes to C++ here (Triton on a GPU): the code a GPU
    runs. One dtype, two bag sizes (dynamic shapes: one compilation each pass)."""
    for bag_size in (1, 6):
        logits, _, bags = extreme_inputs(bag_size)
        weights = mce_target_weights(bags, "power")
        upstream = torch.rand(BATCH, LATENT, generator=torch.Generator().manual_seed(2))
        results = []
        for compile in (False, True):
            leaf = logits.float().requires_grad_()
            losses = single_kernel_mce(leaf.clone(), bags, weights, compile=compile)
            losses.backward(upstream)
            results.append((losses, leaf.grad))
        (eager, eager_grad), (compiled, compiled_grad) = results
        assert torch.allclose(compiled, eager, rtol=1e-6, atol=0)
        assert (compiled_grad - eager_grad).abs().max() <= 1e-6 * eager_grad.abs().max()

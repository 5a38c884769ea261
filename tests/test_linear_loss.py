"""The fused output layer + MCE (megatron_tst.tst.linear_loss) against Listing 3 in fp64 and the
unfused output GEMM + MCE in fp32 and bf16: losses and the gradients of the hidden states and the
output weight; several row blocks and vocabulary tiles (the last of each partial); tied embeddings; bad input."""

import re

import pytest
import torch

from megatron_tst.tst import (
    fused_vocab_parallel_mce,
    listing3_target_weights,
    mce_loss_reference,
    mce_target_weights,
    single_kernel_mce,
)
from megatron_tst.tst.linear_loss import fused_linear_mce
from tests.test_loss_kernels import WEIGHTINGS, _weighting, extreme_inputs

HIDDEN, VOCAB = 16, 41


def _layer(batch, latent, dtype=torch.float64, seed=0, vocab=VOCAB):
    """Hidden states [L, b, H] and an output weight (V, H) whose logits reach |z| ~ 100."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(latent, batch, HIDDEN, generator=generator, dtype=torch.float64) * 5
    weight = torch.randn(vocab, HIDDEN, generator=generator, dtype=torch.float64) * 5
    return hidden.to(dtype), weight.to(dtype)


@pytest.mark.parametrize("bag_size", [1, 6])
def test_fused_linear_equals_listing3_fp64(bag_size):
    for name in WEIGHTINGS:
        weighting = _weighting(name, bag_size)
        _, labels, bags = extreme_inputs(bag_size, vocab=VOCAB)
        batch, latent = bags.shape[:2]
        hidden, weight = _layer(batch, latent)
        ref_h, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logits = (ref_h @ ref_w.t()).transpose(0, 1)  # (B, L, V) for Listing 3
        assert logits.abs().max() > 60
        reference = mce_loss_reference(logits, labels, weighting)
        reference.backward()
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        folded = bags.transpose(0, 1)  # [L, b, s]
        losses = fused_linear_mce(h, w, folded, listing3_target_weights(folded, weighting), block_rows=4,
                                  vocab_tile=16)
        assert losses.shape == (latent, batch) and losses.dtype == torch.float64
        losses.sum().backward()
        assert torch.allclose(losses.sum(), reference, rtol=1e-10, atol=0), name
        for ours, theirs in ((h.grad, ref_h.grad), (w.grad, ref_w.grad)):
            assert (ours - theirs).abs().max() <= 1e-10 * theirs.abs().max(), name
        assert losses[3, 1].item() == 0.0  # the position with every slot ignored
        assert torch.count_nonzero(h.grad[3, 1]) == 0


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2.0**-7)])
def test_fused_linear_equals_the_unfused_layer(dtype, rtol):
    """Against the output GEMM in the same dtype + today's kernel (fp32) or the single kernel
    (bf16: the same bf16 logits), with a per-position upstream gradient, s in {1, 16}."""
    for bag_size, weighting in ((1, "uniform"), (16, "power")):
        _, _, bags = extreme_inputs(bag_size, vocab=VOCAB)
        folded = bags.transpose(0, 1).contiguous()
        weights = mce_target_weights(folded, weighting)
        hidden, weight = _layer(bags.shape[0], bags.shape[1], dtype)
        upstream = torch.rand(folded.shape[:2], generator=torch.Generator().manual_seed(4))
        ref_h, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        kernel = fused_vocab_parallel_mce if dtype == torch.float32 else single_kernel_mce
        reference = kernel(ref_h @ ref_w.t(), folded, weights)
        reference.backward(upstream)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        losses = fused_linear_mce(h, w, folded, weights, block_rows=6, vocab_tile=16)
        losses.backward(upstream)
        assert losses.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == dtype
        assert torch.allclose(losses, reference, rtol=rtol, atol=rtol * reference.abs().max().item())
        for ours, theirs in ((h.grad, ref_h.grad), (w.grad, ref_w.grad)):
            # fp32: the sums over vocabulary tiles cancel (the gradient's rows sum to 0), ~3e-5 of the max
            assert (ours.float() - theirs.float()).abs().max() <= max(2 * rtol, 1e-4) * theirs.float().abs().max()


def test_tied_embedding_gets_the_gradient_of_both_uses():
    """The table is the input embedding and the output weight: its gradient is the sum of both
    uses' gradients, as with the unfused output layer (fp64, exact up to rounding)."""
    _, _, bags = extreme_inputs(4, vocab=VOCAB)
    folded = bags.transpose(0, 1).contiguous()
    weights = mce_target_weights(folded, "uniform").double()
    tokens = folded.clamp_min(0)  # the bag inputs: the mean embedding of s tokens
    _, table = _layer(1, 1)
    grads = []
    for fused in (False, True):
        shared = table.clone().requires_grad_()
        hidden = torch.tanh(shared[tokens].mean(dim=2))  # [L, b, H]: a stand-in for the decoder
        if fused:
            losses = fused_linear_mce(hidden, shared, folded, weights, block_rows=5, vocab_tile=10)
        else:
            losses = fused_vocab_parallel_mce(hidden @ shared.t(), folded, weights)
        losses.sum().backward()
        grads.append(shared.grad)
    assert (grads[1] - grads[0]).abs().max() <= 1e-12 * grads[0].abs().max()
    output_use = table.clone().requires_grad_()  # the output use alone differs: both uses are in grads[1]
    fused_linear_mce(torch.tanh(table[tokens].mean(dim=2)), output_use, folded, weights).sum().backward()
    assert (grads[1] - output_use.grad).abs().max() > 1e-3 * grads[0].abs().max()


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: fused_linear_mce(torch.zeros(3, 2, 8), torch.zeros(10, 8, dtype=torch.float64),
                                  torch.zeros(3, 2, 1, dtype=torch.long), torch.ones(3, 2, 1)),
         "hidden states are torch.float32 but the output weight is torch.float64"),
        (lambda: fused_linear_mce(torch.zeros(3, 2, 8), torch.zeros(10, 7), torch.zeros(3, 2, 1, dtype=torch.long),
                                  torch.ones(3, 2, 1)),
         "the output weight must be (V/tp, 8) for hidden states of width 8; got (10, 7)"),
        (lambda: fused_linear_mce(torch.zeros(3, 2, 8), torch.zeros(10, 8), torch.zeros(3, 2, 2, dtype=torch.long),
                                  torch.ones(3, 2, 1)),
         "labels (3, 2, 2) and target weights (3, 2, 1) must both be (..., s) over the positions (3, 2)"),
        (lambda: fused_linear_mce(torch.zeros(3, 2, 8), torch.zeros(10, 8), torch.full((3, 2, 1), 10),
                                  torch.ones(3, 2, 1)),
         "label 10 is outside the vocabulary of 10 tokens"),
        (lambda: single_kernel_mce(torch.zeros(3, 10), torch.full((3, 2), 12), torch.ones(3, 2)),
         "label 12 is outside the vocabulary of 10 tokens"),
        (lambda: single_kernel_mce(torch.zeros(3, 10), torch.zeros(3, 2, dtype=torch.long), torch.ones(3)),
         "labels (3, 2) and target weights (3,) must both be (..., s)"),
        (lambda: fused_vocab_parallel_mce(torch.zeros(3, 10), torch.full((3, 2), 10), torch.ones(3, 2)),
         "label 10 is outside the vocabulary of 10 tokens"),
    ],
)
def test_bad_input_is_one_value_error(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_weight_gradient_from_the_forward_unless_the_upstream_gradient_varies(monkeypatch):
    """Megatron's loss (sum(losses * mask) / tokens: one factor on every weighted position, 0 on
    unweighted ones) takes the forward's weight gradient, scaled; an upstream gradient that varies
    over weighted positions recomputes it. Both equal the unfused layer (fp64)."""
    from megatron_tst.tst import linear_loss

    _, _, bags = extreme_inputs(6, vocab=VOCAB)
    folded = bags.transpose(0, 1).contiguous()
    weights = mce_target_weights(folded, "power").double()
    hidden, weight = _layer(bags.shape[0], bags.shape[1])
    weighted = weights.sum(-1) > 0
    assert not weighted.all()  # the position with every slot ignored
    recomputed = []
    real = linear_loss._recomputed_weight_grad
    monkeypatch.setattr(linear_loss, "_recomputed_weight_grad", lambda *a: recomputed.append(1) or real(*a))
    for upstream, recompute in ((weighted / 7.0, False), (torch.full(weighted.shape, 0.25), False),
                                (weighted * torch.linspace(1, 2, weighted.numel()).view(weighted.shape), True)):
        ref_h, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        fused_vocab_parallel_mce(ref_h @ ref_w.t(), folded, weights).backward(upstream.double())
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        recomputed.clear()
        fused_linear_mce(h, w, folded, weights, block_rows=5, vocab_tile=16).backward(upstream.double())
        assert bool(recomputed) is recompute
        for ours, theirs in ((h.grad, ref_h.grad), (w.grad, ref_w.grad)):
            assert (ours - theirs).abs().max() <= 1e-12 * theirs.abs().max()
    with torch.no_grad():  # no gradient wanted: the forward computes none, the loss is the same
        assert torch.allclose(fused_linear_mce(hidden, weight, folded, weights),
                              fused_vocab_parallel_mce(hidden @ weight.t(), folded, weights), rtol=1e-12)


def test_main_grad_filled_in_the_forward_is_corrected_for_any_upstream_gradient():
    """main_grad_in_forward: main_grad (already holding a gradient) takes the forward's weight
    gradient at upstream 1; backward adds (g - 1) times it where g is not 1 (fp64, exact)."""
    _, _, bags = extreme_inputs(6, vocab=VOCAB)
    folded = bags.transpose(0, 1).contiguous()
    weights = mce_target_weights(folded, "exp").double()
    hidden, weight = _layer(bags.shape[0], bags.shape[1])
    weighted = (weights.sum(-1) > 0).double()
    for upstream in (weighted, 3.0 * weighted, weighted * torch.linspace(1, 2, weighted.numel()).view(weighted.shape)):
        ref_w = weight.clone().requires_grad_()
        fused_vocab_parallel_mce(hidden @ ref_w.t(), folded, weights).backward(upstream)
        w = weight.clone().requires_grad_()
        w.main_grad = torch.full_like(weight, 0.5)
        fused_linear_mce(hidden, w, folded, weights, block_rows=5, main_grad_in_forward=True).backward(upstream)
        assert w.grad is None  # no grad_added_to_main_grad attribute: no dummy, as megatron-core
        assert (w.main_grad - 0.5 - ref_w.grad).abs().max() <= 1e-12 * ref_w.grad.abs().max()

"""The MCE: the Listing-3 reference, and the fused kernel against it (values and gradients)."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from megatron_tst.tst import (
    IGNORE_INDEX,
    bag_weights,
    fold_labels,
    fused_vocab_parallel_mce,
    listing3_target_weights,
    mce_loss_reference,
    mce_target_weights,
    num_valid_targets,
    target_entropy,
)
from megatron_tst.tst.plan import TSTPlan

WEIGHTINGS = ["uniform", "power", "exp", "first", "mi", [0.5, 2.0, 0.0, 1.0]]


def _batch(bag_size, latent=7, batch=3, vocab=37, dtype=torch.float64, seed=0, repeats=True):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, latent, vocab, dtype=dtype, generator=generator) * 3
    labels = torch.randint(0, vocab, (batch, bag_size * latent), generator=generator)
    if repeats and bag_size > 1:  # the same token several times inside a bag
        labels[:, 1::bag_size] = labels[:, 0::bag_size]
    labels[0, 2] = IGNORE_INDEX  # an ignored target inside the sequence
    return logits, labels


def _slot_weights(weighting, bag_size):
    if isinstance(weighting, list):
        return (weighting * bag_size)[:bag_size]
    return weighting


def test_weight_schemes():
    assert bag_weights(4, "power") == [1.0, 0.5, 1 / 3, 0.25]
    assert bag_weights(3, "exp") == [math.exp(-1), math.exp(-2), math.exp(-3)]
    assert bag_weights(3, "first") == [1.0, 0.0, 0.0]
    normalised = torch.tensor(bag_weights(4, "power")) / sum(bag_weights(4, "power"))
    assert torch.allclose(normalised, torch.tensor([0.48, 0.24, 0.16, 0.12]))  # paper Appendix D


def test_reference_with_s1_is_cross_entropy():
    logits, labels = _batch(1)
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    assert torch.equal(mce_loss_reference(logits, labels), expected)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_reference_against_explicit_per_target_sums(weighting):
    """Listing 3 written out by hand: slot i of latent j targets x[(j+1)s + i]."""
    bag_size, latent = 4, 5
    logits, labels = _batch(bag_size, latent=latent)
    weights = bag_weights(bag_size, _slot_weights(weighting, bag_size))
    log_probs = torch.log_softmax(logits, dim=-1)
    total = 0.0
    for slot in range(bag_size):
        terms = []
        for b in range(logits.shape[0]):
            for j in range(latent):
                k = j * bag_size + bag_size - 1 + slot  # index into labels (label[k] = x[k+1])
                if k < labels.shape[1] and labels[b, k] != IGNORE_INDEX:
                    terms.append(-log_probs[b, j, labels[b, k]])
        total += weights[slot] * (torch.stack(terms).mean() if weights[slot] else 0.0)
    expected = total / sum(weights)
    actual = mce_loss_reference(logits, labels, _slot_weights(weighting, bag_size))
    assert torch.allclose(actual, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("bag_size", [1, 4, 6])
def test_fused_equals_reference_values_and_gradients(dtype, rtol, weighting, bag_size):
    weighting = _slot_weights(weighting, bag_size)
    if bag_size == 1 and weighting == "first":
        weighting = "uniform"
    logits, labels = _batch(bag_size, dtype=dtype)
    reference_logits = logits.clone().requires_grad_()
    reference = mce_loss_reference(reference_logits, labels, weighting)
    reference.backward()

    fused_logits = logits.clone().requires_grad_()
    bags = fold_labels(labels, bag_size)
    per_position = fused_vocab_parallel_mce(
        fused_logits.clone(), bags, listing3_target_weights(bags, weighting)
    )
    fused = per_position.sum()
    fused.backward()

    assert fused.dtype == dtype
    assert torch.allclose(fused, reference, rtol=rtol, atol=0), (fused.item(), reference.item())
    scale = reference_logits.grad.abs().max()
    assert (fused_logits.grad - reference_logits.grad).abs().max() <= rtol * scale


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_training_normalisation_is_the_weighted_mean_over_valid_targets(weighting):
    bag_size = 4
    weighting = _slot_weights(weighting, bag_size)
    logits, labels = _batch(bag_size)
    bags = fold_labels(labels, bag_size)
    losses = fused_vocab_parallel_mce(logits.clone(), bags, mce_target_weights(bags, weighting))
    loss = losses.sum() / num_valid_targets(bags)

    weights = bag_weights(bag_size, weighting)
    mean_one = [w * bag_size / sum(weights) for w in weights]
    log_probs = torch.log_softmax(logits, dim=-1)
    terms = [mean_one[i] * -log_probs[b, j, bags[b, j, i]] for b, j, i in torch.nonzero(bags >= 0).tolist()]
    assert torch.allclose(loss, torch.stack(terms).mean(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: what a bf16 model's output layer gives
def test_fused_s1_is_bit_identical_to_megatron_cross_entropy(single_rank, dtype):
    """Values and gradients (the gradient in the logits' dtype); logits of realistic spread (std 8)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(9, 2, 50, generator=generator) * 8).to(dtype)  # [seq, batch, vocab] as megatron's
    labels = torch.randint(0, 50, (9, 2), generator=generator)
    grad = torch.rand(9, 2, generator=generator)

    plain = logits.clone().requires_grad_()
    megatron_loss = vocab_parallel_cross_entropy(plain.clone(), labels)
    megatron_loss.backward(grad)

    ours = logits.clone().requires_grad_()
    bags = labels.unsqueeze(-1)
    fused_loss = fused_vocab_parallel_mce(ours.clone(), bags, mce_target_weights(bags))
    fused_loss.backward(grad)

    assert torch.equal(fused_loss, megatron_loss)
    assert ours.grad.dtype == plain.grad.dtype == dtype
    assert torch.equal(ours.grad, plain.grad)


def test_fused_does_not_materialise_per_slot_copies():
    """The backward keeps one softmax-sized buffer whatever s is (saved tensors, in elements)."""
    saved = {}
    for bag_size in (1, 16):
        logits = torch.randn(64, 1000, requires_grad=True)
        labels = torch.randint(0, 1000, (64, bag_size))
        loss = fused_vocab_parallel_mce(logits.clone(), labels, mce_target_weights(labels))
        numels = [t.numel() for t in loss.grad_fn.saved_tensors]
        saved[bag_size] = sum(numels)
    assert saved[16] - saved[1] <= 64 * 15 * 2  # only the (N, s) targets and weights grow


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: mce_loss_reference(torch.zeros(2, 3, 5), torch.zeros(2, 7, dtype=torch.long)),
         "label length 7 must be a positive multiple of the logits length 3"),
        (lambda: mce_loss_reference(torch.zeros(2, 3, 5), torch.zeros(6, dtype=torch.long)),
         "labels must be (B, s*l) with B=2, got shape (6,)"),
        (lambda: mce_loss_reference(torch.zeros(2, 5), torch.zeros(2, 6, dtype=torch.long)),
         "logits must be (B, l, V), got shape (2, 5)"),
        (lambda: mce_loss_reference(torch.zeros(2, 3, 5), torch.zeros(2, 6, dtype=torch.long), [1.0]),
         "got 1 loss weights for a bag of s=2; give exactly s"),
        (lambda: mce_loss_reference(torch.zeros(2, 3, 5), torch.zeros(2, 6, dtype=torch.long), "cubic"),
         "loss weighting must be one of uniform, power, exp, first"),
        (lambda: bag_weights(0), "bag size s must be an integer >= 1, got 0"),
        (lambda: bag_weights(2, [1.0, -1.0]), "loss weights must be finite, >= 0 and not all 0"),
        (lambda: fused_vocab_parallel_mce(torch.zeros(4, 5), torch.zeros(4, 2, dtype=torch.long),
                                          torch.zeros(4, 3)),
         "labels (4, 2) and target weights (4, 3) must both be (..., s)"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_values(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_mutual_information_weights_follow_the_appendix_d_power_law_without_its_constant():
    for bag_size in (1, 4, 16):
        fitted = [1.35 * distance ** -1.25 for distance in range(1, bag_size + 1)]  # a * d^k, C0 left out
        assert bag_weights(bag_size, "mi") == pytest.approx(fitted, rel=1e-12)
    weights = bag_weights(4, "mi")
    assert weights[0] / weights[1] == pytest.approx(2 ** 1.25) and weights[0] / weights[3] == pytest.approx(4 ** 1.25)
    assert TSTPlan(bag_size=8, total_iters=10, ratio=0.5, loss_weighting="mi").loss_weighting == "mi"


@pytest.mark.parametrize("weighting", ["uniform", "power", "exp", "first", "mi", [0.5, 2.0, 0.0, 1.0]])
def test_target_entropy_is_the_floor_of_the_phase1_loss(weighting):
    """Independently: the entropy of the normalised weights (torch.distributions), and the MCE at its
    optimum (softmax = normalised weights over a bag of distinct targets) equals it."""
    weights = torch.tensor(bag_weights(4, weighting), dtype=torch.float64)
    probs = weights / weights.sum()
    assert target_entropy(4, weighting) == pytest.approx(
        torch.distributions.Categorical(probs=probs).entropy().item(), abs=1e-12)
    targets = torch.tensor([[3, 7, 1, 9], [0, 5, 2, 8]])  # two positions, distinct tokens in each bag
    logits = torch.full((2, 11), -1e4, dtype=torch.float64)
    for position in range(2):
        logits[position, targets[position]] = torch.log(probs.clamp_min(1e-300))  # softmax = probs
    target_weights = mce_target_weights(targets, weighting)
    per_position = fused_vocab_parallel_mce(logits, targets, target_weights) / target_weights.sum(-1)
    assert per_position.tolist() == pytest.approx([target_entropy(4, weighting)] * 2, abs=1e-6)  # fp32 weights


def test_plan_target_entropy_per_mode_and_weighting():
    def plan(**kwargs):
        return TSTPlan(bag_size=6, total_iters=100, ratio=0.3, **kwargs)

    assert plan().target_entropy == pytest.approx(math.log(6))
    assert plan(mode="output-only").target_entropy == pytest.approx(math.log(6))  # next 6 tokens, same weights
    assert plan(mode="input-only").target_entropy == 0.0  # one target per position
    assert plan(loss_weighting="first").target_entropy == 0.0
    power = [1 / i for i in range(1, 7)]
    expected = -sum(w / sum(power) * math.log(w / sum(power)) for w in power)
    assert plan(loss_weighting="power").target_entropy == pytest.approx(expected)
    assert 0 < expected < math.log(6)

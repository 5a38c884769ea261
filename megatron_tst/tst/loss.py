"""The multi-hot cross-entropy (MCE): the paper's reference loop and a fused, vocab-parallel kernel.

MCE of a latent position = the weighted mean of s ordinary CE terms on the same logits,
sum_i w_i CE(z, y_i) / sum_i w_i (paper Section 3, Appendix D; the -log s of the KL form has no
gradient and is left out, so the logged value has a floor: ``target_entropy``, log s for uniform
weights).

Normalisation used for training (``fused_vocab_parallel_mce`` with ``mce_target_weights``):
target (position j, slot i) gets the weight t_ji = m_ji * s * w_i / sum_k w_k (the slot weights
scaled to average 1; m_ji = 0 for ignored targets: IGNORE_INDEX, the tail of the last latent
position, masked tokens). The model returns per-position losses l_j = sum_i t_ji CE_ji and the
training loss is sum_j l_j / (number of valid targets), Megatron's integer-token convention (exact
across micro-batches, data-parallel ranks and ``calculate_per_token_loss``). For uniform weights
that is the mean CE over all valid (position, slot) targets; for s=1 it is exactly Megatron's
next-token loss. Listing 3 instead averages per-slot means; with no ignored target the two are
equal, and they differ by O(1/L) through the last position's ignored tail.
``listing3_target_weights`` gives target weights under which the fused per-position losses sum to
Listing 3's value exactly (the tests use it to compare the fused kernel with the reference).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from megatron_tst.tst.fold import IGNORE_INDEX, check_bag_size, fold_labels

WEIGHTINGS = ("uniform", "power", "exp", "first", "mi")
Weighting = Union[str, Sequence[float]]

# Appendix D's fit of the mutual information between two DCLM tokens d positions apart:
# MI(d) = C0 + a * d**k. The "mi" weighting uses the distance-dependent part a * d**k and leaves the
# constant C0 out (the paper does not say which it used): C0 is the long-range plateau every slot
# shares (with it the weights would be within 1.4x of uniform for any s); without it "mi" is a
# steeper power law than "power" (d^-1.25 vs 1/d; a cancels in the normalisation). Slot i of a
# bag is d = i tokens after the last token of the input bag (or after the input token in
# output-only mode). The weights with C0 are one custom sequence away:
# [MI_FIT_C0 + MI_FIT_A * d**MI_FIT_K for d in 1..s].
MI_FIT_C0, MI_FIT_A, MI_FIT_K = 3.63, 1.35, -1.25


def bag_weights(num_slots: int, weighting: Weighting = "uniform") -> list[float]:
    """Per-slot weights w_1..w_s (1-indexed i): uniform 1, power 1/i, exp exp(-i), first delta_1(i),
    mi a*i^k (Appendix D's mutual-information fit without its constant, see MI_FIT_*), or an
    explicit sequence of s non-negative floats."""
    check_bag_size(num_slots)
    if isinstance(weighting, str):
        if weighting == "uniform":
            return [1.0] * num_slots
        if weighting == "power":
            return [1.0 / i for i in range(1, num_slots + 1)]
        if weighting == "exp":
            return [math.exp(-i) for i in range(1, num_slots + 1)]
        if weighting == "first":
            return [1.0] + [0.0] * (num_slots - 1)
        if weighting == "mi":
            return [MI_FIT_A * i**MI_FIT_K for i in range(1, num_slots + 1)]
        raise ValueError(
            f"loss weighting must be one of {', '.join(WEIGHTINGS)} or a sequence of s floats; "
            f"got {weighting!r}"
        )
    weights = [float(w) for w in weighting]
    if len(weights) != num_slots:
        raise ValueError(f"got {len(weights)} loss weights for a bag of s={num_slots}; give exactly s")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"loss weights must be finite, >= 0 and not all 0; got {weights}")
    return weights


def target_entropy(num_slots: int, weighting: Weighting = "uniform") -> float:
    """Entropy (nats) of the normalised slot weights p_i = w_i / sum w: the floor of the phase-1
    loss, so loss - target_entropy is the paper's KL form (0 at the optimum). log s for uniform, 0
    for "first" and for one slot (input-only mode). Exact when a position's s targets are distinct
    tokens and all valid; repeated tokens in a bag and the ignored tail of the last position(s)
    (O(1/L)) make the true floor a little lower."""
    weights = bag_weights(num_slots, weighting)
    total = sum(weights)
    return -sum(w / total * math.log(w / total) for w in weights if w > 0)


def mce_loss_reference(logits: torch.Tensor, labels: torch.Tensor, weights: Weighting = "uniform"):
    """The paper's Listing 3, kept as the reference the fused kernel is tested against.

    logits (B, l, V); labels (B, s*l) standard next-token labels (label[k] = x[k+1], IGNORE_INDEX
    ignored). s = labels.shape[1] // l; labels are shifted left by s-1 and viewed (B, l, s); the
    result is sum_i w_i CE_i / sum_i w_i where CE_i is F.cross_entropy (mean over the valid targets)
    of slot i. Computed in fp32 (fp64 logits stay fp64). With s=1 it equals F.cross_entropy.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, l, V), got shape {tuple(logits.shape)}")
    if labels.dim() != 2 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must be (B, s*l) with B={logits.shape[0]}, got shape {tuple(labels.shape)}"
        )
    batch, latent, vocab = logits.shape
    if latent == 0 or labels.shape[1] % latent or labels.shape[1] == 0:
        raise ValueError(
            f"label length {labels.shape[1]} must be a positive multiple of the logits length {latent}"
        )
    bag_size = labels.shape[1] // latent
    slot_weights = bag_weights(bag_size, weights)
    pred = logits.reshape(batch * latent, vocab).to(torch.promote_types(logits.dtype, torch.float32))
    bags = fold_labels(labels, bag_size)
    loss = pred.new_zeros(())
    for slot, weight in enumerate(slot_weights):
        if weight:  # a zero-weight slot contributes nothing (and may hold no valid target at all)
            loss = loss + weight * F.cross_entropy(
                pred, bags[..., slot].reshape(-1), ignore_index=IGNORE_INDEX
            )
    return loss / sum(slot_weights)


@functools.lru_cache(maxsize=64)
def _slot_weights(num_slots: int, weighting: Weighting, device: torch.device) -> torch.Tensor:
    # built once per (s, weighting, device): a fresh host tensor per micro-batch would be a blocking
    # host-to-device copy on a GPU
    weights = torch.tensor(bag_weights(num_slots, weighting), dtype=torch.float64)
    return (weights * (num_slots / weights.sum())).to(device=device, dtype=torch.float32)


def mce_target_weights(labels: torch.Tensor, weighting: Weighting = "uniform") -> torch.Tensor:
    """Training target weights t = m * s * w_i / sum w for labels (..., s): see the module docstring."""
    key = weighting if isinstance(weighting, str) else tuple(float(w) for w in weighting)
    return (labels >= 0).to(torch.float32) * _slot_weights(labels.shape[-1], key, labels.device)


def listing3_target_weights(labels: torch.Tensor, weighting: Weighting = "uniform") -> torch.Tensor:
    """Target weights for folded labels (..., s) under which sum(fused losses) == Listing 3."""
    weights = torch.tensor(bag_weights(labels.shape[-1], weighting), dtype=torch.float64, device=labels.device)
    valid = (labels >= 0).to(torch.float64)
    per_slot_count = valid.reshape(-1, labels.shape[-1]).sum(0).clamp_min(1.0)
    return valid * weights / (weights.sum() * per_slot_count)


def check_label_range(labels: torch.Tensor, vocab_size: int) -> None:
    """Refuse labels at or beyond the (whole, unsharded) vocabulary: a host sync off the CPU."""
    if labels.numel() and int(labels.max()) >= vocab_size:
        raise ValueError(
            f"label {int(labels.max())} is outside the vocabulary of {vocab_size} tokens; the data and the "
            f"model's (padded) vocabulary size disagree: check --tokenizer-model / --vocab-size"
        )


def _tp_group_or_none(tp_group):
    if tp_group is not None:
        return tp_group
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


class _VocabParallelMCE(torch.autograd.Function):
    """One pass over the vocabulary: log-sum-exp once, s target logits gathered per position.

    Follows the operation order of megatron-core's vocab_parallel_cross_entropy so that s=1 gives
    bit-identical losses and gradients. Like it, fp32 logits are overwritten in place.
    """

    @staticmethod
    def forward(ctx, logits, targets, target_weights, tp_group):
        world = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
        rank = 0 if tp_group is None else torch.distributed.get_rank(tp_group)
        work = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        logits_max = torch.max(work, dim=-1)[0]
        if world > 1:
            torch.distributed.all_reduce(logits_max, op=torch.distributed.ReduceOp.MAX, group=tp_group)
        work -= logits_max.unsqueeze(-1)

        partition_vocab = work.shape[-1]
        vocab_start = rank * partition_vocab
        off_shard = (targets < vocab_start) | (targets >= vocab_start + partition_vocab)
        local_targets = (targets - vocab_start).masked_fill_(off_shard, 0)  # masked_fill: no host sync
        predicted = torch.gather(work, -1, local_targets).masked_fill_(off_shard, 0.0)
        torch.exp(work, out=work)
        sum_exp = work.sum(dim=-1)
        if world > 1:  # one reduction carries the s target logits and the partition sums
            packed = torch.cat([predicted, sum_exp.unsqueeze(-1)], dim=-1)
            torch.distributed.all_reduce(packed, group=tp_group)
            predicted, sum_exp = packed[..., :-1], packed[..., -1]
        slot_losses = torch.log(sum_exp).unsqueeze(-1) - predicted
        work.div_(sum_exp.unsqueeze(-1))  # now the softmax, kept for backward

        weights = target_weights.to(work.dtype) * (targets >= 0)
        loss = (slot_losses * weights).sum(dim=-1)
        total_weight = weights.sum(dim=-1)
        # backward needs t_i / sum_i t_i on this shard's targets (0 where a position has no weight)
        shares = torch.where(total_weight.unsqueeze(-1) > 0, weights / total_weight.unsqueeze(-1), 0.0)
        ctx.save_for_backward(work, local_targets, shares * ~off_shard, total_weight)
        ctx.input_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, local_targets, local_shares, total_weight = ctx.saved_tensors
        # d/dz sum_i t_i CE_i = (sum_i t_i) * (softmax - sum_i (t_i / sum_i t_i) onehot(y_i)):
        # one scatter and one pass over the vocabulary, in megatron-core's order (bit-identical at s=1)
        grad = softmax
        grad.scatter_add_(-1, local_targets, -local_shares)
        grad.mul_((grad_output * total_weight).unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None


def fused_vocab_parallel_mce(logits, labels, target_weights, tp_group=None) -> torch.Tensor:
    """Per-position MCE, sum_i t_i CE(z, y_i), with the vocabulary split over ``tp_group``.

    logits (..., V/tp) (this rank's vocabulary shard); labels (..., s) global token ids, negative
    for ignored; target_weights (..., s), usually ``mce_target_weights(labels, weighting)``.
    Returns (...). The gradient is softmax * sum_i t_i minus the weighted multi-hot; neither s
    copies of the logits nor of the softmax are made. fp32 logits are overwritten in place.
    """
    if labels.shape != target_weights.shape or labels.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} and target weights {tuple(target_weights.shape)} must "
            f"both be (..., s) over the logits' leading dimensions {tuple(logits.shape[:-1])}"
        )
    group = _tp_group_or_none(tp_group)
    if labels.device.type == "cpu":  # free there; on a GPU it would be a host sync per step
        check_label_range(labels, logits.shape[-1] * (1 if group is None else torch.distributed.get_world_size(group)))
    return _VocabParallelMCE.apply(logits, labels, target_weights, group)

"""The single-kernel MCE and the fused output layer + MCE at TP=2 over gloo against the unsharded
Listing 3 in fp64: the (N, s+2) statistics combined across ranks (|z| up to 100, where a wrong
max/sum-exp combine underflows), vocabulary shards, and for the fused layer the hidden-state
gradient all-reduced (no SP) or reduce-scattered along the sequence (SP), the weight shard's own
gradient. One process pair covers every case."""

import pytest
import torch
from megatron.core import parallel_state

from megatron_tst import parallel
from megatron_tst.tst import listing3_target_weights, mce_loss_reference, single_kernel_mce
from megatron_tst.tst.linear_loss import fused_linear_mce
from tests.distributed import run_distributed
from tests.test_linear_loss import _layer
from tests.test_loss_kernels import extreme_inputs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
VOCAB = 40  # even: two shards of 20


def _relative(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def tp_worker(rank, world_size):
    parallel.initialize(tensor_model_parallel_size=world_size, seed=5)
    group = parallel_state.get_tensor_model_parallel_group()
    shard = slice(rank * VOCAB // world_size, (rank + 1) * VOCAB // world_size)
    errors = {}
    for bag_size, weighting in ((1, "uniform"), (6, "power"), (16, [1.0, 0.0] * 8)):
        logits, labels, bags = extreme_inputs(bag_size, vocab=VOCAB, latent=4)
        weights = listing3_target_weights(bags, weighting)
        full = logits.clone().requires_grad_()
        reference = mce_loss_reference(full, labels, weighting)
        reference.backward()
        local = logits[..., shard].clone().requires_grad_()
        losses = single_kernel_mce(local.clone(), bags, weights, tp_group=group)
        losses.sum().backward()
        errors[f"kernel s={bag_size}"] = (abs(losses.sum().item() - reference.item()) / abs(reference.item()),
                                          _relative(local.grad, full.grad[..., shard]))

        batch, latent = bags.shape[:2]
        hidden, weight = _layer(batch, latent, vocab=VOCAB)
        ref_h, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        reference = mce_loss_reference((ref_h @ ref_w.t()).transpose(0, 1), labels, weighting)
        reference.backward()
        folded = bags.transpose(0, 1).contiguous()
        for sequence_parallel in (False, True):
            rows = slice(rank * latent // world_size, (rank + 1) * latent // world_size) if sequence_parallel \
                else slice(None)
            h = hidden[rows].clone().requires_grad_()
            w = weight[shard].clone().requires_grad_()
            losses = fused_linear_mce(h, w, folded, listing3_target_weights(folded, weighting), tp_group=group,
                                      sequence_parallel=sequence_parallel, block_rows=3, vocab_tile=7)
            losses.sum().backward()
            errors[f"linear s={bag_size} sp={sequence_parallel}"] = (
                abs(losses.sum().item() - reference.item()) / abs(reference.item()),
                _relative(h.grad, ref_h.grad[rows]), _relative(w.grad, ref_w.grad[shard]))
    return errors


def test_tensor_parallel_2_equals_listing3_fp64():
    results = run_distributed(tp_worker, 2)
    for errors in results:
        assert len(errors) == 9
        for case, values in errors.items():
            assert max(values) <= 1e-10, (case, values)

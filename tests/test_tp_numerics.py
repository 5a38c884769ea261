"""Tensor parallelism at production numerics: bf16 bag embeddings and large logits (TP=2, gloo).

- bf16 bag embedding, with and without sequence parallelism, equals the bf16 cast of the fp32 mean
  over the full (gathered) table, bit for bit. Sums of s=4 bf16 values are exact in fp32 here (the
  test checks it), so the order of the fp32 partial sums cannot matter; a bag reduction done in
  bf16 (the partial sums cast before the all-reduce) rounds twice and fails.
- The vocab-parallel MCE with large logits: rows spread ±50 around per-row offsets of ±50 (|z| up
  to 100; the loss is invariant to a row's offset, which the max subtraction removes). A max reduced
  with SUM instead of MAX subtracts ~200 and fp32 exp underflows; with ±3 logits (tests/test_parallel)
  or in fp64 it would pass.
"""

import pytest
import torch
from megatron.core import parallel_state

from megatron_tst import parallel
from megatron_tst.models import preset, transformer_config
from megatron_tst.tst import (
    TSTLanguageModelEmbedding,
    fold_labels,
    fused_vocab_parallel_mce,
    listing3_target_weights,
    mce_loss_reference,
    split_sample,
)
from tests.distributed import run_distributed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ARCH = preset("tiny")
BAG, LATENT, BATCH = 4, 8, 2


def _gather_vocab_rows(tensor):
    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(shards, tensor.contiguous(), group=group)
    return torch.cat(shards)


def _bf16_embedding_check(world_size, sequence_parallel):
    config = transformer_config(ARCH, tensor_model_parallel_size=world_size, bf16=True,
                                sequence_parallel=sequence_parallel)
    embedding = TSTLanguageModelEmbedding(config, ARCH.vocab_size, LATENT, position_embedding_type="rope")
    table = _gather_vocab_rows(embedding.word_embeddings.weight.detach())
    assert table.dtype == torch.bfloat16
    generator = torch.Generator().manual_seed(3)
    raw = torch.randint(0, ARCH.vocab_size, (BATCH, BAG * LATENT + 1), generator=generator)
    tokens, _ = split_sample(raw, BAG)
    slots = table[tokens]
    fp32_sum = slots.float().sum(dim=2)
    assert torch.equal(fp32_sum.double(), slots.double().sum(dim=2))  # exact: any summation order agrees
    expected = (fp32_sum / BAG).to(torch.bfloat16).transpose(0, 1)  # [L, b, h]
    positions = torch.arange(LATENT).unsqueeze(0).expand(BATCH, LATENT)
    with torch.no_grad():
        local = embedding(tokens, positions)
    if sequence_parallel:
        chunk = LATENT // world_size
        rank = parallel_state.get_tensor_model_parallel_rank()
        expected = expected[rank * chunk:(rank + 1) * chunk]
    # tokens of a bag on both vocabulary shards (else the reduction would have nothing to round)
    shard = ARCH.vocab_size // world_size
    assert ((tokens < shard).any(-1) & (tokens >= shard).any(-1)).float().mean() > 0.5
    return dict(dtype=local.dtype, equal=torch.equal(local, expected),
                mismatches=int((local != expected).sum()), numel=local.numel())


def _large_logits_mce_check(dtype):
    """fp32 or bf16 logits up to |z| = 100 split over the vocabulary: fused == Listing 3 in fp64."""
    world = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    generator = torch.Generator().manual_seed(9)
    vocab = 64
    spread = (torch.rand(BATCH, LATENT, vocab, generator=generator, dtype=torch.float64) * 2 - 1) * 50
    offsets = torch.where(torch.rand(BATCH, LATENT, 1, generator=generator) < 0.5, -50.0, 50.0).double()
    logits = (spread + offsets).to(dtype)
    labels = torch.randint(0, vocab, (BATCH, BAG * LATENT), generator=generator)
    labels[:, 1::BAG] = labels[:, ::BAG]
    full = logits.double().requires_grad_()  # the exact values, in fp64
    reference = mce_loss_reference(full, labels, "power")
    reference.backward()
    shard = logits[..., rank * vocab // world:(rank + 1) * vocab // world].clone().requires_grad_()
    bags = fold_labels(labels, BAG)
    fused = fused_vocab_parallel_mce(shard.clone(), bags, listing3_target_weights(bags, "power").float()).sum()
    fused.backward()
    rounding = 2.0**-8 if dtype == torch.bfloat16 else 0.0  # a bf16 gradient: one rounding of the fp32 one
    grad = _gather_vocab_rows(shard.grad.reshape(-1, shard.shape[-1]).T.contiguous()).T.double()
    return dict(
        value_error=abs(fused.item() - reference.item()) / abs(reference.item()),
        grad_error=(((grad - full.grad.reshape(-1, vocab)).abs() - rounding * full.grad.abs().reshape(-1, vocab))
                    / full.grad.abs().max()).max().item(),
        finite=bool(torch.isfinite(fused).item() and torch.isfinite(grad).all()),
    )


def tensor_parallel_numerics_worker(rank, world_size):
    parallel.initialize(tensor_model_parallel_size=world_size, seed=5)
    return dict(
        embedding=_bf16_embedding_check(world_size, sequence_parallel=False),
        embedding_sp=_bf16_embedding_check(world_size, sequence_parallel=True),
        mce_fp32=_large_logits_mce_check(torch.float32),
        mce_bf16=_large_logits_mce_check(torch.bfloat16),
    )


def test_tensor_parallel_2_bf16_embeddings_and_large_logits():
    for result in run_distributed(tensor_parallel_numerics_worker, 2):
        for key in ("embedding", "embedding_sp"):
            got = result[key]
            assert got["dtype"] == torch.bfloat16
            assert got["equal"], f"{key}: {got['mismatches']} of {got['numel']} values differ"
        for key in ("mce_fp32", "mce_bf16"):
            got = result[key]
            assert got["finite"], key
            assert got["value_error"] <= 1e-5, (key, got)  # the fp32 kernel's tolerance (tests/test_loss.py)
            assert got["grad_error"] <= 1e-5, (key, got)

"""TST under tensor, sequence, pipeline and expert parallelism: real megatron-core, CPU, gloo.

Each layout loads the weights a single-process reference saved with megatron-core's
dist_checkpointing (so they are the same model whatever the sharding) and runs one phase-1 step.
"""

import os

import pytest
import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_tst import parallel
from megatron_tst.models import build_gpt_model, preset, transformer_config
from megatron_tst.tst import (
    IGNORE_INDEX,
    TSTLanguageModelEmbedding,
    fold_labels,
    fused_vocab_parallel_mce,
    listing3_target_weights,
    mce_loss_reference,
    num_valid_targets,
    split_sample,
)
from tests.distributed import run_distributed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DENSE = preset("tiny", num_layers=2)
MOE = preset("tiny-moe", moe_aux_loss_coeff=0.0)
BAG, LATENT, BATCH = 4, 16, 2


def _batch(seed, arch=DENSE):
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, arch.vocab_size, (BATCH, BAG * LATENT + 1), generator=generator)
    raw[0, :BAG] = raw[0, 0]  # a bag of one repeated token
    tokens, labels = split_sample(raw, BAG)
    labels[1, 3, 2] = IGNORE_INDEX
    return tokens, labels


def _positions():
    return torch.arange(LATENT).unsqueeze(0).expand(BATCH, LATENT)


def _build(arch, weighting="uniform", **layout):
    config = transformer_config(arch, **layout)
    return build_gpt_model(
        arch, config, loss_weighting=weighting,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )


def _save(model, directory):
    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), directory)


def _load(model, directory):
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), directory))


def _gather_vocab_rows(tensor):
    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(shards, tensor.contiguous(), group=group)
    return torch.cat(shards)


def _tst_step(model, seed=0, arch=DENSE):
    tokens, labels = _batch(seed, arch)
    loss = model(tokens, _positions(), None, labels=labels).sum() / num_valid_targets(labels)
    loss.backward()
    return loss.detach()


# ---------------------------------------------------------------------------------------------
# workers (module level: spawned processes import them by name)


def reference_worker(rank, world_size, directory):
    """One process: the TP=1/PP=1/EP=1 results, and the checkpoints the other layouts load."""
    results = {}
    parallel.initialize(seed=11)
    for weighting in ("uniform", "power"):
        model = _build(DENSE, weighting)
        if weighting == "uniform":
            _save(model, f"{directory}/dense")
        else:
            _load(model, f"{directory}/dense")
        loss = _tst_step(model)
        results[f"dense_{weighting}"] = dict(
            loss=loss, embedding_grad=model.embedding.word_embeddings.weight.grad,
            output_grad=model.output_layer.weight.grad,
            final_norm_grad=model.decoder.final_layernorm.weight.grad,
        )
    model = _build(DENSE)
    _load(model, f"{directory}/dense")
    results["pipeline"] = _pipeline_step(model)
    results["pipeline_grads"] = dict(
        embedding=model.embedding.word_embeddings.weight.grad, output=model.output_layer.weight.grad
    )
    moe = _build(MOE)
    _save(moe, f"{directory}/moe")
    losses = [_tst_step(moe, seed, MOE) for seed in (0, 1)]  # grads accumulate over both batches
    results["moe"] = dict(losses=losses, expert_grads=_expert_grads(moe))
    return results


def tensor_parallel_worker(rank, world_size, directory):
    parallel.initialize(tensor_model_parallel_size=world_size, seed=11)
    results = {}
    for weighting in ("uniform", "power"):
        model = _build(DENSE, weighting, tensor_model_parallel_size=world_size)
        _load(model, f"{directory}/dense")
        loss = _tst_step(model)
        results[f"dense_{weighting}"] = dict(
            loss=loss, embedding_grad=_gather_vocab_rows(model.embedding.word_embeddings.weight.grad),
            output_grad=_gather_vocab_rows(model.output_layer.weight.grad),
            final_norm_grad=model.decoder.final_layernorm.weight.grad,
        )
    results["sequence_parallel"] = _sequence_parallel_embedding_check(world_size)
    results["vocab_parallel_mce"] = _vocab_parallel_mce_check()
    return results


def _sequence_parallel_embedding_check(world_size):
    """Bag embedding with sequence parallelism (one reduce-scatter) against a full-table mean."""
    config = transformer_config(DENSE, tensor_model_parallel_size=world_size, sequence_parallel=True)
    embedding = TSTLanguageModelEmbedding(config, DENSE.vocab_size, LATENT, position_embedding_type="rope")
    assert embedding.reduce_scatter_embeddings
    table = _gather_vocab_rows(embedding.word_embeddings.weight.detach()).requires_grad_()
    tokens, _ = _batch(0)
    upstream = torch.randn(LATENT, BATCH, DENSE.hidden_size, generator=torch.Generator().manual_seed(5))
    expected = (table[tokens].float().sum(dim=2) / BAG).transpose(0, 1)
    (expected * upstream).sum().backward()

    local = embedding(tokens, _positions())
    chunk = LATENT // world_size
    rank = parallel_state.get_tensor_model_parallel_rank()
    (local * upstream[rank * chunk:(rank + 1) * chunk]).sum().backward()
    return dict(
        output_error=(local - expected[rank * chunk:(rank + 1) * chunk]).abs().max(),
        grad_error=(_gather_vocab_rows(embedding.word_embeddings.weight.grad) - table.grad).abs().max(),
        local_shape=tuple(local.shape),
    )


def _vocab_parallel_mce_check():
    """fp64 logits split over the vocabulary: fused == Listing 3 on the full logits."""
    world = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    generator = torch.Generator().manual_seed(9)
    vocab = 64
    logits = torch.randn(BATCH, LATENT, vocab, dtype=torch.float64, generator=generator) * 3
    labels = torch.randint(0, vocab, (BATCH, BAG * LATENT), generator=generator)
    labels[:, 1::BAG] = labels[:, ::BAG]
    full = logits.clone().requires_grad_()
    reference = mce_loss_reference(full, labels, "power")
    reference.backward()
    shard = logits[..., rank * vocab // world:(rank + 1) * vocab // world].clone().requires_grad_()
    bags = fold_labels(labels, BAG)
    fused = fused_vocab_parallel_mce(shard.clone(), bags, listing3_target_weights(bags, "power")).sum()
    fused.backward()
    grad = torch.cat([_gather_vocab_rows(g.T.contiguous()) for g in [shard.grad.reshape(-1, shard.shape[-1])]]).T
    return dict(
        value_error=((fused - reference).abs() / reference.abs()).item(),
        grad_error=((grad - full.grad.reshape(-1, vocab)).abs().max() / full.grad.abs().max()).item(),
    )


def _pipeline_step(model, num_microbatches=2):
    batches = iter([_batch(seed) for seed in range(num_microbatches)])

    def forward_step(data_iterator, model):
        tokens, labels = next(data_iterator)
        output = model(tokens, _positions(), None, labels=labels)

        def loss_func(output_tensor):
            total, count = output_tensor.sum(), num_valid_targets(labels).to(torch.int)
            return total, count, {"lm loss": (total / count).detach()}

        return output, loss_func

    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=batches, model=[model],
        num_microbatches=num_microbatches, seq_length=LATENT, micro_batch_size=BATCH,
    )
    return [report["lm loss"] for report in reports]


def pipeline_parallel_worker(rank, world_size, directory):
    parallel.initialize(pipeline_model_parallel_size=world_size, seed=11)
    model = _build(DENSE, pipeline_model_parallel_size=world_size)
    _load(model, f"{directory}/dense")
    losses = _pipeline_step(model)
    grads = {}
    if parallel_state.is_pipeline_first_stage():
        grads["embedding"] = model.embedding.word_embeddings.weight.grad
    if parallel_state.is_pipeline_last_stage():
        grads["output"] = model.output_layer.weight.grad
    return dict(losses=losses, grads=grads)


def _expert_grads(model):
    """Gradients of every expert's weights, keyed by global expert id."""
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    grads = {}
    for layer_index, layer in enumerate(model.decoder.layers):
        experts = layer.mlp.experts.local_experts
        for local_id, expert in enumerate(experts):
            expert_id = ep_rank * len(experts) + local_id
            grads[(layer_index, expert_id, "fc1")] = expert.linear_fc1.weight.grad
            grads[(layer_index, expert_id, "fc2")] = expert.linear_fc2.weight.grad
    return grads


def expert_parallel_worker(rank, world_size, directory):
    parallel.initialize(expert_model_parallel_size=world_size, seed=11)
    model = _build(MOE, expert_model_parallel_size=world_size)
    _load(model, f"{directory}/moe")
    loss = _tst_step(model, seed=rank, arch=MOE)  # each rank its own batch; tokens cross via alltoall
    return dict(loss=loss, expert_grads=_expert_grads(model))


def context_parallel_worker(rank, world_size):
    """Bags are folded before the context-parallel split: each rank's latent positions keep their
    own next-bag targets (what the training loop feeds a CP rank)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    parallel.initialize(context_parallel_size=world_size, seed=11)
    raw = torch.arange(BAG * LATENT + 1).unsqueeze(0)
    tokens, labels = split_sample(raw, BAG)
    batch = get_batch_on_this_cp_rank({"tokens": tokens, "labels": labels,
                                       "position_ids": torch.arange(LATENT).unsqueeze(0)})
    return {key: value[0] for key, value in batch.items()}


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("checkpoints"))
    return directory, run_distributed(reference_worker, 1, directory)[0]


def _close(actual, expected, rtol=1e-5, atol=1e-7):
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), (actual - expected).abs().max()


def test_tensor_parallel_2_equals_1(reference):
    directory, expected = reference
    ranks = run_distributed(tensor_parallel_worker, 2, directory)
    for weighting in ("uniform", "power"):
        for rank_result in ranks:
            got, want = rank_result[f"dense_{weighting}"], expected[f"dense_{weighting}"]
            _close(got["loss"], want["loss"], rtol=1e-6)
            _close(got["embedding_grad"], want["embedding_grad"])
            _close(got["output_grad"], want["output_grad"])
            _close(got["final_norm_grad"], want["final_norm_grad"])
    for rank_result in ranks:
        sp = rank_result["sequence_parallel"]
        assert sp["local_shape"] == (LATENT // 2, BATCH, DENSE.hidden_size)
        assert sp["output_error"] < 1e-7 and sp["grad_error"] < 1e-6
        assert rank_result["vocab_parallel_mce"]["value_error"] <= 1e-10
        assert rank_result["vocab_parallel_mce"]["grad_error"] <= 1e-10


def test_pipeline_parallel_2_runs_a_tst_step_and_matches_1(reference):
    directory, expected = reference
    first, last = run_distributed(pipeline_parallel_worker, 2, directory)
    assert first["losses"] == []  # only the last stage computes the loss
    assert len(last["losses"]) == 2
    for got, want in zip(last["losses"], expected["pipeline"]):
        _close(got, want, rtol=1e-6)
    _close(first["grads"]["embedding"], expected["pipeline_grads"]["embedding"])
    _close(last["grads"]["output"], expected["pipeline_grads"]["output"])


def test_moe_expert_parallel_2_runs_a_tst_step_and_matches_1(reference):
    directory, expected = reference
    ranks = run_distributed(expert_parallel_worker, 2, directory)
    for rank, rank_result in enumerate(ranks):
        _close(rank_result["loss"], expected["moe"]["losses"][rank], rtol=1e-6)
    local = {}
    for rank_result in ranks:
        local.update(rank_result["expert_grads"])
    assert set(local) == set(expected["moe"]["expert_grads"])
    for key, want in expected["moe"]["expert_grads"].items():
        _close(local[key], want, rtol=1e-4, atol=1e-7)


def test_context_parallel_split_keeps_bags_and_their_targets_together():
    ranks = run_distributed(context_parallel_worker, 2)
    chunk = LATENT // 4
    for rank, batch in enumerate(ranks):
        expected_positions = list(range(rank * chunk, (rank + 1) * chunk)) + \
            list(range((3 - rank) * chunk, (4 - rank) * chunk))
        assert batch["position_ids"].tolist() == expected_positions
        for row, j in enumerate(expected_positions):
            assert batch["tokens"][row].tolist() == list(range(j * BAG, (j + 1) * BAG))
            targets = [t if t <= BAG * LATENT else IGNORE_INDEX for t in range((j + 1) * BAG, (j + 2) * BAG)]
            assert batch["labels"][row].tolist() == targets

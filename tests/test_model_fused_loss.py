"""TSTGPTModel with the fused output layer + MCE (output_layer_loss_fusion) against the same model
unfused: 20 steps of phase 1 (bags, s=4) then 20 of phase 2 (next-token) from the same seed,
losses within 1e-5 in fp32, untied and tied embeddings; evaluation and calls without labels still
get the logits; the state dict is unchanged."""

import dataclasses

import pytest
import torch

from megatron_tst.models import build_gpt_model, preset, transformer_config
from megatron_tst.tst import num_valid_targets, split_sample
from megatron_tst.tst.linear_loss import LossFusedColumnParallelLinear

BAG, LATENT, BATCH = 4, 16, 2


def _model(arch, fused, seed=7):
    torch.default_generator.manual_seed(seed)
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(seed)
    return build_gpt_model(arch, transformer_config(arch), tst=True, loss_weighting="power",
                           output_layer_loss_fusion=fused)


def _train(model, arch, steps_per_phase):
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    positions = torch.arange(LATENT).unsqueeze(0).expand(BATCH, LATENT)
    losses = []
    for step in range(2 * steps_per_phase):
        bag = BAG if step < steps_per_phase else 1
        raw = torch.randint(0, arch.vocab_size, (BATCH, bag * LATENT + 1), generator=generator)
        tokens, labels = split_sample(raw, bag)
        if bag == 1:  # phase 2: plain next-token tensors (b, L)
            tokens, labels = tokens.squeeze(-1), labels.squeeze(-1)
        labels[0, 3] = -100  # an ignored target (a whole position in phase 1)
        per_position = model(tokens, positions, None, labels=labels)
        if labels.dim() == 2:
            per_position = per_position * (labels >= 0)  # pretrain.loss_func's masking of next-token losses
        loss = per_position.sum() / num_valid_targets(labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("untied,steps", [(True, 20), (False, 5)])
def test_fused_output_layer_trains_like_the_unfused_one(single_rank, untied, steps):
    arch = dataclasses.replace(preset("tiny"), untie_embeddings_and_output_weights=untied)
    plain, fused = _model(arch, False), _model(arch, True)
    assert isinstance(fused.output_layer, LossFusedColumnParallelLinear)
    assert fused.share_embeddings_and_output_weights is not untied
    assert list(plain.state_dict()) == list(fused.state_dict())
    plain_losses, fused_losses = _train(plain, arch, steps), _train(fused, arch, steps)
    assert plain_losses[-1] < plain_losses[steps - 1] or plain_losses[steps] > plain_losses[-1]  # it learns
    for step, (a, b) in enumerate(zip(plain_losses, fused_losses)):
        assert abs(a - b) <= 1e-5 * abs(a), (step, a, b)

    # evaluation and logits: the unfused path, the same values
    fused.eval()
    plain.eval()
    tokens = torch.randint(0, arch.vocab_size, (BATCH, LATENT))
    positions = torch.arange(LATENT).unsqueeze(0).expand(BATCH, LATENT)
    with torch.no_grad():
        logits = fused(tokens, positions, None)
        assert logits.shape == (BATCH, LATENT, fused.vocab_size)
        labels = torch.randint(0, arch.vocab_size, (BATCH, LATENT))
        assert torch.equal(fused(tokens, positions, None, labels=labels),
                           fused.compute_language_model_loss(labels, logits.transpose(0, 1).contiguous()))


@pytest.mark.parametrize("untied,per_token", [(True, True), (False, True), (True, False)])
def test_weight_gradient_lands_in_main_grad_under_megatron_ddp(single_rank, untied, per_token):
    """Under megatron-core's DDP (overlap_grad_reduce: its hook needs a .grad) the fused layer adds
    the output weight's gradient straight into main_grad (during the forward with
    calculate_per_token_loss, the loss a plain sum; after it otherwise, the loss a mean) and marks
    grad_added_to_main_grad; every main_grad equals the unfused model's (fp32, tight). Tied: the
    table's main_grad holds both uses."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    arch = dataclasses.replace(preset("tiny"), untie_embeddings_and_output_weights=untied)
    raw = torch.randint(0, arch.vocab_size, (BATCH, BAG * LATENT + 1), generator=torch.Generator().manual_seed(3))
    tokens, labels = split_sample(raw, BAG)
    labels[0, 3] = -100
    positions = torch.arange(LATENT).unsqueeze(0).expand(BATCH, LATENT)
    grads = []
    for fused in (False, True):
        model = _model(arch, fused)
        model.config.calculate_per_token_loss = per_token
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=True), model)
        ddp.zero_grad_buffer()
        loss = ddp(tokens, positions, None, labels=labels).sum()
        (loss if per_token else loss / num_valid_targets(labels)).backward()
        ddp.finish_grad_sync()
        output_weight = model.shared_embedding_or_output_weight() if not untied else model.output_layer.weight
        assert output_weight.grad_added_to_main_grad is fused and output_weight.grad is None
        grads.append({name: p.main_grad.clone() for name, p in model.named_parameters()})
    for name, plain in grads[0].items():
        assert (grads[1][name] - plain).abs().max() <= 1e-5 * plain.abs().max(), name


def test_next_token_loss_through_the_single_kernel_equals_megatron_core(single_rank, monkeypatch):
    """Where NEXT_TOKEN_SINGLE_KERNEL routes next-token labels (b, L) to single_kernel_mce (CUDA;
    forced here on CPU): losses at valid positions and logit gradients equal megatron-core's
    vocab_parallel_cross_entropy (fp32, |z| up to ~60); --cross-entropy-loss-fusion still gets
    megatron-core's fused CE (its lse, not 0, at an ignored position tells them apart)."""
    from megatron.core.models.gpt import GPTModel

    from megatron_tst.tst import loss_kernels

    arch = preset("tiny")
    model = _model(arch, False)
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(LATENT, BATCH, model.vocab_size, generator=generator) * 20
    labels = torch.randint(0, arch.vocab_size, (BATCH, LATENT), generator=generator)
    labels[1, 5] = -100
    valid = labels >= 0
    for routed in (True, False):
        monkeypatch.setitem(loss_kernels.NEXT_TOKEN_SINGLE_KERNEL, "cpu", routed)
        ours = logits.clone().requires_grad_()
        (model.compute_language_model_loss(labels, ours * 1.0) * valid).sum().backward()  # * 1.0: a non-leaf, as the output layer's
        reference = logits.clone().requires_grad_()
        expected = GPTModel.compute_language_model_loss(model, labels, reference * 1.0)
        (expected * valid).sum().backward()
        loss = model.compute_language_model_loss(labels, logits.clone())
        assert bool(loss[1, 5] == 0) is routed
        assert torch.allclose(loss[valid], expected[valid], rtol=1e-6, atol=0)
        # fp32: the single kernel's exp(z - lse) carries lse's rounding (|lse| ~ 60: ~4e-6)
        assert (ours.grad - reference.grad).abs().max() <= 1e-5 * reference.grad.abs().max()
    model.config.cross_entropy_loss_fusion = True  # megatron-core's fused CE, routed or not
    assert model.compute_language_model_loss(labels, logits.clone())[1, 5] > 0

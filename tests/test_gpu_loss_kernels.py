"""The loss kernels on one CUDA GPU (``pytest -m gpu``; in ``tools/gpu_check.sh``): the single-kernel
MCE and the fused output layer + MCE through torch.compile (Triton) against Listing 3 in fp64 on
the CPU, and the fused layer's peak memory at the Llama-3 vocabulary (the issue's target)."""

import pytest
import torch

from megatron_tst.tst import listing3_target_weights, loss_kernels, mce_loss_reference, single_kernel_mce
from megatron_tst.tst.linear_loss import fused_linear_mce
from tests.test_loss_kernels import WEIGHTINGS, _weighting, extreme_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m gpu on a GPU machine)"),
    pytest.mark.timeout(900),
]


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2.0**-8)])
def test_compiled_kernels_on_cuda_match_listing3(dtype, tolerance):
    """tolerance: fp32 as on the CPU; bf16: the logits are rounded first (the reference sees the
    same rounded values), the gradient once more."""
    for bag_size in (1, 6, 16):
        for name in WEIGHTINGS:
            weighting = _weighting(name, bag_size)
            logits, labels, bags = extreme_inputs(bag_size, vocab=64, latent=8)
            logits = logits.to(dtype).double()  # exact in dtype
            full = logits.clone().requires_grad_()
            reference = mce_loss_reference(full, labels, weighting)
            reference.backward()
            weights = listing3_target_weights(bags, weighting).float().cuda()
            ours = logits.to(dtype).cuda().requires_grad_()
            losses = single_kernel_mce(ours.clone(), bags.cuda(), weights, compile=True)
            losses.sum().backward()
            assert abs(losses.sum().item() - reference.item()) <= tolerance * abs(reference.item()), (name, bag_size)
            error = (ours.grad.double().cpu() - full.grad).abs() - tolerance * full.grad.abs()
            assert error.max() <= 1e-5 * full.grad.abs().max(), (name, bag_size)

            hidden = (torch.randn(8, 3, 32, dtype=torch.float64) * 3).to(dtype).double()
            weight = (torch.randn(64, 32, dtype=torch.float64) * 3).to(dtype).double()
            ref_h, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            reference = mce_loss_reference((ref_h @ ref_w.t()).transpose(0, 1), labels, weighting)
            reference.backward()
            h = hidden.to(dtype).cuda().requires_grad_()
            w = weight.to(dtype).cuda().requires_grad_()
            folded = bags.transpose(0, 1).contiguous().cuda()
            losses = fused_linear_mce(h, w, folded, listing3_target_weights(folded, weighting).float(),
                                      block_rows=5, vocab_tile=24, compile=True)
            losses.sum().backward()
            # bf16: the logits themselves are a bf16 GEMM's result here, so a looser bound
            bound = tolerance if dtype == torch.float32 else 2.0**-6
            assert abs(losses.sum().item() - reference.item()) <= bound * abs(reference.item()), (name, bag_size)
            for got, want in ((h.grad, ref_h.grad), (w.grad, ref_w.grad)):
                assert (got.double().cpu() - want).abs().max() <= 4 * bound * want.abs().max(), (name, bag_size)
    # the Triton kernels ran: a failed torch.compile falls back to the eager twins (with a warning),
    # which would pass the checks above without testing what a GPU run uses
    assert not loss_kernels._COMPILE_FAILED, loss_kernels._COMPILE_FAILED


def test_fused_output_layer_peak_memory_at_v128256():
    """8192 positions, V = 128256, H = 1024, bf16, s = 16: the output layer + loss (forward and
    backward, the hidden-state and weight gradients included) within 0.8 GiB beyond the inputs
    (today's GEMM + fused MCE: ~8 GiB)."""
    positions, vocab, hidden_size, bag = 8192, 128256, 1024, 16
    hidden = torch.randn(positions, 1, hidden_size, device="cuda", dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device="cuda") * 0.05).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab, (positions, 1, bag), device="cuda")
    weights = torch.ones(labels.shape, device="cuda")
    fused_linear_mce(hidden, weight, labels, weights).sum().backward()  # compile, warm up
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fused_linear_mce(hidden, weight, labels, weights).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert peak <= 0.8 * 2**30, f"peak {peak / 2**30:.2f} GiB"


def test_next_token_loss_on_cuda_is_the_compiled_single_kernel(single_rank):
    """On CUDA next-token labels go through single_kernel_mce (compiled): losses at valid positions
    and logit gradients equal megatron-core's vocab_parallel_cross_entropy (fp32)."""
    from megatron.core.models.gpt import GPTModel

    from megatron_tst.models import build_gpt_model, preset, transformer_config

    arch = preset("tiny")
    model = build_gpt_model(arch, transformer_config(arch), tst=True).cuda()
    logits = torch.randn(16, 2, model.vocab_size, device="cuda") * 20
    labels = torch.randint(0, arch.vocab_size, (2, 16), device="cuda")
    labels[1, 5] = -100
    valid = labels >= 0
    ours, reference = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = model.compute_language_model_loss(labels, ours * 1.0)
    expected = GPTModel.compute_language_model_loss(model, labels, reference * 1.0)
    (loss * valid).sum().backward()
    (expected * valid).sum().backward()
    assert loss[1, 5].item() == 0  # the single kernel's value at an ignored position (megatron-core: its lse)
    assert torch.allclose(loss[valid], expected[valid], rtol=1e-6, atol=0)
    assert (ours.grad - reference.grad).abs().max() <= 1e-5 * reference.grad.abs().max()


def test_fused_output_layer_trains_like_the_unfused_one_on_cuda(single_rank):
    """--output-layer-loss-fusion on CUDA (its compiled Triton passes, what tools/gpu_check.sh's
    fusion step times): 5 phase-1 steps (bags, s=4) then 5 next-token steps of the tiny model from
    the same weights as the unfused model, fp32: losses within 1e-4, and the Triton path ran."""
    from megatron_tst.models import build_gpt_model, preset, transformer_config
    from megatron_tst.tst import num_valid_targets, split_sample
    from megatron_tst.tst.linear_loss import LossFusedColumnParallelLinear

    bag, latent, batch, steps = 4, 16, 2, 5
    arch = preset("tiny")
    plain, fused = (build_gpt_model(arch, transformer_config(arch), tst=True, output_layer_loss_fusion=on).cuda()
                    for on in (False, True))
    assert isinstance(fused.output_layer, LossFusedColumnParallelLinear)
    fused.load_state_dict(plain.state_dict())
    positions = torch.arange(latent, device="cuda").expand(batch, latent)
    trajectories = []
    for model in (plain, fused):
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        generator, losses = torch.Generator().manual_seed(0), []
        for step in range(2 * steps):
            s = bag if step < steps else 1
            tokens, labels = split_sample(torch.randint(0, arch.vocab_size, (batch, s * latent + 1),
                                                        generator=generator), s)
            if s == 1:
                tokens, labels = tokens.squeeze(-1), labels.squeeze(-1)
            labels[0, 3] = -100
            tokens, labels = tokens.cuda(), labels.cuda()
            per_position = model(tokens, positions, None, labels=labels)
            if labels.dim() == 2:
                per_position = per_position * (labels >= 0)
            loss = per_position.sum() / num_valid_targets(labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        trajectories.append(losses)
    for step, (a, b) in enumerate(zip(*trajectories)):
        assert abs(a - b) <= 1e-4 * abs(a), (step, a, b)
    assert not loss_kernels._COMPILE_FAILED, loss_kernels._COMPILE_FAILED

"""The fast step without Transformer Engine on one CUDA GPU (``pytest -m gpu``; tools/gpu_check.sh):
torch SDPA attention runs a fused kernel (never the math fallback) and matches megatron-core's
attention, a call no fused kernel takes is a one-line error, torch's AdamW stays fused after a real
checkpoint save and resume, the gradient norm reads the device once per step, and megatron-core's
compiled SwiGLU and bias-dropout-add are on by default and give the unfused losses and gradients."""

import dataclasses
import warnings

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m gpu on a GPU machine)"),
    pytest.mark.timeout(600),
]


def _attention_pair(dtype):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_tst.models import preset, transformer_config
    from megatron_tst.models.sdpa_attention import SDPAttention

    arch = dataclasses.replace(preset("tiny"), num_attention_heads=8, num_query_groups=2, kv_channels=64,
                               hidden_size=512)
    config = transformer_config(arch, transformer_impl="local", bf16=dtype == torch.bfloat16)
    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return DotProductAttention(**kwargs).cuda(), SDPAttention(**kwargs).cuda()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sdpa_runs_a_fused_kernel_and_matches_dot_product_attention(single_rank, dtype):
    reference, ours = _attention_pair(dtype)
    generator = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(256, 2, 8, 64, device="cuda", generator=generator).to(dtype).requires_grad_()
    k = torch.randn(256, 2, 2, 64, device="cuda", generator=generator).to(dtype).requires_grad_()
    v = torch.randn(256, 2, 2, 64, device="cuda", generator=generator).to(dtype).requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        got = ours(q, k, v, None)
        got.float().square().sum().backward()
    kernels = " ".join(e.key.lower() for e in prof.key_averages())
    assert any(name in kernels for name in ("flash", "fmha", "efficient", "cudnn")), kernels[:2000]
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    want = reference(q, k, v, None)
    want.float().square().sum().backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3  # fused kernels reorder sums; TF32 may be on
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g.float(), t.grad.float(), rtol=tol, atol=tol * 4)


def test_no_fused_kernel_is_a_one_line_error(single_rank):
    _, ours = _attention_pair(torch.float32)
    q = torch.randn(16, 1, 8, 64, device="cuda", dtype=torch.float64)  # no fused kernel takes fp64
    k = torch.randn(16, 1, 2, 64, device="cuda", dtype=torch.float64)
    with pytest.raises(ValueError, match="no fused CUDA attention kernel") as error:
        ours(q, k, k.clone(), None)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("distributed", [False, True], ids=["optimizer", "distributed-optimizer"])
def test_adamw_stays_fused_after_save_and_resume(single_rank, tmp_path, distributed):
    from megatron.core.utils import unwrap_model

    from megatron_tst import checkpointing
    from megatron_tst.arguments import parse_args
    from megatron_tst.optimizer import is_fused, torch_adams
    from megatron_tst.pretrain import build_model, build_optimizer

    argv = ["--model-preset", "tiny", "--seq-length", "32", "--bf16", "--attention-backend", "flash"]
    config = parse_args(argv + (["--use-distributed-optimizer"] if distributed else []))
    arch = config.model.architecture()

    def built():
        chunks, model_config = build_model(config, arch, None)
        optimizer, scheduler = build_optimizer(config, chunks, model_config)
        return chunks, optimizer, scheduler

    def step(chunks, optimizer):
        tokens = torch.randint(0, arch.vocab_size, (2, 33), device="cuda")
        chunks[0].zero_grad_buffer()
        optimizer.zero_grad()
        chunks[0](tokens[:, :-1], torch.arange(32, device="cuda").expand(2, 32), None,
                  labels=tokens[:, 1:]).float().sum().backward()
        chunks[0].finish_grad_sync()
        assert optimizer.step()[0]

    chunks, optimizer, scheduler = built()
    assert is_fused(optimizer)
    step(chunks, optimizer)
    checkpointing.save(str(tmp_path), 1, unwrap_model(chunks), optimizer, scheduler, {}, {})
    chunks, optimizer, scheduler = built()
    checkpointing.load(str(tmp_path), unwrap_model(chunks), optimizer, scheduler)
    assert is_fused(optimizer)
    step(chunks, optimizer)  # a fused step with the loaded state
    steps = [s["step"] for a in torch_adams(optimizer) for s in a.state.values() if "step" in s]
    assert steps and all(s.is_cuda and float(s) == 2 for s in steps)


def test_gradient_norm_reads_the_device_once(single_rank):
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32

    from megatron_tst.arguments import parse_args
    from megatron_tst.pretrain import build_model, build_optimizer

    config = parse_args(["--model-preset", "tiny", "--seq-length", "32"])
    arch = config.model.architecture()
    chunks, model_config = build_model(config, arch, None)
    optimizer, _ = build_optimizer(config, chunks, model_config)
    for p in chunks[0].module.parameters():
        p.main_grad.normal_()

    def syncs(fn):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                value = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return value, sum("synchroniz" in str(w.message) for w in caught)

    ours, our_syncs = syncs(optimizer.get_grad_norm)
    inner = optimizer.chained_optimizers[0]
    theirs, their_syncs = syncs(lambda: get_grad_norm_fp32(inner.get_main_grads_for_grad_norm(),
                                                           grad_stats_parallel_group=inner.get_grad_stats_parallel_group()))
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert our_syncs <= 2 < their_syncs  # ours: the one .item() (and the all-reduce's); theirs: one per tensor


def test_compiled_fusions_are_on_by_default_and_equal_unfused():
    from tests.test_fusions import ARGV, GPT_WITH_BIASES, _loss_and_grads

    for shape in (ARGV, GPT_WITH_BIASES):
        loss, grads, nodes, fused = _loss_and_grads(shape)
        assert fused == (True, True, False), fused  # RoPE fusion: TE's kernel only
        assert "SiluBackward0" not in nodes and "CompiledFunctionBackward" in nodes
        plain_loss, plain_grads, plain_nodes, fused = _loss_and_grads(
            shape + ["--no-bias-swiglu-fusion", "--no-bias-dropout-fusion"])
        assert fused == (False, False, False) and "CompiledFunctionBackward" not in plain_nodes
        torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-5)
        for name, grad in plain_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")

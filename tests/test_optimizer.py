"""torch's fused AdamW, the one-read gradient norm and the in-place foreach clipping under megatron-core's optimizer
(megatron_tst/optimizer.py) against megatron-core's optimizer as get_megatron_optimizer builds it:
the same updates and norms over several clipped steps, dense (one inner optimizer) and MoE (a
dense and an expert optimizer), and still fused after a state load. The CUDA-only part (fused
after a real save and resume, no host read per tensor) is in tests/test_gpu.py."""


import pytest
import torch

from megatron_tst import parallel
from megatron_tst.arguments import parse_args
from megatron_tst.optimizer import ForeachNormChainedOptimizer, is_fused, torch_adams
from megatron_tst.pretrain import build_model, build_optimizer, build_scheduler, megatron_optimizer
from tests.conftest import clear_te_attention_variables


def _steps(preset, fast, steps=4):
    config = parse_args(["--model-preset", preset, "--seq-length", "16", "--lr", "1e-2", "--clip-grad", "0.5",
                         "--weight-decay", "0.1", "--tie-embeddings-and-output-weights"])
    parallel.initialize(seed=3)
    clear_te_attention_variables()
    arch = config.model.architecture()
    chunks, model_config = build_model(config, arch, None)
    if fast:
        optimizer, _ = build_optimizer(config, chunks, model_config)
    else:
        optimizer = megatron_optimizer(config, chunks, model_config)
        build_scheduler(config, optimizer)  # it sets each group's weight decay (none for norms)
    generator = torch.Generator().manual_seed(0)
    norms = []
    for _ in range(steps):
        tokens = torch.randint(0, arch.vocab_size, (2, 17), generator=generator)
        chunks[0].zero_grad_buffer()
        optimizer.zero_grad()
        loss = chunks[0](tokens[:, :-1], torch.arange(16).expand(2, 16), None, labels=tokens[:, 1:]).sum()
        loss.backward()
        chunks[0].finish_grad_sync()
        ok, norm, _ = optimizer.step()
        assert ok
        norms.append(norm)
    params = {n: p.detach().clone() for n, p in chunks[0].module.named_parameters()}
    return optimizer, norms, params


def _mark_unfused(state):
    """Every torch param group in a (nested) megatron-core optimizer state dict says fused=False."""
    if isinstance(state, list):
        for item in state:
            _mark_unfused(item)
    elif isinstance(state, dict):
        for group in state.get("param_groups", []):
            group["fused"] = False
        for key, value in state.items():
            if key != "param_groups":
                _mark_unfused(value)


@pytest.mark.parametrize("preset,inner", [("tiny", 1), ("tiny-moe", 2)])
def test_fused_adamw_and_foreach_norm_equal_megatron_core(preset, inner):
    fast, fast_norms, fast_params = _steps(preset, fast=True)
    plain, plain_norms, plain_params = _steps(preset, fast=False)
    parallel.shutdown()
    assert isinstance(fast, ForeachNormChainedOptimizer) and len(fast.chained_optimizers) == inner
    assert is_fused(fast) and not is_fused(plain)
    assert all(n > 0.5 for n in plain_norms)  # every step clipped: the norm decides the update
    assert fast_norms == pytest.approx(plain_norms, rel=1e-6)
    for name, value in plain_params.items():  # Adam divides by sqrt(v): a near-zero gradient's
        # rounding can move its update by ~1e-4 of lr (1e-2); a wrong update is of order lr
        torch.testing.assert_close(fast_params[name], value, rtol=1e-5, atol=5e-6, msg=name)
    # a state whose groups say unfused (a checkpoint from elsewhere) loads fused
    state = fast.state_dict()
    _mark_unfused(state)
    fast.load_state_dict(state)
    assert is_fused(fast)
    steps = [s["step"] for a in torch_adams(fast) for s in a.state.values()]
    assert steps and all(s.dtype == torch.float32 and float(s) == 4 for s in steps)

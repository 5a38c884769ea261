"""megatron-core's torch-only fusions through Megatron-LM's flags: --cross-entropy-loss-fusion
reaches the model's config and its next-token loss equals the unfused one; the compiled SwiGLU and
bias-dropout-add (--bias-swiglu-fusion, --bias-dropout-fusion on a CPU) run and equal the unfused
losses and gradients; the TE-only settings are refused in one line without Transformer Engine."""

import pytest
import torch

from megatron_tst import device, parallel
from megatron_tst.arguments import parse_args
from megatron_tst.pretrain import build_model, main
from tests.conftest import clear_te_attention_variables

ARGV = ["--model-preset", "tiny", "--seq-length", "16"]


def test_cross_entropy_loss_fusion_flag_builds_megatron_cores_fused_loss(single_rank, capsys):
    losses = {}
    for flags in ([], ["--cross-entropy-loss-fusion"]):
        config = parse_args(ARGV + flags)
        parallel.initialize(seed=3)
        clear_te_attention_variables()
        chunks, model_config = build_model(config, config.model.architecture(), None)
        assert model_config.cross_entropy_loss_fusion == bool(flags)
        assert model_config.cross_entropy_fusion_impl == "native"
        # the compiled fusions: on by default on a GPU, off on a CPU; RoPE's is TE's kernel only
        assert model_config.bias_activation_fusion == model_config.bias_dropout_fusion == torch.cuda.is_available()
        assert not model_config.apply_rope_fusion
        tokens = torch.randint(0, 500, (2, 17), generator=torch.Generator().manual_seed(0))
        # megatron-core compiles the fused loss with torch.compile; eager here keeps the test short
        # (the same arithmetic: the compiled kernel is megatron-core's business)
        with torch._dynamo.config.patch(disable=True):
            losses[bool(flags)] = chunks[0](tokens[:, :-1], torch.arange(16).expand(2, 16), None,
                                            labels=tokens[:, 1:]).detach()
    torch.testing.assert_close(losses[True], losses[False], rtol=0, atol=2e-6)
    assert main(ARGV + ["--cross-entropy-fusion-impl", "te"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: --cross-entropy-fusion-impl te needs Transformer Engine, which is not installed; "
                   "use --cross-entropy-fusion-impl native")
    assert main(ARGV + ["--cross-entropy-fusion-impl", "apex"]) == 1
    assert "is not one of native, te" in capsys.readouterr().err


# Megatron-LM's GPT (no preset): biases, so the fused kernels' bias paths run too
GPT = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--vocab-size", "512",
       "--max-position-embeddings", "32", "--hidden-dropout", "0", "--attention-dropout", "0", "--seq-length", "16"]
GPT_WITH_BIASES = GPT + ["--swiglu"]


def _autograd_nodes(tensor) -> set[str]:
    seen, names, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def _loss_and_grads(argv):
    config = parse_args(argv)
    parallel.initialize(seed=3)
    clear_te_attention_variables()
    chunks, model_config = build_model(config, config.model.architecture(), None)
    tokens = torch.randint(0, 500, (2, 17), generator=torch.Generator().manual_seed(0)).to(device.current())
    positions = torch.arange(16, device=tokens.device).expand(2, 16)
    losses = chunks[0](tokens[:, :-1], positions, None, labels=tokens[:, 1:])
    losses.sum().backward()
    grads = {name: p.main_grad.clone() for name, p in chunks[0].module.named_parameters()}
    parallel.shutdown()
    fused = (model_config.bias_activation_fusion, model_config.bias_dropout_fusion, model_config.apply_rope_fusion)
    return losses.detach(), grads, _autograd_nodes(losses), fused


@pytest.mark.parametrize("shape", [ARGV, GPT_WITH_BIASES], ids=["tiny-llama", "gpt-with-biases"])
def test_compiled_swiglu_and_bias_dropout_add_equal_unfused(shape):
    """megatron-core's torch.compile fusions without TE (--bias-swiglu-fusion, --bias-dropout-fusion,
    on a CPU only when asked for) are what runs, and give the unfused losses and gradients."""
    plain_loss, plain_grads, plain_nodes, fused = _loss_and_grads(
        shape + ["--no-bias-swiglu-fusion", "--no-bias-dropout-fusion"])
    assert fused == (False, False, False)
    assert "SiluBackward0" in plain_nodes and "CompiledFunctionBackward" not in plain_nodes
    swiglu = "BiasSwiGLUFunctionBackward" if shape is GPT_WITH_BIASES else "SwiGLUFunctionBackward"
    for flags, fused_node in ((["--bias-swiglu-fusion", "--no-bias-dropout-fusion"], swiglu),
                              (["--bias-dropout-fusion", "--no-bias-swiglu-fusion"], "CompiledFunctionBackward")):
        loss, grads, nodes, fused = _loss_and_grads(shape + flags)
        assert fused == ("--bias-swiglu-fusion" in flags, "--bias-dropout-fusion" in flags, False)
        assert fused_node in nodes and (("SiluBackward0" in nodes) == (fused_node != swiglu)), flags
        torch.testing.assert_close(loss, plain_loss, rtol=0, atol=2e-6)
        for name, grad in plain_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{flags}: {name}: {m}")


def test_fusion_flags_refused_or_resolved(capsys):
    from megatron_tst.arguments import activation_fusion

    assert main(ARGV + ["--bias-swiglu-fusion", "--no-bias-swiglu-fusion"]) == 1
    assert capsys.readouterr().err.strip() == ("error: --bias-swiglu-fusion and --no-bias-swiglu-fusion contradict "
                                               "each other; give one")
    gelu = parse_args(GPT).model.architecture()
    assert not gelu.swiglu and gelu.add_bias_linear
    # megatron-core fuses GeLU only after a bias (its config refuses it otherwise), as Megatron-LM
    assert activation_fusion(gelu, False, True) and not activation_fusion(gelu, True, False)
    assert not activation_fusion(parse_args(GPT + ["--disable-bias-linear"]).model.architecture(), True, True)

"""Transformer Engine paths: they need TE and a CUDA GPU, and skip cleanly where either is missing."""

import math

import pytest
import torch

pytestmark = pytest.mark.gpu
pytest.importorskip("transformer_engine", reason="Transformer Engine is not installed")
if not torch.cuda.is_available():
    pytest.skip("Transformer Engine needs a CUDA GPU", allow_module_level=True)

from megatron_tst.models import build_gpt_model, preset, transformer_config  # noqa: E402
from megatron_tst.tst import num_valid_targets, split_sample  # noqa: E402


@pytest.mark.parametrize("arch_name", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("fp8_format", [None, "hybrid"])
def test_tst_step_with_the_transformer_engine_spec(single_rank, arch_name, fp8_format):
    if fp8_format and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9 or newer")
    arch = preset(arch_name, hidden_size=128, ffn_hidden_size=256, moe_ffn_hidden_size=128)
    config = transformer_config(arch, bf16=True, transformer_impl="transformer_engine", fp8_format=fp8_format)
    model = build_gpt_model(arch, config).cuda()
    raw = torch.randint(0, arch.vocab_size, (2, 6 * 32 + 1), device="cuda")
    tokens, labels = split_sample(raw, 6)
    positions = torch.arange(32, device="cuda").expand(2, 32)
    loss = model(tokens, positions, None, labels=labels).sum() / num_valid_targets(labels)
    loss.backward()
    assert abs(loss.item() - math.log(arch.vocab_size)) < 0.5
    assert model.embedding.word_embeddings.weight.grad.abs().sum() > 0

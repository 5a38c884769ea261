"""megatron-core's torch-only fusions through Megatron-LM's flags: --cross-entropy-loss-fusion
reaches the model's config and its next-token loss equals the unfused one; the TE-only settings
are refused in one line without Transformer Engine."""

import torch

from megatron_tst import parallel
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
        assert not model_config.bias_activation_fusion and not model_config.apply_rope_fusion  # no TE here
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

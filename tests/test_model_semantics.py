"""What the built models compute and hold, checked independently of the code under test.

- Phase-1 per-position losses: position j's input is the mean embedding of raw tokens
  x_{js}..x_{js+s-1} and its loss is sum_i t_i * -log softmax(z_j)[x_{(j+1)s+i}] over the targets
  that exist (x_{sL} is the last raw token). The expected values are built from the raw sample with
  plain indexing and the model's own decoder fed that input directly, bypassing the fold, the bag
  embedding and the fused loss.
- Parameter counts of the built tiny and tiny-moe models against ``parameter_counts``.
- MoE router losses (load balancing and z-loss) weigh the same against the loss per latent position
  in phase 1 as against the loss per token in phase 2.
"""

import pytest
import torch

from megatron_tst.models import build_gpt_model, preset, transformer_config
from megatron_tst.tst import bag_weights, split_sample

BAG, LATENT, BATCH = 4, 16, 2
FP32_RTOL = 1e-5  # the model and the fused kernel run in fp32; the reference is fp64 on the same logits


def _model(arch, weighting="uniform", seed=7):
    torch.default_generator.manual_seed(seed)
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(seed)
    return build_gpt_model(arch, transformer_config(arch), loss_weighting=weighting)


@pytest.mark.parametrize("weighting", ["uniform", "power", [0.0, 1.0, 3.0, 0.5]])
def test_phase1_per_position_losses_are_next_bag_neg_log_softmax(single_rank, weighting):
    arch = preset("tiny")
    model = _model(arch, weighting)
    generator = torch.Generator().manual_seed(2)
    raw = torch.randint(0, arch.vocab_size, (BATCH, BAG * LATENT + 1), generator=generator)
    raw[0, 5 * BAG:6 * BAG] = raw[0, 5 * BAG]  # a bag of one repeated token (input of position 5)
    raw[1, 3 * BAG:4 * BAG] = raw[1, 3 * BAG]  # ... and a target bag of one (position 2's targets)
    positions = torch.arange(LATENT).unsqueeze(0).expand(BATCH, LATENT)

    tokens, labels = split_sample(raw, BAG)
    with torch.no_grad():
        losses = model(tokens, positions, None, labels=labels)  # (b, L), the production path

        # independently: mean input embeddings from the raw sample, the decoder fed them directly
        table = model.embedding.word_embeddings.weight
        inputs = torch.stack([table[raw[:, j * BAG:(j + 1) * BAG]].double().mean(dim=1) for j in range(LATENT)])
        logits = model(None, positions, None, decoder_input=inputs.float())  # (b, L, V)
        log_probs = torch.log_softmax(logits.double(), dim=-1)

    weights = bag_weights(BAG, weighting)
    scaled = [w * BAG / sum(weights) for w in weights]  # the slot weights averaging 1 (training's t_i)
    expected = torch.zeros(BATCH, LATENT, dtype=torch.float64)
    for b in range(BATCH):
        for j in range(LATENT):
            for i in range(BAG):
                k = (j + 1) * BAG + i  # slot i of position j targets raw token x_k, if it exists
                if k <= BAG * LATENT:
                    expected[b, j] += scaled[i] * -log_probs[b, j, raw[b, k]]
    assert losses.shape == (BATCH, LATENT)
    assert torch.allclose(losses.double(), expected, rtol=FP32_RTOL, atol=0), (losses.double() - expected).abs().max()


def _expert_parameters(model):
    return sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_built_models_have_the_parameter_counts_of_their_preset(single_rank, name):
    arch = preset(name)
    model = _model(arch)
    built = sum(p.numel() for p in model.parameters())
    counts = arch.parameter_counts()
    assert built == counts["total"]
    if arch.num_experts:  # a token passes through top-k of the experts of each layer
        inactive = _expert_parameters(model) * (arch.num_experts - arch.moe_router_topk) // arch.num_experts
        assert built - inactive == counts["active"]
    else:
        assert counts["active"] == counts["total"]



@pytest.mark.parametrize("shape", ["full", "input-only", "next-token"])
def test_router_losses_weigh_the_same_per_position_in_both_phases(single_rank, shape):
    """megatron-core's contract under calculate_per_token_loss: a router loss enters the backward as
    coefficient x loss x positions routed, then every gradient is divided by the training loss's
    token count, the valid targets (s per latent position in phase 1, one per position for
    input-only and next-token batches). Whatever the batch, the router losses' gradient after that
    division must be the one of an unlabelled forward (coefficients as configured) over the positions:
    the same weight against the loss per position as in next-token training. Planted (coefficients
    not scaled by the targets per position): full fails by a factor s."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    arch = preset("tiny-moe", moe_aux_loss_coeff=1e-2)
    torch.default_generator.manual_seed(3)
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(3)
    model = build_gpt_model(arch, transformer_config(arch, moe_z_loss_coeff=1e-3, calculate_per_token_loss=True))
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    generator = torch.Generator().manual_seed(4)
    bag = {"full": BAG, "input-only": BAG, "next-token": 1}[shape]
    tokens = torch.randint(0, arch.vocab_size, (BATCH, LATENT, bag) if bag > 1 else (BATCH, LATENT), generator=generator)
    targets = {"full": BAG, "input-only": 1, "next-token": None}[shape]
    labels = torch.randint(0, arch.vocab_size, (BATCH, LATENT, targets) if targets else (BATCH, LATENT),
                           generator=generator)  # no ignored targets: count = targets x positions
    positions = torch.arange(LATENT).unsqueeze(0).expand(BATCH, LATENT)

    def router_loss_gradients(**forward):
        model.zero_grad(set_to_none=True)
        output = model(tokens, positions, None, **forward)
        (0.0 * output.sum()).backward()  # only the router losses' own backward carries a gradient
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    training = router_loss_gradients(labels=labels)
    reference = router_loss_gradients()  # logits, no labels: the coefficients as configured
    count, positions_routed = (labels >= 0).sum().item(), BATCH * LATENT
    assert sorted(training) == sorted(reference)
    reached = set()
    for name, expected in reference.items():
        expected = expected / positions_routed
        got = training[name] / count
        scale = expected.abs().max()  # 0 for the experts' weights: routing losses see only the router's probabilities
        assert (got - expected).abs().max() <= 1e-5 * scale, (name, (got / expected).nanmean().item())
        reached.update(kind for kind in ("router", "self_attention", "embedding") if kind in name and scale > 0)
    assert reached == {"router", "self_attention", "embedding"}

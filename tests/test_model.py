"""TSTGPTModel on one process: s=1 is a plain GPTModel bit for bit; same state dict; bag embedding."""

import re

import pytest
import torch
from megatron.core.models.gpt import GPTModel

from megatron_tst.models import build_gpt_model, preset, transformer_config
from megatron_tst.tst import IGNORE_INDEX, TSTGPTModel, mask_labels, num_valid_targets, split_sample

ARCH = preset("tiny")


def _model(tst, seed=7, arch=ARCH, **config):
    torch.default_generator.manual_seed(seed)
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(seed)
    return build_gpt_model(arch, transformer_config(arch, **config), tst=tst)


def _positions(batch, length):
    return torch.arange(length).unsqueeze(0).expand(batch, length)


def test_s1_through_the_tst_path_is_bit_identical_to_plain_gptmodel(single_rank):
    plain, tst = _model(tst=False), _model(tst=True)
    assert isinstance(tst, TSTGPTModel) and type(plain) is GPTModel
    for (name, p), (_, q) in zip(plain.state_dict().items(), tst.state_dict().items()):
        assert (p is None and q is None) or torch.equal(p, q), name  # None: megatron's _extra_state

    generator = torch.Generator().manual_seed(0)
    raw = torch.randint(0, ARCH.vocab_size, (2, 33), generator=generator)
    loss_mask = torch.ones(2, 32)
    loss_mask[1, 5:9] = 0  # masked tokens must behave the same on both paths

    tokens, labels = raw[:, :-1], raw[:, 1:]
    plain_losses = plain(tokens, _positions(2, 32), None, labels=labels)
    plain_loss = (plain_losses * loss_mask).sum() / loss_mask.sum()
    plain_loss.backward()

    bag_tokens, bag_labels = split_sample(raw, 1)
    bag_labels = mask_labels(bag_labels, loss_mask)
    tst_losses = tst(bag_tokens, _positions(2, 32), None, labels=bag_labels)
    tst_loss = tst_losses.sum() / num_valid_targets(bag_labels)
    tst_loss.backward()

    assert torch.equal(tst_losses * loss_mask, plain_losses * loss_mask)
    assert torch.equal(tst_loss, plain_loss)
    for (name, p), (_, q) in zip(plain.named_parameters(), tst.named_parameters()):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("arch_name", ["tiny", "tiny-moe"])
def test_state_dict_is_exactly_a_plain_gptmodel(single_rank, arch_name):
    arch = preset(arch_name)
    plain, tst = _model(False, arch=arch), _model(True, arch=arch)
    plain_state, tst_state = plain.state_dict(), tst.state_dict()
    assert list(plain_state) == list(tst_state)
    assert all(getattr(plain_state[k], "shape", None) == getattr(tst_state[k], "shape", None)
               for k in plain_state)
    assert [n for n, _ in plain.named_buffers()] == [n for n, _ in tst.named_buffers()]
    # and a TST (phase-1) state loads strictly into a plain GPTModel for phase 2
    plain.load_state_dict(tst_state, strict=True)
    plain_sharded = plain.sharded_state_dict()
    tst_sharded = tst.sharded_state_dict()
    assert sorted(plain_sharded) == sorted(tst_sharded)


@pytest.mark.parametrize("bf16", [False, True])
def test_bag_embedding_is_the_fp32_mean_cast_back(single_rank, bf16):
    model = _model(True, bf16=bf16)
    if bf16:
        model = model.bfloat16()
    table = model.embedding.word_embeddings.weight
    generator = torch.Generator().manual_seed(1)
    bags = torch.randint(0, ARCH.vocab_size, (2, 8, 6), generator=generator)
    bags[0, 0] = bags[0, 0, 0]  # one bag of six copies of a token
    embedded = model.embedding(bags, _positions(2, 8))  # [L, b, h]
    expected = sum(table[bags[..., i]].float() for i in range(6)) / 6
    assert embedded.dtype == table.dtype
    assert torch.equal(embedded, expected.to(table.dtype).transpose(0, 1))
    # six copies of a token average back to (within fp32 rounding of 6x/6) the token itself
    assert torch.allclose(embedded[0, 0].float(), table[bags[0, 0, 0]].float(), rtol=2**-20, atol=0)


def test_phase1_loss_at_init_is_about_log_vocab(single_rank):
    model = _model(True)
    raw = torch.randint(0, ARCH.vocab_size, (4, 6 * 16 + 1))
    tokens, labels = split_sample(raw, 6)
    loss = model(tokens, _positions(4, 16), None, labels=labels).sum() / num_valid_targets(labels)
    assert abs(loss.item() - torch.log(torch.tensor(float(ARCH.vocab_size))).item()) < 0.3


@pytest.mark.parametrize("mode", ["input-only", "output-only"])
def test_ablation_modes_run_and_train_the_right_targets(single_rank, mode):
    model = _model(True)
    raw = torch.randint(0, ARCH.vocab_size, (2, 4 * 8 + 1 if mode == "input-only" else 9))
    tokens, labels = split_sample(raw, 4, mode=mode)
    losses = model(tokens, _positions(2, 8), None, labels=labels)
    assert losses.shape == (2, 8)
    if mode == "output-only":  # position t keeps min(s, L - t) targets
        assert (labels[0] >= 0).sum(-1).tolist() == [4, 4, 4, 4, 4, 3, 2, 1]
    (losses.sum() / num_valid_targets(labels)).backward()


def test_token_rank_is_checked(single_rank):
    model = _model(True)
    with pytest.raises(ValueError, match=re.escape("token ids must be (batch, L) or (batch, L, s); got shape (2, 4, 2, 2)")):
        model(torch.zeros(2, 4, 2, 2, dtype=torch.long), _positions(2, 4), None)
    with pytest.raises(ValueError, match=re.escape("labels must be (batch, L) or (batch, L, s); got shape (2, 4, 1, 1)")):
        model(torch.zeros(2, 4, dtype=torch.long), _positions(2, 4), None,
              labels=torch.zeros(2, 4, 1, 1, dtype=torch.long))


def test_transformer_engine_is_optional():
    from megatron_tst.models import transformer_engine_available

    if transformer_engine_available():
        pytest.skip("Transformer Engine is installed; tests/test_te.py covers it")
    with pytest.raises(ValueError, match="needs Transformer Engine, which is not installed"):
        transformer_config(ARCH, transformer_impl="transformer_engine")
    with pytest.raises(ValueError, match="FP8 \\(hybrid\\) needs transformer_impl='transformer_engine'"):
        transformer_config(ARCH, fp8_format="hybrid")


def test_presets_have_the_paper_shapes():
    counts = {name: preset(name).parameter_counts() for name in ("270M", "600M", "3B", "10B-A1B")}
    assert 240e6 < counts["270M"]["total"] < 280e6
    assert 540e6 < counts["600M"]["total"] < 600e6
    assert 3.0e9 < counts["3B"]["total"] < 3.4e9
    assert 9.5e9 < counts["10B-A1B"]["total"] < 10.5e9 and 0.9e9 < counts["10B-A1B"]["active"] < 1.3e9
    with pytest.raises(ValueError, match="unknown model preset '1T'"):
        preset("1T")

"""torch SDPA core attention (``--attention-backend flash``, ``auto`` without Transformer Engine)
against megatron-core's own ``DotProductAttention``.

- The core attention alone, fp32 and fp64, MHA and GQA, causal and an explicit mask: outputs and
  q/k/v gradients; at TP=2 the whole tiny model (heads per rank through the layer spec, also with
  fewer key/value groups than ranks). Sequence parallelism is not tested: megatron-core's local
  spec cannot run it (its torch RMSNorm; ``check_environment`` refuses it), with either attention.
- The flag builds what it names, and the bad settings are refused in one line.
- Whole runs (slow): 20 steps of tiny GPT and tiny MoE, TST phase 1 then 2, SDPA and local from the
  same seed agree to 1e-5; a checkpoint written with one continues with the other. PP=2 against
  PP=1 and TP=2 against TP=1 run with the default ``auto``, i.e. SDPA here (tests/test_parallel.py).
"""

import dataclasses

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_tst import parallel
from megatron_tst.arguments import PretrainConfig, check_attention_backend, parse_args
from megatron_tst.models import build_gpt_model, preset, transformer_config
from megatron_tst.models.sdpa_attention import SDPAttention, core_attention_kind
from megatron_tst.pretrain import main
from tests.conftest import clear_te_attention_variables
from tests.distributed import run_distributed

ARCH = preset("tiny")  # 4 heads, 2 key/value groups, head dim 16


def _core_pair(config):
    kwargs = dict(config=config, layer_number=2, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return DotProductAttention(**kwargs), SDPAttention(**kwargs)


def _inputs(dtype, heads, groups, seq=12, batch=2, head_dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(seq, batch, heads, head_dim, generator=generator, dtype=torch.float64)
    k = torch.randn(seq, batch, groups, head_dim, generator=generator, dtype=torch.float64)
    v = torch.randn(seq, batch, groups, head_dim, generator=generator, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def _run(module, inputs, mask=None):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = module(*inputs, mask)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape))
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("groups", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_sdpa_core_attention_equals_dot_product_attention(single_rank, dtype, tol, groups):
    config = transformer_config(dataclasses.replace(ARCH, num_query_groups=groups),
                                apply_query_key_layer_scaling=True)  # the scale megatron-core ends with
    reference, ours = _core_pair(config)
    inputs = _inputs(dtype, 4, groups)
    causal = torch.triu(torch.ones(12, 12, dtype=torch.bool), diagonal=1)[None, None]
    banded = causal | torch.tril(torch.ones(12, 12, dtype=torch.bool), diagonal=-4)[None, None]
    for mask in (None, causal, banded):  # the causal default; megatron's boolean masks (True = masked)
        want, want_grads = _run(reference, inputs, mask)
        got, got_grads = _run(ours, inputs, mask)
        assert got.shape == want.shape == (12, 2, 4 * 16) and got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=0, atol=tol)
        for name, g, w in zip("qkv", got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=0, atol=tol * 4, msg=f"d{name}")


def test_sdpa_dropout_only_in_training(single_rank):
    config = transformer_config(ARCH, attention_dropout=0.5)
    reference, ours = _core_pair(config)
    inputs = [t.detach() for t in _inputs(torch.float32, 4, 2)]
    reference.eval(), ours.eval()
    torch.testing.assert_close(ours(*inputs, None), reference(*inputs, None), rtol=0, atol=2e-6)
    ours.train()
    assert not torch.allclose(ours(*inputs, None), reference(*inputs, None), atol=1e-2)


def test_attention_backend_builds_what_it_names(single_rank):
    def core(backend):
        clear_te_attention_variables()
        model = build_gpt_model(ARCH, transformer_config(ARCH, attention_backend=backend), tst=False)
        return type(model.decoder.layers[0].self_attention.core_attention)

    assert core("auto") is SDPAttention  # no Transformer Engine here: auto is ours
    assert core("flash") is SDPAttention
    assert core("local") is DotProductAttention and core("unfused") is DotProductAttention
    assert parse_args(["--model-preset", "tiny", "--seq-length", "64"]).model.attention_backend == "auto"
    assert core_attention_kind("auto", "transformer_engine") == "te"
    assert core_attention_kind("flash", "transformer_engine") == "te"
    # a checkpoint does not see the choice: neither attention has parameters or state
    keys = {}
    for backend in ("flash", "local"):
        clear_te_attention_variables()
        keys[backend] = set(build_gpt_model(ARCH, transformer_config(ARCH, attention_backend=backend), tst=False).state_dict())
    assert keys["flash"] == keys["local"]


def test_attention_backend_bad_settings_are_one_line_errors(single_rank, capsys):
    with pytest.raises(ValueError, match="--attention-backend fused is Transformer Engine's"):
        transformer_config(ARCH, attention_backend="fused")
    with pytest.raises(ValueError, match="--attention-backend local needs --transformer-impl local"):
        core_attention_kind("local", "transformer_engine")
    with pytest.raises(ValueError, match="sliding window"):
        transformer_config(ARCH, attention_backend="flash", window_size=(8, 0))
    with pytest.raises(ValueError, match="not one of"):
        transformer_config(ARCH, attention_backend="sdpa")
    with pytest.raises(ValueError, match="takes causal or unmasked attention, not padding"):
        SDPAttention(transformer_config(ARCH), 1, AttnMaskType.padding, "self")
    config = PretrainConfig()
    config.model.model_preset, config.parallel.context_parallel_size = "tiny", 2
    for backend in ("auto", "flash"):
        config.model.attention_backend = backend
        with pytest.raises(ValueError, match=f"--attention-backend {backend} .*context parallelism"):
            check_attention_backend(config)
    config.model.attention_backend = "local"
    check_attention_backend(config)  # DotProductAttention's own limits are megatron-core's business
    # through the entry: one line on stderr, before any process group
    for flag, message in (("sdpa", "is not one of"), ("fused", "fused is Transformer Engine's")):
        assert main(["--model-preset", "tiny", "--seq-length", "64", "--attention-backend", flag]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err


def _tp2_model_worker(rank, world_size):
    return {groups: _tp_model_pair(world_size, groups) for groups in (2, 1)}


def _tp_model_pair(world_size, groups):
    arch = dataclasses.replace(ARCH, num_query_groups=groups)
    tokens = torch.randint(0, arch.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(16).expand(2, 16)
    results = {}
    for backend in ("local", "flash"):
        parallel.initialize(tensor_model_parallel_size=world_size, seed=7)  # the same weights for both
        clear_te_attention_variables()
        model = build_gpt_model(arch, transformer_config(arch, tensor_model_parallel_size=world_size,
                                                         attention_backend=backend), tst=False)
        logits = model(tokens, positions, None)
        (logits.double() * torch.linspace(-1, 1, logits.shape[-1], dtype=torch.float64)).sum().backward()
        results[backend] = dict(logits=logits.detach(), grads={n: p.grad.clone() for n, p in model.named_parameters()})
    return results


@pytest.mark.slow
def test_tensor_parallel_2_sdpa_equals_local_model():
    # one group per rank; and fewer groups than ranks (megatron-core repeats them)
    for per_rank in run_distributed(_tp2_model_worker, 2):
        for groups, result in per_rank.items():
            torch.testing.assert_close(result["flash"]["logits"], result["local"]["logits"], rtol=0, atol=2e-5)
            for name, grad in result["local"]["grads"].items():
                # fp32 rounding relative to the tensor's largest gradient (a wrong head split is O(1))
                torch.testing.assert_close(result["flash"]["grads"][name], grad, rtol=0,
                                           atol=2e-6 * grad.abs().max().item(), msg=f"{groups} groups: {name}")


def _runs_worker(rank, world_size, runs):
    """Several single-rank training runs one after another in one process (one start-up)."""
    from megatron_tst.pretrain import pretrain

    results = []
    for argv in runs:
        clear_te_attention_variables()
        results.append(pretrain(parse_args(argv)))
    return results


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sdpa_and_local_train_alike_and_share_checkpoints(corpus, tmp_path):
    """20 steps (TST phase 1 to step 5, then recovery) of tiny GPT and tiny MoE from the same seed:
    the losses of the two attentions agree to 1e-5, and a run saved at step 10 with SDPA continues
    with megatron-core's attention as if it had not stopped."""
    from tests.test_pretrain import args, records

    moe = ["--model-preset", "tiny-moe", "--qk-layernorm", "--untie-embeddings-and-output-weights"]
    runs, dirs = [], {}
    for model, extra in (("gpt", []), ("moe", moe)):
        for backend in ("flash", "local"):
            dirs[model, backend] = str(tmp_path / f"{model}-{backend}")
            runs.append(args(corpus, dirs[model, backend], *extra, "--attention-backend", backend, iters=20))
    mixed = str(tmp_path / "gpt-mixed")
    runs.append(args(corpus, mixed, "--attention-backend", "flash", "--exit-interval", "10", iters=20))
    runs.append(args(corpus, mixed, "--attention-backend", "local", iters=20))
    run_distributed(_runs_worker, 1, runs, timeout=540)

    for model in ("gpt", "moe"):
        flash, local = (records(dirs[model, b])[0] for b in ("flash", "local"))
        assert [r["phase"] for r in flash] == ["superposition"] * 5 + ["recovery"] * 15
        assert flash[-1]["loss"] < flash[5]["loss"]  # it learns
        assert [r["loss"] for r in flash] == pytest.approx([r["loss"] for r in local], abs=1e-5, rel=0), model
    resumed = records(mixed)[0]
    assert [r["iteration"] for r in resumed] == list(range(1, 21))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in records(dirs["gpt", "flash"])[0]],
                                                         abs=1e-5, rel=0)

"""The GPU path on one CUDA GPU (``pytest -m gpu``; ``tools/gpu_check.sh`` runs it on a bare GPU box).

Without CUDA every test here skips with the reason. The CPU references run in a subprocess with no
visible GPU (``CUDA_VISIBLE_DEVICES=``), where megatron_tst's CPU layer runs the same megatron-core.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m gpu on a GPU machine)"),
    pytest.mark.timeout(900),
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAG, LATENT, BATCH = 4, 64, 2
WEIGHTINGS = ["uniform", "power", "exp", "first", "mi", (0.5, 2.0, 0.0, 1.0)]


def _cpu_env():
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="4",
                PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


# ---- a bf16 step on the GPU against the fp32 step on the CPU --------------------------------------

def _batches(vocab):
    from megatron_tst.tst import split_sample

    generator = torch.Generator().manual_seed(3)
    raw = torch.randint(0, vocab, (BATCH, BAG * LATENT + 1), generator=generator)
    tokens, labels = split_sample(raw, BAG)
    plain = torch.randint(0, vocab, (BATCH, LATENT + 1), generator=generator)
    return {"tst": (tokens, labels), "baseline": (plain[:, :-1], plain[:, 1:])}


def _step(model, tokens, labels, device):
    """Forward + backward of one micro-batch; the loss and the embedding gradient's norm."""
    from megatron_tst.tst import num_valid_targets

    model.zero_grad()
    positions = torch.arange(LATENT, device=device).expand(BATCH, LATENT)
    losses = model(tokens.to(device), positions, None, labels=labels.to(device))
    loss = losses.float().sum() / num_valid_targets(labels.to(device))
    loss.backward()
    return loss.item(), model.embedding.word_embeddings.weight.grad.float().norm().item()


CPU_REFERENCE = """
import sys, torch
import megatron_tst
from megatron_tst import parallel
from megatron_tst.models import build_gpt_model, preset, transformer_config
from tests.test_gpu import _batches, _step
parallel.initialize(seed=7)
arch = preset("tiny", hidden_size=128, ffn_hidden_size=256)
model = build_gpt_model(arch, transformer_config(arch))
state = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
results = {name: _step(model, tokens, labels, "cpu") for name, (tokens, labels) in _batches(arch.vocab_size).items()}
torch.save({"state": state, "results": results}, sys.argv[1])
"""


def test_bf16_steps_on_the_gpu_match_fp32_steps_on_the_cpu(single_rank, tmp_path):
    """The same weights and batches: a TST phase-1 step (s=4) and a baseline step in bf16 on the GPU
    against fp32 on the CPU. Tolerance: bf16 keeps 8 significant bits, so each matmul output is
    rounded to ~0.4% relative; at initialisation the logits are small (|z| < 1) and the CE of ~6.2
    nats moves by well under 0.01 nat, and the gradient norm by about 1%. A wrong target, a lost
    term of the mean or a bf16 accumulation of the bag sum moves them by several percent."""
    from megatron_tst.models import build_gpt_model, preset, transformer_config

    path = tmp_path / "cpu.pt"
    done = subprocess.run([sys.executable, "-c", CPU_REFERENCE, str(path)], cwd=ROOT, env=_cpu_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = torch.load(path, weights_only=False)
    arch = preset("tiny", hidden_size=128, ffn_hidden_size=256)
    model = build_gpt_model(arch, transformer_config(arch, bf16=True, transformer_impl="local"))
    model = model.cuda()
    missing, unexpected = model.load_state_dict(reference["state"], strict=False)
    assert not unexpected and all(name.endswith("_extra_state") for name in missing)
    for name, (tokens, labels) in _batches(arch.vocab_size).items():
        loss, grad_norm = _step(model, tokens, labels, "cuda")
        cpu_loss, cpu_grad_norm = reference["results"][name]
        assert loss == pytest.approx(cpu_loss, abs=0.01), name
        assert grad_norm == pytest.approx(cpu_grad_norm, rel=0.03), name


# ---- the fused MCE on CUDA -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighting", WEIGHTINGS, ids=str)
def test_fused_mce_on_cuda_matches_listing_3(dtype, weighting):
    """Values and gradients against the paper's Listing 3 (``mce_loss_reference``) on the same
    (upcast) logits, with ignored targets inside the sequence; and no host synchronisation."""
    from megatron_tst.tst import (IGNORE_INDEX, fold_labels, fused_vocab_parallel_mce, listing3_target_weights,
                                  mce_loss_reference)

    generator = torch.Generator().manual_seed(1)
    vocab = 1000
    base = (torch.randn(BATCH, LATENT, vocab, generator=generator) * 4).to(dtype)
    labels = torch.randint(0, vocab, (BATCH, BAG * LATENT), generator=generator)
    labels[0, 10:14] = IGNORE_INDEX
    labels[1, 100] = IGNORE_INDEX
    bags = fold_labels(labels, BAG).cuda()
    weights = listing3_target_weights(bags, weighting)

    logits = base.cuda().requires_grad_()
    fused_vocab_parallel_mce(logits.detach().clone(), bags, weights).sum()  # warm-up: caches, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fused_vocab_parallel_mce(logits, bags, weights).sum()
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")

    reference_logits = base.double().requires_grad_()
    reference = mce_loss_reference(reference_logits, labels, weighting)
    reference.backward()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-4  # fp32 arithmetic inside either way
    assert loss.item() == pytest.approx(reference.item(), rel=tolerance)
    torch.testing.assert_close(logits.grad.double().cpu(), reference_logits.grad,
                               rtol=tolerance if dtype == torch.float32 else 1e-2, atol=1e-7 if dtype == torch.float32 else 1e-5)


def test_fused_mce_at_s_1_is_bit_identical_to_megatron_core_on_cuda(single_rank):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_tst.tst import fused_vocab_parallel_mce, mce_target_weights

    generator = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        base = (torch.randn(128, 4, 5000, generator=generator) * 10).to(dtype).cuda()
        labels = torch.randint(0, 5000, (128, 4), generator=generator).cuda()
        ours = base.clone().requires_grad_()
        theirs = base.clone().requires_grad_()
        ours_loss = fused_vocab_parallel_mce(ours, labels[..., None], mce_target_weights(labels[..., None]))
        theirs_loss = vocab_parallel_cross_entropy(theirs, labels)
        ours_loss.sum().backward()
        theirs_loss.sum().backward()
        assert torch.equal(ours_loss, theirs_loss) and torch.equal(ours.grad, theirs.grad), dtype


# ---- the two-phase launcher on one GPU ---------------------------------------------------------------

def _launch_argv(corpus, save, iters=36):
    from tests.conftest import NULL_VOCAB

    return [sys.executable, "-m", "megatron_tst.launch", "--model-preset", "tiny", "--vocab-size", str(NULL_VOCAB),
            "--tokenizer-type", "NullTokenizer", "--data-path", corpus, "--seq-length", "64",
            "--micro-batch-size", "8", "--global-batch-size", "16", "--train-iters", str(iters), "--lr", "3e-3",
            "--lr-warmup-iters", "3", "--log-interval", "1", "--eval-interval", "12", "--eval-iters", "2",
            "--bf16", "--save", save, "--save-interval", "6", "--tst-bag-size", "4", "--tst-ratio", "0.25"]


def _steps(save):
    rows = []
    for phase in ("superposition", "recovery"):
        with open(os.path.join(save, phase, "metrics.jsonl")) as handle:
            rows += [json.loads(line) for line in handle]
    return [r for r in rows if "loss" in r], [r for r in rows if "validation_loss" in r]


def test_the_two_phase_launcher_runs_and_resumes_after_sigterm_on_one_gpu(corpus, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    whole = str(tmp_path / "whole")
    done = subprocess.run(_launch_argv(corpus, whole), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps, valid = _steps(whole)
    assert [r["phase"] for r in steps] == ["superposition"] * 9 + ["recovery"] * 27
    assert steps[-1]["loss"] < steps[9]["loss"] and valid[-1]["validation_loss"] < valid[0]["validation_loss"]

    stopped = str(tmp_path / "stopped")
    process = subprocess.Popen(_launch_argv(corpus, stopped), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    for line in process.stdout:  # stop it inside recovery
        seen.append(line)
        if "iteration       20 " in line:
            os.killpg(process.pid, signal.SIGTERM)
            break
    process.communicate(timeout=300)
    saved = open(os.path.join(stopped, "recovery", "latest_checkpointed_iteration.txt")).read().strip()
    assert 20 <= int(saved) < 36, "".join(seen[-20:])
    time.sleep(1)
    again = subprocess.run(_launch_argv(corpus, stopped), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    resumed, _ = _steps(stopped)
    assert [r["iteration"] for r in resumed] == list(range(1, 37))
    # bf16 kernels on a GPU need not be bitwise reproducible; the resumed run stays on the same curve
    assert resumed[-1]["loss"] == pytest.approx(steps[-1]["loss"], abs=0.1)


# ---- Transformer Engine and FP8 through the training entry ------------------------------------------

@pytest.mark.parametrize("recipe", [None, "delayed", "tensorwise"])
def test_transformer_engine_spec_and_fp8_steps_through_pretrain(corpus, tmp_path, recipe):
    pytest.importorskip("transformer_engine", reason="Transformer Engine is not installed")
    if recipe and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9 or newer")
    from megatron_tst.arguments import parse_args
    from megatron_tst.pretrain import pretrain
    from tests.test_pretrain import args

    argv = args(corpus, str(tmp_path / "run"), "--bf16", "--transformer-impl", "transformer_engine", iters=8)
    if recipe:
        argv += ["--fp8-format", "hybrid", "--fp8-recipe", recipe]
    result = pretrain(parse_args(argv))
    from megatron_tst import parallel

    parallel.shutdown()
    assert result["iteration"] == 8 and all(map(lambda x: x == x and abs(x) < 100, result["history"]))


# ---- Megatron-LM drop-in on one GPU: --fp16, --rampup-batch-size, --num-workers, --profile (issue 21) ----

def test_fp16_ramp_workers_and_profile_on_mock_data_on_one_gpu(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    save = str(tmp_path / "run")
    argv = [sys.executable, "-m", "megatron_tst.pretrain", "--model-preset", "tiny", "--vocab-size", "511",
            "--tokenizer-type", "NullTokenizer", "--mock-data", "--seq-length", "64", "--micro-batch-size", "4",
            "--global-batch-size", "16", "--train-samples", "320", "--rampup-batch-size", "4", "4", "64",
            "--lr", "1e-3", "--log-interval", "1", "--fp16", "--initial-loss-scale", "4096", "--num-workers", "2",
            "--tst-bag-size", "4", "--tst-ratio", "0.5", "--profile", "--profile-step-start", "2",
            "--profile-step-end", "4", "--save", save]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(os.path.join(save, "metrics.jsonl")) as handle:
        rows = [row for row in map(json.loads, handle) if "loss" in row]
    assert {row["phase"] for row in rows} == {"superposition", "recovery"}
    assert all(row["loss"] == row["loss"] and abs(row["loss"]) < 100 for row in rows)  # finite
    assert any(row["grad_norm"] is not None for row in rows)  # the scale came down to one that fits fp16
    traces = [name for name in os.listdir(os.path.join(save, "profile")) if name.endswith(".pt.trace.json")]
    assert len(traces) == 1
    with open(os.path.join(save, "profile", traces[0])) as handle:
        events = json.load(handle)["traceEvents"]
    assert sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}) == \
        ["ProfilerStep#2", "ProfilerStep#3"]
    assert any(e.get("cat") == "kernel" for e in events)  # CUDA kernels recorded

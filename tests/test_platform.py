"""Each patch of the CPU platform layer (``megatron_tst/platform/cpu.py``) is needed.

For every patch id there is a scenario (``tests/platform_scenarios.py``) that passes with the whole
layer and fails when only that patch is left out (``MEGATRON_TST_CPU_SKIP=<id>``): with the error
megatron-core or torch raises at the site the patch exists for, or, for the two silent ones (M1
``mcore_rng``, M4's shared Adam ``step``), with wrong numbers. Patches are applied at import time,
so every set of left-out patches runs in a fresh process; the runs go two at a time (2 CPU cores).
Each run that ablates something other than the dense model also runs the dense forward/backward as
a control, so an ablation cannot pass by breaking the process some other way.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.platform_scenarios import RESULT_MARKER

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU platform layer does nothing with CUDA"),
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_TIMEOUT = 300  # seconds for one scenario process (two-rank runs included)
SINGLE = ["dense", "autocast", "rng_fork", "checkpoint", "recompute", "moe", "distopt"]

# run name -> (patches left out, checks); the longest first, so that two workers finish together
RUNS = {
    "full_ep2": ("", ["moe_ep2"]),
    "moe_dtoh": ("moe_dtoh", ["moe_ep2"]),
    "full": ("", SINGLE),
    "distopt_ckpt": ("distopt_ckpt", ["dense", "distopt", "distopt_without_b", "distopt_without_c"]),
    "tensor_type": ("tensor_type", ["dense", "distopt"]),
    "current_device": ("current_device", ["dense"]),
    "synchronize": ("synchronize", ["dense", "checkpoint"]),
    "rng": ("rng", ["dense"]),
    "streams": ("streams", ["dense", "moe"]),
    "amp_custom_fwd": ("amp_custom_fwd", ["dense", "autocast"]),
    "mode": ("mode", ["dense"]),
    "mcore_rng": ("mcore_rng", ["dense", "rng_fork"]),
    "te_general_gemm": ("te_general_gemm", ["dense", "moe"]),
    "recompute": ("recompute", ["dense", "recompute"]),
}

NOT_COMPILED = "AssertionError: Torch not compiled with CUDA enabled"


def _run(name: str) -> tuple[str, dict]:
    skip, checks = RUNS[name]
    env = dict(os.environ, MEGATRON_TST_CPU_SKIP=skip, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "tests.platform_scenarios", *checks]
    started = time.monotonic()
    # a session of its own, so a timeout also ends the ranks a two-process scenario spawned
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, _ = process.communicate()
        return name, {"_run": {"error": f"timed out after {RUN_TIMEOUT} s", "output": stdout[-3000:]}}
    if process.returncode != 0:
        with contextlib.suppress(ProcessLookupError):  # leftovers of a crashed run
            os.killpg(process.pid, signal.SIGKILL)
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if process.returncode != 0 or not lines:
        return name, {"_run": {"error": f"exit status {process.returncode}, no result line",
                               "output": (stdout + stderr)[-3000:]}}
    result = json.loads(lines[-1][len(RESULT_MARKER):])
    result["_seconds"] = time.monotonic() - started
    return name, result


@pytest.fixture(scope="module")
def runs():
    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        results = dict(pool.map(_run, RUNS))
    for name, result in results.items():
        assert "_run" not in result, f"scenario run {name!r} did not report: {result['_run']}"
        skip = RUNS[name][0]
        assert result["_meta"]["skipped"] == ([skip] if skip else []), result["_meta"]
    return results


def _ok(runs, run, check) -> dict:
    result = runs[run][check]
    assert result["ok"], f"{check} failed in run {run!r}: {result['error']}\n" + "\n".join(result["frames"])
    return result["values"]


def _failed(runs, run, check, error_start, *, frames=(), stage=None) -> dict:
    """The check failed with an error starting ``error_start``, raised through every frame named
    in ``frames`` (substrings of "file.py:function: source line"), at ``stage`` when given."""
    result = runs[run][check]
    assert not result["ok"], f"{check} passed without {run!r}: {result['values']}"
    assert result["error"].startswith(error_start), result["error"]
    trace = "\n".join(result["frames"])
    for frame in frames:
        assert frame in trace, f"{frame!r} not in the traceback of {result['error']!r}:\n{trace}"
    if stage is not None:
        assert result["stage"] == stage, (result["stage"], result["error"])
    return result


# ---------------------------------------------------------------------------------------------
# the whole layer


def test_full_layer_passes_every_scenario(runs):
    dense = _ok(runs, "full", "dense")
    assert math.isfinite(dense["loss"]) and abs(dense["loss"] - math.log(512)) < 0.5

    autocast = _ok(runs, "full", "autocast")
    assert autocast == {"logits_dtype": "torch.bfloat16", "weight_grad_dtype": "torch.float32", "grads_ok": True}

    assert _ok(runs, "full", "rng_fork") == {
        "fork_switches_stream": True, "default_stream_restored": True, "tracker_stream_advances": True,
    }
    assert _ok(runs, "full", "checkpoint") == {"reloaded_equal": True}
    assert math.isfinite(_ok(runs, "full", "recompute")["loss"])

    moe = _ok(runs, "full", "moe")
    assert moe["grads_ok"] and math.isfinite(moe["loss"])

    distopt = _ok(runs, "full", "distopt")
    assert distopt["optimizer"] == "DistributedOptimizer"
    assert distopt["max_param_difference"] == 0.0  # the resumed run is the uninterrupted one, exactly
    assert distopt["resumed_loss"] == distopt["reference_loss"]

    ep2 = _ok(runs, "full_ep2", "moe_ep2")
    assert ep2["rank0"]["grads_ok"] and ep2["rank1"]["grads_ok"]
    assert ep2["rank0"]["loss"] != ep2["rank1"]["loss"]  # each rank its own batch


def test_controls_pass_in_every_ablation(runs):
    """Where a run ablates a patch the dense model does not need, the dense model still trains."""
    for name, (skip, checks) in RUNS.items():
        if "dense" in checks and skip not in ("current_device", "rng", "mode"):
            _ok(runs, name, "dense")


# ---------------------------------------------------------------------------------------------
# each patch, left out alone


def test_T1_current_device(runs):
    """~110 sites do ``device=torch.cuda.current_device()``; the first one a forward reaches is RoPE."""
    _failed(runs, "current_device", "dense", NOT_COMPILED,
            frames=["rotary_pos_embedding.py:get_emb", "torch.cuda.current_device()", "__init__.py:current_device"])


def test_T2_synchronize(runs):
    """The torch_dist checkpoint writer calls ``torch.cuda.synchronize()`` unconditionally (so does
    pipeline p2p communication)."""
    _failed(runs, "synchronize", "checkpoint", NOT_COMPILED,
            frames=["filesystem_async.py:preload_tensors", "torch.cuda.synchronize()", "__init__.py:synchronize"])


def test_T3_rng(runs):
    """The RNG tracker seeds and reads the CUDA generator (``model_parallel_cuda_manual_seed``)."""
    _failed(runs, "rng", "dense", NOT_COMPILED,
            frames=["parallel.py:initialize", "random.py:model_parallel_cuda_manual_seed", "random.py:add",
                    "random.py:get_rng_state"])


def test_T4_streams(runs):
    """The MoE alltoall dispatcher makes a side ``torch.cuda.Stream`` for its device-to-host copies."""
    _failed(runs, "streams", "moe", "RuntimeError: torch.cuda.Stream requires CUDA support",
            frames=["token_dispatcher.py:__init__: MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = torch.cuda.Stream()"])


def test_T5_amp_custom_fwd(runs):
    """megatron's linear autograd Function is ``custom_bwd(device_type="cuda")``: without the patch
    its backward does not re-enter CPU autocast and mixes bf16 with fp32."""
    _failed(runs, "amp_custom_fwd", "autocast",
            "RuntimeError: expected m1 and m2 to have the same dtype, but got: c10::BFloat16 != float",
            frames=["autocast_mode.py:decorate_bwd", "layers.py:backward", "grad_output.matmul(weight)"])


def test_T6_mode(runs):
    """Literal ``device="cuda"`` sites: the first a forward reaches is the causal mask."""
    _failed(runs, "mode", "dense", NOT_COMPILED,
            frames=["utils.py:get_default_causal_mask", 'device="cuda"', "__init__.py:_lazy_init"])


def test_T6_tensor_type(runs):
    """DistributedOptimizer dispatches on ``param.type() == "torch.cuda.FloatTensor"``."""
    _failed(runs, "tensor_type", "distopt",
            "TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor, torch.cuda.HalfTensor, "
            "or torch.cuda.BFloat16Tensor. Received torch.FloatTensor",
            frames=["distrib_optimizer.py:_build_model_and_main_param_groups"], stage="build")


def test_M1_mcore_rng(runs):
    """Silent: megatron's private ``_set_cuda_rng_state`` queues a lazy CUDA call that never runs on a
    CPU build, so ``fork()`` neither switches to the tracker's stream nor restores the default one."""
    assert _ok(runs, "full", "rng_fork")["default_stream_restored"]
    values = _ok(runs, "mcore_rng", "rng_fork")
    assert values["fork_switches_stream"] is False
    assert values["default_stream_restored"] is False


def test_M2_te_general_gemm(runs):
    """The MoE router names ``te_general_gemm``, which only a Transformer Engine import defines."""
    _failed(runs, "te_general_gemm", "moe", "NameError: name 'te_general_gemm' is not defined",
            frames=["router.py:gating", "moe_utils.py:forward: if te_general_gemm is not None"])


def test_M3_moe_dtoh(runs):
    """EP=2 alltoall: split sizes stay tensors (only CUDA tensors become numpy), which gloo rejects."""
    _failed(runs, "moe_dtoh", "moe_ep2", "TypeError: all_to_all_single(): incompatible function arguments",
            frames=["token_dispatcher.py:token_dispatch", "mappings.py:forward"])


def test_M5_recompute(runs):
    """Recomputation in backward: megatron's causal mask names "cuda" where T6's mode is off."""
    _failed(runs, "recompute", "recompute", NOT_COMPILED, frames=["random.py:backward", "utils.py:get_default_causal_mask"])


def test_M4a_distopt_ckpt_fresh_optimizer_state(runs):
    """Without M4: resuming into a fresh DistributedOptimizer (empty Adam state) trips
    ``assert len(steps) == 1`` when the load request is built."""
    _failed(runs, "distopt_ckpt", "distopt", "AssertionError",
            frames=["distrib_optimizer.py:state_dict: assert len(steps) == 1"],
            stage="resume: sharded_state_dict(is_loading=True)")


def test_M4b_distopt_ckpt_step_key(runs):
    """M4 without (b): the fully_reshardable loader copies every Adam key, ``step`` included, which
    the loaded per-parameter tensors do not have."""
    _failed(runs, "distopt_ckpt", "distopt_without_b", "KeyError: 'step'",
            frames=["distrib_optimizer.py:load_parameter_state_from_fully_reshardable",
                    "distrib_optimizer.py:_set_main_param_and_optimizer_states"],
            stage="resume: load_state_dict")


def test_M4c_distopt_ckpt_shared_step(runs):
    """Silent: M4 without (c) resumes, but every parameter shares one ``step`` tensor that torch Adam
    increments once per parameter, so the first step after resuming differs from the uninterrupted
    run (with M4 it is bit-identical)."""
    assert _ok(runs, "full", "distopt")["max_param_difference"] == 0.0
    values = _ok(runs, "distopt_ckpt", "distopt_without_c")
    assert values["max_param_difference"] > 1e-4, values
    assert values["resumed_loss"] != values["reference_loss"], values


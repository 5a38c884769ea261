"""Scenarios that exercise each patch of the CPU platform layer (``megatron_tst/platform/cpu.py``).

Run as ``python -m tests.platform_scenarios CHECK [CHECK ...]`` from the repository root, with
``MEGATRON_TST_CPU_SKIP`` naming the patches to leave out. The patches are applied when
``megatron_tst`` is imported, so every set of left-out patches needs a fresh process; that is why
``tests/test_platform.py`` runs this module in subprocesses. Each check runs on its own (an error in
one does not stop the next) and the process prints one line, ``RESULT_MARKER`` followed by JSON:
``{check: {"ok": true, "values": {...}}}`` or ``{check: {"ok": false, "error": "Type: message",
"frames": ["file.py:function: source line", ...] (innermost last), "stage": ...}}``, plus
``"_meta": {"skipped": [...]}`` (the patches the layer really left out). The silent patches (M1,
M4 c) give numbers, not errors, so their checks return values that the test compares.

Checks (one process, world of one unless said otherwise):
  dense       build a tiny GPT, forward + backward                        (T1, T3, T6)
  autocast    the same under CPU bf16 autocast                             (T5)
  rng_fork    the RNG tracker's fork() switches and restores the generator (M1, silent)
  checkpoint  dist_checkpointing save (torch_dist) + load of the tiny GPT   (T2)
  moe         tiny MoE (alltoall dispatcher), forward + backward           (T4, M2)
  distopt     DDP + DistributedOptimizer (torch Adam): a step, a checkpoint, a resume into a fresh
              model and optimizer, one more step compared with the run that never stopped
                                                                           (T6 tensor_type, M4)
  distopt_without_b / distopt_without_c
              as distopt, with M4's fixes installed by hand except (b) or (c); only valid when the
              process leaves ``distopt_ckpt`` out (plain ``distopt`` there has none of the three, and
              stops at the first, (a)), so each of M4's three fixes is shown to be needed (uses the
              layer's private ``_fix_distributed_optimizer_with_torch_adam``)
  moe_ep2     two spawned gloo processes (tests.distributed.run_distributed), each running
              moe_ep2_rank: tiny MoE, expert parallelism 2, alltoall dispatcher (M3)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import traceback
import warnings

import torch

RESULT_MARKER = "PLATFORM_SCENARIO_RESULT "
SEQ, BATCH = 16, 2
_stage = {"name": None}  # the step a multi-step check is at (reported with an error)


def _at(name: str) -> None:
    _stage["name"] = name


# ---------------------------------------------------------------------------------------------
# helpers (megatron imports stay inside functions: the process imports megatron_tst first)


def _batch(seed: int, vocab: int = 512):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=generator)
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    return tokens[:, :-1].contiguous(), positions, tokens[:, 1:].contiguous()


def _model(preset_name: str, **config_fields):
    from megatron_tst.models import build_gpt_model, preset, transformer_config

    arch = preset(preset_name)
    # megatron-core's own attention (--attention-backend local), whose causal mask and recompute paths
    # are what the platform layer makes run on CPU; the default SDPA attention builds no mask
    config_fields.setdefault("attention_backend", "local")
    config = transformer_config(arch, **config_fields)
    return build_gpt_model(arch, config, tst=False), config


def _loss(model, seed: int):
    tokens, positions, labels = _batch(seed)
    return model(tokens, positions, None, labels=labels).float().mean()


def _grads_finite_and_nonzero(model) -> bool:
    grads = [p.grad if p.grad is not None else getattr(p, "main_grad", None) for p in model.parameters()]
    grads = [g for g in grads if g is not None]
    return bool(grads) and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------------------------------------
# checks


def check_dense():
    from megatron_tst import parallel

    parallel.initialize(seed=1)
    model, _ = _model("tiny")
    loss = _loss(model, 0)
    loss.backward()
    assert _grads_finite_and_nonzero(model), "no gradients"
    return {"loss": loss.item()}


def check_recompute():
    """Full activation recomputation: the forward runs again inside backward."""
    from megatron_tst import parallel

    parallel.initialize(seed=1)
    model, _ = _model("tiny", recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    loss = _loss(model, 0)
    loss.backward()
    assert _grads_finite_and_nonzero(model), "no gradients"
    return {"loss": loss.item()}


def check_autocast():
    from megatron_tst import parallel

    parallel.initialize(seed=1)
    model, _ = _model("tiny")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens, positions, labels = _batch(0)
        logits = model(tokens, positions, None)  # [s, b, v] (no labels: the logits themselves)
        loss = logits.float().logsumexp(-1).mean()
    loss.backward()
    weight = model.decoder.layers[0].mlp.linear_fc1.weight
    return {"logits_dtype": str(logits.dtype), "weight_grad_dtype": str(weight.grad.dtype),
            "grads_ok": _grads_finite_and_nonzero(model)}


def check_rng_fork():
    """megatron's RNG tracker: inside ``fork()`` the generator runs the tracker's own stream, and
    afterwards the default stream continues exactly where it was (as on CUDA)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from megatron_tst import parallel

    parallel.initialize(seed=1)
    tracker = get_cuda_rng_tracker()
    torch.default_generator.manual_seed(7)
    undisturbed = torch.rand(8)
    torch.default_generator.manual_seed(7)
    with tracker.fork():
        inside_first = torch.rand(8)
    after = torch.rand(8)
    with tracker.fork():
        inside_second = torch.rand(8)
    return {
        "fork_switches_stream": not torch.equal(inside_first, undisturbed),
        "default_stream_restored": torch.equal(after, undisturbed),
        "tracker_stream_advances": not torch.equal(inside_first, inside_second),
    }


def check_checkpoint():
    from megatron.core import dist_checkpointing

    from megatron_tst import parallel

    parallel.initialize(seed=1)
    model, _ = _model("tiny")
    directory = tempfile.mkdtemp(prefix="platform_ckpt_")
    try:
        dist_checkpointing.save(model.sharded_state_dict(), directory)
        fresh, _ = _model("tiny")
        fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), directory))
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values())
                   if isinstance(a, torch.Tensor))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {"reloaded_equal": same}


def check_moe():
    from megatron_tst import parallel

    parallel.initialize(seed=1)
    model, _ = _model("tiny-moe", moe_token_dispatcher_type="alltoall")
    loss = _loss(model, 0)
    loss.backward()
    return {"loss": loss.item(), "grads_ok": _grads_finite_and_nonzero(model)}


def _distopt_model_and_optimizer():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model, config = _model("tiny")
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True), model
    )
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-2, clip_grad=1.0, bf16=False, params_dtype=torch.float32,
        use_distributed_optimizer=True,
    ), [ddp])
    return ddp, optimizer


def _train_step(ddp, optimizer, seed):
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss = _loss(ddp, seed)
    loss.backward()
    ddp.finish_grad_sync()
    succeeded, _, _ = optimizer.step()
    assert succeeded, "optimizer step skipped"
    return loss.item()


def _sharded_state(ddp, optimizer, is_loading):
    model_state = ddp.module.sharded_state_dict()  # the DDP wrapper's keys carry a "module." prefix
    return {"model": model_state, "optimizer": optimizer.sharded_state_dict(
        model_state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"})}


def _flat_params(ddp):
    return torch.cat([p.detach().reshape(-1).float() for p in ddp.module.parameters()])


def check_distopt():
    """Save after one step, resume into a fresh model + DistributedOptimizer, take step two and
    compare with the run that never stopped (the project's checkpoint path: fully_reshardable)."""
    from megatron.core import dist_checkpointing

    from megatron_tst import parallel

    _at("build")
    parallel.initialize(seed=1)
    ddp, optimizer = _distopt_model_and_optimizer()
    kind = type(optimizer.chained_optimizers[0]).__name__ if hasattr(optimizer, "chained_optimizers") \
        else type(optimizer).__name__
    _at("first step")
    _train_step(ddp, optimizer, seed=0)
    directory = tempfile.mkdtemp(prefix="platform_distopt_")
    try:
        _at("save")
        dist_checkpointing.save(_sharded_state(ddp, optimizer, is_loading=False), directory)
        _at("second step")
        _train_step(ddp, optimizer, seed=1)
        reference_params = _flat_params(ddp)
        reference_loss = _loss(ddp, 2).item()

        _at("resume: build")
        parallel.initialize(seed=2)  # another init: the checkpoint must bring everything back
        fresh, fresh_optimizer = _distopt_model_and_optimizer()
        _at("resume: sharded_state_dict(is_loading=True)")
        request = _sharded_state(fresh, fresh_optimizer, is_loading=True)
        _at("resume: dist_checkpointing.load")
        loaded = dist_checkpointing.load(request, directory)
        _at("resume: load_state_dict")
        fresh.module.load_state_dict(loaded["model"])
        fresh_optimizer.load_state_dict(loaded["optimizer"])
        _at("resume: second step")
        _train_step(fresh, fresh_optimizer, seed=1)
        resumed_params = _flat_params(fresh)
        resumed_loss = _loss(fresh, 2).item()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {
        "optimizer": kind,
        "max_param_difference": (resumed_params - reference_params).abs().max().item(),
        "reference_loss": reference_loss,
        "resumed_loss": resumed_loss,
    }


@contextlib.contextmanager
def _m4_without(fix: str):
    """M4's fixes, installed by hand, except ``fix`` ('a', 'b' or 'c'); restored afterwards."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_tst.platform import cpu

    names = {"a": "sharded_state_dict", "b": "_set_main_param_and_optimizer_states", "c": "load_state_dict"}
    originals = {name: DistributedOptimizer.__dict__[name] for name in names.values()}
    if any(getattr(f, "__module__", None) == cpu.__name__ for f in originals.values()):
        raise RuntimeError("M4 is installed in this process: run with MEGATRON_TST_CPU_SKIP=distopt_ckpt")
    cpu._fix_distributed_optimizer_with_torch_adam()
    setattr(DistributedOptimizer, names[fix], originals[names[fix]])
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(DistributedOptimizer, name, function)


def _distopt_without(fix):
    def check():
        with _m4_without(fix):
            return check_distopt()

    check.__name__ = f"check_distopt_without_{fix}"
    return check


def moe_ep2_worker(rank, world_size):
    return run_checks(["moe_ep2_rank"])


def check_moe_ep2_rank():
    from megatron.core import parallel_state

    from megatron_tst import parallel

    parallel.initialize(expert_model_parallel_size=2, seed=1)
    model, _ = _model("tiny-moe", expert_model_parallel_size=2, moe_token_dispatcher_type="alltoall")
    loss = _loss(model, parallel_state.get_expert_model_parallel_rank())
    loss.backward()
    return {"loss": loss.item(), "grads_ok": _grads_finite_and_nonzero(model)}


def check_moe_ep2():
    """Two gloo processes (spawned; they inherit MEGATRON_TST_CPU_SKIP); each rank's result."""
    from tests.distributed import run_distributed

    ranks = run_distributed(moe_ep2_worker, 2, timeout=150)
    failed = [r["moe_ep2_rank"] for r in ranks if not r["moe_ep2_rank"]["ok"]]
    if failed:
        raise ScenarioError(failed[0])
    return {f"rank{rank}": r["moe_ep2_rank"]["values"] for rank, r in enumerate(ranks)}


class ScenarioError(Exception):
    """A failure reported by a worker process, with its frames."""

    def __init__(self, record):
        super().__init__(record["error"])
        self.record = record


CHECKS = {
    "dense": check_dense,
    "autocast": check_autocast,
    "rng_fork": check_rng_fork,
    "checkpoint": check_checkpoint,
    "recompute": check_recompute,
    "moe": check_moe,
    "distopt": check_distopt,
    "distopt_without_b": _distopt_without("b"),
    "distopt_without_c": _distopt_without("c"),
    "moe_ep2": check_moe_ep2,
    "moe_ep2_rank": check_moe_ep2_rank,
}


def _describe(error: BaseException) -> dict:
    if isinstance(error, ScenarioError):
        return error.record
    stack = traceback.extract_tb(error.__traceback__)
    message = " ".join(str(error).split())
    return {
        "ok": False,
        "error": f"{type(error).__name__}: {message}"[:2000],
        # innermost last: "file.py:function: source line"
        "frames": [f"{os.path.basename(frame.filename)}:{frame.name}: {frame.line}" for frame in stack][-40:],
        "stage": _stage["name"],
    }


def run_checks(names) -> dict:
    import megatron_tst  # noqa: F401  (the CPU platform layer's torch-level patches, as the project does)

    results = {}
    for name in names:
        _at(None)
        try:
            results[name] = {"ok": True, "values": CHECKS[name]()}
        except Exception as error:  # noqa: BLE001  (reported, judged by the test)
            results[name] = _describe(error)
    return results


def main(argv) -> int:
    unknown = [name for name in argv if name not in CHECKS]
    if not argv or unknown:
        print(f"usage: python -m tests.platform_scenarios CHECK...; checks: {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    results = run_checks(argv)
    from megatron_tst.platform import cpu

    results["_meta"] = {"skipped": sorted(cpu._SKIP)}  # what this process really left out
    if "megatron.core.parallel_state" in sys.modules:
        try:
            from megatron_tst import parallel

            parallel.shutdown()
        except Exception:  # noqa: BLE001  (a failed scenario may leave nothing to shut down)
            pass
    print(RESULT_MARKER + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":  # the guard matters: torch_dist's writer spawns a Manager process
    sys.exit(main(sys.argv[1:]))

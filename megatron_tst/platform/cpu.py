"""Run the real megatron-core 0.16.1 on CPU over gloo when CUDA is absent.

megatron-core assumes CUDA throughout: ~110 sites call ``torch.cuda.current_device()``, ~60 use a
literal ``"cuda"``/``.cuda()``, its RNG tracker drives the CUDA generator, and a few code paths only
work with CUDA tensors. This module is the one place that papers over that. With CUDA it applies
only M4, which mends upstream bugs of torch's Adam under the distributed optimizer: those depend on
Transformer Engine and Apex being absent (megatron-core then falls back to torch's Adam), not on
the device. Each patch has an id (used by ``MEGATRON_TST_CPU_SKIP=id,id`` to leave it out,
which is how ``tests/test_platform.py`` shows that each one is needed).

torch-level patches (must run before ``megatron.core.tensor_parallel.layers`` is imported):
  T1 current_device  ``torch.cuda.current_device()`` returns the CPU device (also valid inside
                     autograd backward, where the function mode of T6 is not active)
  T2 synchronize     ``torch.cuda.synchronize`` is a no-op (p2p communication, checkpoint writer)
  T3 rng             the CUDA generator API is an alias of the CPU default generator
  T4 streams         dummy CUDA streams and events (MoE alltoall dispatcher)
  T5 amp_custom_fwd  ``custom_fwd/custom_bwd(device_type="cuda")`` follow CPU autocast instead
  T6 mode            a TorchFunctionMode maps ``device="cuda"``/int devices, ``.cuda()``,
                     ``.to("cuda")``, ``pin_memory`` and ``record_stream`` to CPU equivalents, and
                     makes ``Tensor.type()`` report ``torch.cuda.*`` (the optimizer dispatches on it)
megatron-level patches:
  M1 mcore_rng       megatron's private CUDA RNG get/set act on the CPU generator
  M2 te_general_gemm the MoE router names ``te_general_gemm`` even without Transformer Engine
  M3 moe_dtoh        MoE split sizes become numpy for CPU tensors too (gloo needs lists)
  M4 distopt_ckpt    three upstream bugs of DistributedOptimizer checkpointing with torch Adam
                     (applied whenever neither Transformer Engine nor Apex is importable, GPU or not)
  M5 recompute       activation recomputation (``tensor_parallel.checkpoint``) re-runs the forward
                     inside backward, where T6's mode is off: its backward runs under the mode

Known limits: context parallelism needs TEDotProductAttention (Transformer Engine), sequence
parallelism needs a norm that is not ``WrappedTorchNorm``; literal ``"cuda"`` inside a custom
autograd backward or in another thread is not remapped (megatron-core's CPU paths do not need it).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys

import torch
from torch.overrides import TorchFunctionMode

_SKIP = frozenset(filter(None, os.environ.get("MEGATRON_TST_CPU_SKIP", "").split(",")))
_mode: TorchFunctionMode | None = None
_megatron_patched = False


def _enabled(patch_id: str) -> bool:
    return patch_id not in _SKIP


def _to_cpu_device(device):
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, int) and not isinstance(device, bool):  # a CUDA device index
        return "cpu"
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """T6: rewrite CUDA device arguments and CUDA-only tensor methods to their CPU meaning."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs or "pin_memory" in kwargs:
            kwargs = dict(kwargs)
            if "device" in kwargs:
                kwargs["device"] = _to_cpu_device(kwargs["device"])
            kwargs.pop("pin_memory", None)  # pinned memory needs an accelerator
        if func is torch.Tensor.to and len(args) > 1 and not isinstance(args[1], (torch.dtype, torch.Tensor)):
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        elif func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        elif func is torch.Tensor.record_stream:
            return None
        elif func is torch.Tensor.type and _enabled("tensor_type"):
            if len(args) == 1 and not kwargs:  # query form: report what a GPU run would see
                name = func(*args)
                return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
            if len(args) > 1 and isinstance(args[1], str):  # conversion form
                args = (args[0], args[1].replace("torch.cuda.", "torch."), *args[2:])
        return func(*args, **kwargs)


class _Event:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _Stream:
    """All dummy streams compare equal, so side-stream branches collapse onto the one CPU stream."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _Event()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _Stream)

    def __hash__(self):
        return 0


_THE_STREAM = _Stream()


def _install_torch_patches() -> None:
    global _mode
    cuda = torch.cuda
    cpu = torch.device("cpu")
    if _enabled("current_device"):  # T1
        cuda.current_device = lambda: cpu
    if _enabled("synchronize"):  # T2
        cuda.synchronize = lambda *a, **k: None
    if _enabled("rng"):  # T3 (torch.manual_seed would recurse through cuda.manual_seed_all)
        cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
        cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
        cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
        cuda.random.get_rng_state, cuda.random.set_rng_state = cuda.get_rng_state, cuda.set_rng_state
    if _enabled("streams"):  # T4
        cuda.Stream, cuda.Event = _Stream, _Event
        cuda.current_stream = cuda.default_stream = lambda *a, **k: _THE_STREAM
        cuda.stream = lambda *a, **k: contextlib.nullcontext()
    if _enabled("amp_custom_fwd"):  # T5
        for name in ("custom_fwd", "custom_bwd"):
            original = getattr(torch.amp, name)

            def follow_cpu_autocast(fn=None, *, device_type, _original=original, **kwargs):
                device_type = "cpu" if device_type == "cuda" else device_type
                return _original(fn, device_type=device_type, **kwargs)

            setattr(torch.amp, name, functools.wraps(original)(follow_cpu_autocast))
    if _enabled("mode"):  # T6
        _mode = _CudaToCpuMode()
        _mode.__enter__()


def _install_megatron_patches() -> None:
    import megatron.core.tensor_parallel.random as mcore_random
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    if _enabled("mcore_rng"):  # M1: these read torch.cuda.default_generators directly
        mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
        mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
        # CUDA and CPU RNG are one generator here, so the tracker's "CPU RNG changed" warning is noise.
        logging.getLogger(mcore_random.__name__).setLevel(logging.ERROR)
    if _enabled("te_general_gemm") and not hasattr(moe_utils, "te_general_gemm"):  # M2
        moe_utils.te_general_gemm = None
    if _enabled("moe_dtoh"):  # M3

        def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
            return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor

        moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
        token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    if _enabled("distopt_ckpt"):  # M4
        _fix_distributed_optimizer_with_torch_adam()
    if _enabled("recompute"):  # M5: activation recomputation runs the forward again inside backward
        original_backward = mcore_random.CheckpointFunction.backward

        def backward(ctx, *grads):
            with _mode:
                return original_backward(ctx, *grads)

        mcore_random.CheckpointFunction.backward = staticmethod(backward)


def _fix_distributed_optimizer_with_torch_adam() -> None:
    """M4: DistributedOptimizer checkpointing with torch.optim.Adam (the only choice without TE or
    Apex) is broken upstream in 0.16.1 in three ways; each fix is minimal."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer

    if HAVE_APEX_OR_TE:
        return
    original_sharded_state_dict = DistributedOptimizer.sharded_state_dict
    original_load_state_dict = DistributedOptimizer.load_state_dict

    # (a) state_dict() asserts exactly one 'step' in the Adam state, which is empty before step 1.
    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, *args, **kwargs):
        if is_loading and isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    state = self.optimizer.state[param]
                    if not state:
                        state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                                     exp_avg_sq=torch.zeros_like(param))
        model_sharded_state_dict = {} if model_sharded_state_dict is None else model_sharded_state_dict
        return original_sharded_state_dict(self, model_sharded_state_dict, is_loading, *args, **kwargs)

    # (b) the loader copies every Adam key, 'step' included (absent from the per-param tensors), into
    #     fp32 main params that are views of leaf params (an in-place autograd error).
    original_set_states = DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original_set_states(self, model_param, tensors)
        group_index, order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][order]
        destinations = {"param": main_param, **self.optimizer.state[main_param]}
        with torch.no_grad():
            for key, tensor in destinations.items():
                if key != "step" and key in tensors:  # 'step' comes back through param_groups
                    tensor.copy_(tensors[key])

    # (c) load_state_dict() puts ONE 'step' tensor into every param's state; torch Adam would then
    #     increment it once per param per step (wrong bias correction). Give each param its own.
    def load_state_dict(self, state_dict):
        original_load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

    DistributedOptimizer.sharded_state_dict = sharded_state_dict
    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    DistributedOptimizer.load_state_dict = load_state_dict


def install() -> None:
    """Prepare torch (the T patches). Idempotent; does nothing when CUDA is available.

    Must run before anything imports ``megatron.core.tensor_parallel`` (``import megatron_tst`` does
    it first thing); the function mode is per thread, so worker processes call it themselves.
    """
    if torch.cuda.is_available() or _mode is not None or _megatron_patched:
        return
    if "megatron.core.tensor_parallel.layers" in sys.modules:
        raise RuntimeError(
            "megatron.core was imported before megatron_tst on a machine without CUDA; "
            "import megatron_tst first so its CPU platform layer can prepare torch"
        )
    _install_torch_patches()


def install_megatron() -> None:
    """The M patches, on megatron-core's modules (imported here). Idempotent; called by
    ``megatron_tst.parallel.initialize`` before any model, optimizer or RNG tracker is used, so
    importing megatron_tst stays cheap for tools that never touch megatron-core's models. With CUDA
    only M4 (keyed inside on Transformer Engine and Apex being absent)."""
    global _megatron_patched
    if _megatron_patched:
        return
    if torch.cuda.is_available():
        if _enabled("distopt_ckpt"):
            _fix_distributed_optimizer_with_torch_adam()
    else:
        install()
        _install_megatron_patches()
    _megatron_patched = True

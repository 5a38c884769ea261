"""torch_dist checkpoints (megatron-core dist_checkpointing), written atomically.

Layout, as Megatron-LM's: ``<dir>/iter_0000100/`` per checkpoint and
``<dir>/latest_checkpointed_iteration.txt`` naming the newest complete one. A checkpoint is written
into ``iter_0000100.tmp`` and renamed when every rank has finished, and the tracker is replaced
after that, so a crash leaves either the previous checkpoint or the new one, never half of one.
Each checkpoint holds the model and optimizer (sharded, loadable at another TP/PP/EP layout), the
LR scheduler, the iteration, the data position, the TST state, every rank's RNG state
(``rng/rank_<n>.pt``, restored when the world size is unchanged) and ``run_config.json`` (the model
shape, the TST plan and the framework version, readable without torch).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import zipfile
from multiprocessing.managers import SyncManager

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel

import megatron_tst
from megatron_tst import orphan
from megatron_tst.optimizer import mark_decoupled_groups

TRACKER = "latest_checkpointed_iteration.txt"
RUN_CONFIG = "run_config.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit this run."""


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> int | None:
    """The newest complete checkpoint's iteration under ``root``, or None when there is none."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        return None
    text = open(tracker).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} holds {text!r}, not an iteration; remove it or point --load elsewhere")
    iteration = int(text)
    if not os.path.isdir(checkpoint_dir(root, iteration)):
        raise CheckpointError(f"{tracker} names iteration {iteration} but {checkpoint_dir(root, iteration)} is missing")
    return iteration


def read_run_config(root: str, iteration: int | None = None) -> dict:
    iteration = latest_iteration(root) if iteration is None else iteration
    if iteration is None:
        raise CheckpointError(f"no checkpoint under {root} ({TRACKER} is missing)")
    verify(root, iteration)
    with open(os.path.join(checkpoint_dir(root, iteration), RUN_CONFIG)) as handle:
        return json.load(handle)


def damage(directory: str) -> str | None:
    """What is wrong with the checkpoint in ``directory`` (a missing or truncated file), or None when
    every file its metadata names is there at full length. Reads only metadata and file sizes."""
    if not os.path.isdir(directory):
        return f"{directory} is missing"
    for name in (".metadata", "common.pt", "metadata.json", RUN_CONFIG):
        if not os.path.isfile(os.path.join(directory, name)):
            return f"{os.path.join(directory, name)} is missing"
    try:
        with open(os.path.join(directory, RUN_CONFIG)) as handle:
            json.load(handle)
    except ValueError:
        return f"{os.path.join(directory, RUN_CONFIG)} is not valid JSON (truncated?)"
    torch_files = ["common.pt"]  # torch.save writes zip archives: a truncated one has no directory
    rng_dir = os.path.join(directory, "rng")
    if os.path.isdir(rng_dir):
        torch_files += [os.path.join("rng", name) for name in sorted(os.listdir(rng_dir)) if name.endswith(".pt")]
    for name in torch_files:
        if not zipfile.is_zipfile(os.path.join(directory, name)):
            return f"{os.path.join(directory, name)} is truncated or corrupted"
    try:
        from torch.distributed.checkpoint import FileSystemReader

        storage = FileSystemReader(directory).read_metadata().storage_data
    except Exception as error:  # a truncated pickle raises anything from EOFError to UnpicklingError
        return f"{os.path.join(directory, '.metadata')} is unreadable ({type(error).__name__})"
    needed = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for relative_path, size in sorted(needed.items()):
        path = os.path.join(directory, relative_path)
        if not os.path.isfile(path):
            return f"shard {path} is missing"
        if os.path.getsize(path) < size:
            return f"shard {path} is truncated ({os.path.getsize(path):,} of {size:,} bytes)"
    return None


_verified: set[str] = set()


def verify(root: str, iteration: int) -> None:
    """Refuse a damaged checkpoint with what is wrong and which earlier checkpoint is complete;
    never fall back to an older one silently (that would retrain steps without saying so)."""
    directory = checkpoint_dir(root, iteration)
    if directory in _verified:
        return
    problem = damage(directory)
    if problem is None:
        _verified.add(directory)
        return
    earlier = [int(name[5:]) for name in os.listdir(root) if re.fullmatch(r"iter_\d{7}", name)
               and int(name[5:]) < iteration] if os.path.isdir(root) else []
    complete = next((it for it in sorted(earlier, reverse=True) if damage(checkpoint_dir(root, it)) is None), None)
    if complete is None:
        fix = (f"no earlier complete checkpoint is under {root}: restore the file from a copy, or start "
               "afresh with another --save directory")
    else:
        fix = (f"the newest complete earlier checkpoint is {checkpoint_dir(root, complete)}: restore the "
               f"file from a copy, or resume from iteration {complete} by writing {complete} into "
               f"{os.path.join(root, TRACKER)}")
    raise CheckpointError(f"checkpoint {directory} is damaged: {problem}; {fix}")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _sharded_state(model_chunks, optimizer, for_loading: bool):
    state = {}
    for index, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{index}"
        state[key] = chunk.sharded_state_dict()
    if optimizer is not None:
        model_state = state if len(model_chunks) > 1 else state["model"]
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=for_loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable"},
        )
    return state


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


_writer_manager = None


def _signal_proof_writer_queue() -> None:
    """megatron-core's torch_dist writer hands its results through a queue served by a helper
    process it starts at the first save (multiprocessing Manager, spawn). A SIGTERM to the whole
    job (SLURM, Kubernetes, killpg) killed that helper, and the save the signal asked for then
    failed with a broken pipe. Serve megatron-core's queue from a helper that ignores the job's
    signals and ends with this process instead; megatron-core takes the queue from its cache (the
    one place outside the platform layer that sets megatron-core state: it has no option for this).
    Called from the training loop's thread, which lives as long as the process (the parent-death
    signal follows the thread that started the helper)."""
    global _writer_manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        _writer_manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        _writer_manager.start(initializer=orphan.keep_helper_through_job_signals)
        filesystem_async._results_queue = _writer_manager.Queue()


_async_queue = None  # megatron-core's AsyncCallsQueue, made by the first --async-save


def finalize_async_saves(blocking: bool = True) -> None:
    """Publish (rename into place) the asynchronous saves whose writers have finished on every
    rank; ``blocking`` waits for them. Collective when a save is in flight: every rank calls it at
    the same points (each step, each save, the end of training)."""
    if _async_queue is not None and _async_queue.get_num_unfinalized_calls():
        _async_queue.maybe_finalize_async_calls(blocking=blocking)


def _publish(root: str, iteration: int, partial: str, final: str) -> None:
    """Every rank's files are written: rename ``partial`` to ``final``, then update the tracker."""
    _barrier()
    if _rank() == 0:
        if os.path.exists(final):  # a re-save of the same iteration replaces it whole
            shutil.rmtree(final)
        os.replace(partial, final)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as handle:
            handle.write(str(iteration))
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
    _barrier()


def save(root: str, iteration: int, model_chunks, optimizer, scheduler, common: dict, run_config: dict,
         async_save: bool = False, save_optimizer: bool = True, save_rng: bool = True) -> str:
    """Write checkpoint ``iteration`` under ``root``; ``common`` is small picklable state (data
    position, TST state, ...). Collective: every rank calls it. With ``async_save`` (--async-save)
    megatron-core's torch_dist writer runs in a forked process (a copy-on-write snapshot of the
    state) and this returns once it has started; the checkpoint appears under its final name when
    ``finalize_async_saves`` finds every rank's writer done (at the latest, before the next save).
    ``save_optimizer``/``save_rng`` False (--no-save-optim/--no-save-rng) leave that state out; the
    run_config's ``optimizer_saved`` tells a resume to start fresh optimizer state."""
    global _async_queue
    finalize_async_saves()  # one checkpoint in flight at a time, published in order
    final = checkpoint_dir(root, iteration)
    partial = final + ".tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(partial):  # left by an interrupted save
            shutil.rmtree(partial)
        os.makedirs(partial)
    _barrier()
    state = _sharded_state(model_chunks, optimizer if save_optimizer else None, for_loading=False)
    state["iteration"] = iteration
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    state["common"] = common
    _signal_proof_writer_queue()
    request = dist_checkpointing.save(state, partial, async_sharded_save=async_save)
    if save_rng:
        os.makedirs(os.path.join(partial, "rng"), exist_ok=True)
        torch.save(_rng_state(), os.path.join(partial, "rng", f"rank_{_rank()}.pt"))
    if _rank() == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        with open(os.path.join(partial, RUN_CONFIG), "w") as handle:
            json.dump({**run_config, "iteration": iteration, "world_size": world, "optimizer_saved": save_optimizer,
                       "framework_version": megatron_tst.__version__}, handle, indent=2, sort_keys=True)
    if async_save:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        request.add_finalize_fn(lambda: _publish(root, iteration, partial, final))
        if _async_queue is None:
            _async_queue = AsyncCallsQueue()
        _async_queue.schedule_async_request(request)
        return final
    _publish(root, iteration, partial, final)
    return final


def _with_zero_step(state):
    """megatron-core saves the Adam step shared by all parameters only when it is nonzero (``if
    step:``), so a checkpoint saved before any update (fp16: the first steps overflow and are
    skipped; ``optimizer.fresh_adam_state``) loads moments without a step, which torch's Adam
    rejects. Their step is 0: given as a number, torch makes it the tensor its Adam variant needs."""
    for part in state if isinstance(state, list) else [state]:
        inner = part.get("optimizer") if isinstance(part, dict) else None
        if not isinstance(inner, dict) or "common_step" in inner.get("state", {}):
            continue
        for param_state in inner.get("state", {}).values():
            if isinstance(param_state, dict) and "exp_avg" in param_state:
                param_state.setdefault("step", 0.0)
    return state


def load(root: str, model_chunks, optimizer, scheduler, iteration: int | None = None,
         load_optimizer: bool = True, load_rng: bool = True) -> dict:
    """Load the newest (or the given) checkpoint into the model, optimizer and scheduler; returns
    ``{"iteration", "common", "run_config"}``. Collective."""
    iteration = latest_iteration(root) if iteration is None else iteration
    if iteration is None:
        raise CheckpointError(f"no checkpoint to load under {root} ({TRACKER} is missing)")
    directory = checkpoint_dir(root, iteration)
    run_config = read_run_config(root, iteration)  # verifies the files first
    request = _sharded_state(model_chunks, optimizer if load_optimizer else None, for_loading=True)
    try:
        loaded = dist_checkpointing.load(request, directory)
    except Exception as error:  # megatron-core's messages are long; name the likely cause first
        raise CheckpointError(
            f"cannot load {directory} into this model ({type(error).__name__}: "
            f"{' '.join(str(error).split())[-300:]}); "
            "is it a checkpoint of another model shape?"
        ) from error
    for index, chunk in enumerate(model_chunks):
        chunk.load_state_dict(loaded["model" if len(model_chunks) == 1 else f"model{index}"])
    if load_optimizer and optimizer is not None:
        mark_decoupled_groups(loaded["optimizer"])  # also a checkpoint saved before the flag was set
        optimizer.load_state_dict(_with_zero_step(loaded["optimizer"]))
    elif optimizer is not None:
        optimizer.reload_model_params()  # fresh optimizer state around the loaded weights
    if scheduler is not None and loaded["scheduler"] is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    world = dist.get_world_size() if dist.is_initialized() else 1
    rng_file = os.path.join(directory, "rng", f"rank_{_rank()}.pt")
    if load_rng and run_config.get("world_size") == world and os.path.isfile(rng_file):
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return {"iteration": loaded["iteration"], "common": loaded["common"], "run_config": run_config}


def model_parallel_layout() -> dict:
    return {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size(),
    }

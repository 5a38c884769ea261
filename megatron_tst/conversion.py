"""Checkpoint conversions. ``tst_to_ntp``: a phase-1 (superposition) checkpoint -> the start of
next-token recovery.

The model's parameters are identical in both phases (``TSTGPTModel``'s state dict is a
``GPTModel``'s), so the weights, optimizer and scheduler state are carried over unchanged: their
shard files are hard-linked, not copied, and only ``common.pt`` and ``run_config.json`` are written
anew (as new files: nothing is written through a link into the source checkpoint). What
changes is the bookkeeping: the TST state is removed (the recovery job builds a plain GPTModel), and
the data position is kept, so the recovery job reads phase 2's documents, which phase 1 never read.
Options: ``reset_optimizer`` (the recovery job starts with fresh Adam state; the LR schedule still
follows the iteration count) and ``reinit_embeddings`` (the recovery job re-initialises the input
embedding and output head: the paper's Table 2 ablation).
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from megatron_tst import checkpointing


def tst_to_ntp(source: str, destination: str, reset_optimizer: bool = False,
               reinit_embeddings: bool = False, overwrite: bool = False) -> str:
    """Convert the newest checkpoint under ``source`` into a recovery start under ``destination``."""
    iteration = checkpointing.latest_iteration(source)
    if iteration is None:
        raise checkpointing.CheckpointError(f"no complete checkpoint under {source} to convert")
    run_config = checkpointing.read_run_config(source, iteration)
    plan = run_config.get("tst")
    if not plan:
        raise checkpointing.CheckpointError(
            f"{checkpointing.checkpoint_dir(source, iteration)} is not a TST checkpoint (no TST plan); "
            "only a superposition-phase checkpoint converts to next-token training")
    if iteration != plan["switch_iter"]:
        raise checkpointing.CheckpointError(
            f"the newest checkpoint under {source} is at iteration {iteration}, not at the switch iteration "
            f"{plan['switch_iter']}; finish phase 1 first (rerun the phase-1 job, it resumes)")
    final = checkpointing.checkpoint_dir(destination, iteration)
    if os.path.isdir(destination) and not os.path.exists(os.path.join(destination, checkpointing.TRACKER)):
        # what a conversion interrupted half way leaves (its tracker is written last): redo it
        for name in os.listdir(destination):
            if name.endswith(".tmp") or name == os.path.basename(final):
                path = os.path.join(destination, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if os.path.exists(destination) and os.listdir(destination):
        if not overwrite:
            raise FileExistsError(f"{destination} already exists; remove it or pass --overwrite")
        shutil.rmtree(destination)
    os.makedirs(destination, exist_ok=True)
    source_dir = checkpointing.checkpoint_dir(source, iteration)
    partial = final + ".tmp"
    _link_tree(source_dir, partial, rewritten=("common.pt", checkpointing.RUN_CONFIG))

    common_state = torch.load(os.path.join(source_dir, "common.pt"), weights_only=False)
    common = common_state["common"]
    tst_state = common.pop("tst_state")
    common["tst_state"] = None
    common["converted_from"] = {"checkpoint": os.path.abspath(source_dir), "tst_state": tst_state}
    common["reset_optimizer"] = reset_optimizer
    common["reinit_embeddings"] = reinit_embeddings
    torch.save(common_state, os.path.join(partial, "common.pt"))  # a new file, not the source's inode

    run_config.update(tst=None, converted_from_tst=plan, reset_optimizer=reset_optimizer,
                      reinit_embeddings=reinit_embeddings)
    with open(os.path.join(partial, checkpointing.RUN_CONFIG), "w") as handle:
        json.dump(run_config, handle, indent=2, sort_keys=True)
    os.replace(partial, final)
    tracker = os.path.join(destination, checkpointing.TRACKER)
    with open(tracker + ".tmp", "w") as handle:
        handle.write(str(iteration))
    os.replace(tracker + ".tmp", tracker)
    return final


def _link_tree(source: str, destination: str, rewritten: tuple[str, ...]) -> None:
    """``destination`` as ``source`` with every file hard-linked (the model and optimizer shards,
    140 GB for 10B-A1B, are identical in both phases), except the top-level ``rewritten`` files,
    which the caller writes as new files. Hard links need one filesystem; elsewhere files are copied."""
    os.makedirs(destination)
    for folder, subfolders, files in os.walk(source):
        target = os.path.join(destination, os.path.relpath(folder, source))
        for name in subfolders:
            os.makedirs(os.path.join(target, name), exist_ok=True)
        for name in files:
            if folder == source and name in rewritten:
                continue
            try:
                os.link(os.path.join(folder, name), os.path.join(target, name))
            except OSError:  # another filesystem, or one without hard links
                shutil.copy2(os.path.join(folder, name), os.path.join(target, name))

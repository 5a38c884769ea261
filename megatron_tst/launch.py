"""Two-phase TST in one command: ``python -m megatron_tst.launch [launcher options] <pretrain flags>``.

1. The superposition job (``megatron_tst.pretrain`` with the TST flags and
   ``--exit-at-phase-switch``) trains up to the switch iteration r*T and saves under
   ``<save>/superposition``.
2. ``tools/convert_checkpoint.py tst-to-ntp`` logic converts that checkpoint into
   ``<save>/recovery`` (weights, optimizer and scheduler kept unless --reset-optimizer; the data
   position kept so recovery reads unseen data; the TST state removed).
3. The recovery job, in fresh processes and without the TST flags, trains from there to T.

With r = 1 (``--tst-ratio 1``) the run is superposition only: step 1 trains to T and 2-3 are skipped.

Run the same command again after an interruption in either phase: each job resumes from its newest
complete checkpoint and finished steps are skipped. Without TST flags the command is the matched
baseline (one job, ``<save>`` as given). With more than one process per node (or several nodes) the
jobs run under ``torch.distributed.run`` with the given rendezvous options.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from megatron_tst import checkpointing, orphan
from megatron_tst.arguments import check_environment, parse_args
from megatron_tst.conversion import tst_to_ntp

SUPERPOSITION_DIR, RECOVERY_DIR = "superposition", "recovery"
CONVERSION_FAILED = "conversion_failed.txt"  # beside the two phase folders: node 0's reason, for the others
CONVERSION_POLL_S = 5
MARKER_CLOCK_SKEW_S = 60


def launcher_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=int(os.environ.get("NODE_RANK", 0)))
    parser.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR", "127.0.0.1"))
    parser.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT", 29500)))
    parser.add_argument("--shutdown-timeout", type=int, default=300,
                        help="seconds torchrun gives its workers to save after a SIGTERM before killing them")
    parser.add_argument("--conversion-timeout-minutes", type=float, default=30,
                        help="how long nodes other than node 0 wait for its checkpoint conversion")
    parser.add_argument("--reset-optimizer", action="store_true",
                        help="start recovery with fresh optimizer state (the LR schedule continues)")
    parser.add_argument("--export-hf", default=None, metavar="DIR",
                        help="when the run has finished, write the final model as a Hugging Face folder here "
                             "(tools/convert_checkpoint.py to-hf; replaces DIR)")
    parser.add_argument("--reinit-embeddings-at-switch", action="store_true",
                        help="re-initialise the input embedding and output head at the switch, their Adam "
                             "moments zeroed (paper Table 2)")
    return parser


def without_flags(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` without ``--name value`` / ``--name=value`` for each name (every name takes a value)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        flag = arg.split("=", 1)[0]
        if flag in names:
            skip = "=" not in arg
            continue
        kept.append(arg)
    return kept


def run_job(launch, pretrain_argv: list[str], label: str) -> int:
    command = [sys.executable]
    if launch.nproc_per_node * launch.nnodes > 1:
        command += ["-m", "torch.distributed.run", f"--nproc-per-node={launch.nproc_per_node}",
                    f"--nnodes={launch.nnodes}", f"--node-rank={launch.node_rank}",
                    f"--master-addr={launch.master_addr}", f"--master-port={launch.master_port}",
                    # after a SIGTERM, workers finish the step and save: torchrun must not kill them first
                    f"--shutdown-timeout={launch.shutdown_timeout}"]
    command += ["-m", "megatron_tst.pretrain", *pretrain_argv]
    print(f"[launch] {label}: {' '.join(command)}", flush=True)
    job = subprocess.Popen(command, preexec_fn=_die_with_parent)

    def forward(signum, frame):  # SIGTERM / Ctrl-C: the job saves and stops; wait for it, do not die first
        job.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return job.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _die_with_parent() -> None:
    """In the job's process, before it starts: SIGTERM when the launcher dies (Linux), so a job
    whose launcher was killed saves and stops instead of training on unattended (torchrun passes
    the SIGTERM to its workers; a single process takes it as a request to save and exit)."""
    orphan.signal_on_parent_death(signal.SIGTERM)


def wait_for_conversion(phase2: str, marker: str, timeout_minutes: float) -> None:
    """Nodes other than 0: wait on the shared filesystem until node 0's conversion appears in
    ``phase2``, or its failure marker does (then stop with its reason), or the timeout passes."""
    started = time.time()
    while checkpointing.latest_iteration(phase2) is None:
        # a marker older than this wait (less clock skew) was left by an earlier attempt
        if os.path.isfile(marker) and os.path.getmtime(marker) >= started - MARKER_CLOCK_SKEW_S:
            with open(marker) as handle:
                reason = handle.read().strip()
            raise ValueError(f"node 0 could not convert the phase-1 checkpoint ({reason}); fix that and run "
                             f"the same command again on every node ({marker})")
        if time.time() - started > 60 * timeout_minutes:
            raise ValueError(f"node 0 did not convert the phase-1 checkpoint into {phase2} within "
                             f"{timeout_minutes:g} minutes (no checkpoint there and no failure marker {marker}); "
                             "check node 0's log, or raise --conversion-timeout-minutes")
        time.sleep(CONVERSION_POLL_S)


def _write_atomically(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as handle:
        handle.write(text + "\n")
    os.replace(path + ".tmp", path)


def superposition_finished(directory: str, switch_iter: int) -> bool:
    return checkpointing.latest_iteration(directory) == switch_iter


def within_budget(argv: list[str], minutes: float | None, started: float) -> list[str] | None:
    """``argv`` with --exit-duration-in-mins cut to what is left of the launcher's budget (a
    scheduler's wall-clock limit covers both phases and the conversion), None when none is left."""
    if not minutes:
        return argv
    left = minutes - (time.time() - started) / 60
    if left <= 0:
        return None
    return without_flags(argv, ("--exit-duration-in-mins",)) + ["--exit-duration-in-mins", repr(left)]


def main(argv=None) -> int:
    started = time.time()
    launch, pretrain_argv = launcher_parser().parse_known_args(argv)
    try:
        config = parse_args(pretrain_argv)  # validate everything before any job starts
        check_environment(config)
        if not config.checkpoint.save:
            raise ValueError("the launcher needs --save (the run's checkpoint directory)")
        plan = config.tst.plan(config.training.train_iters)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if plan is None:  # the matched baseline: one ordinary job
        return export_hf(launch, run_job(launch, pretrain_argv, "baseline"), config.checkpoint.save,
                         config.training.train_iters)

    root = config.checkpoint.save
    phase1, phase2 = os.path.join(root, SUPERPOSITION_DIR), os.path.join(root, RECOVERY_DIR)
    common = without_flags(pretrain_argv, ("--save", "--load", "--wandb-save-dir")) + one_wandb_run(config, root)
    if checkpointing.latest_iteration(phase2) is None:
        if not superposition_finished(phase1, plan.switch_iter):
            phase1_argv = common + ["--save", phase1, "--exit-at-phase-switch"]
            if config.checkpoint.load:
                phase1_argv += ["--load", config.checkpoint.load]
            code = run_job(launch, phase1_argv, f"phase 1: superposition to iteration {plan.switch_iter}")
            if code:
                return code
            if not superposition_finished(phase1, plan.switch_iter):
                print(f"[launch] phase 1 stopped before the switch (checkpoint at iteration "
                      f"{checkpointing.latest_iteration(phase1)}); run the same command to resume", flush=True)
                return 0
        if not plan.has_recovery:  # r = 1: a superposition-only run ends with phase 1
            print(f"[launch] r=1: superposition-only run finished at iteration {plan.total_iters}; "
                  "no recovery phase", flush=True)
            return 0
        marker = os.path.join(root, CONVERSION_FAILED)
        try:
            if launch.node_rank == 0:
                try:
                    converted = tst_to_ntp(phase1, phase2, reset_optimizer=launch.reset_optimizer,
                                           reinit_embeddings=launch.reinit_embeddings_at_switch)
                except Exception as error:  # tell the other nodes, which wait for this conversion
                    if launch.nnodes > 1:
                        _write_atomically(marker, " ".join(f"{type(error).__name__}: {error}".split()))
                    raise
                if os.path.exists(marker):
                    os.remove(marker)
                print(f"[launch] converted the switch checkpoint into {converted}", flush=True)
            else:  # the other nodes wait for node 0's conversion on the shared filesystem
                wait_for_conversion(phase2, marker, launch.conversion_timeout_minutes)
        except (ValueError, OSError) as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            return 1
    mismatch = recovery_plan_mismatch(phase2, plan)
    if mismatch:  # the recovery job runs without the TST flags, so it cannot see this itself
        print(f"error: {mismatch}", file=sys.stderr, flush=True)
        return 1
    recovery_argv = within_budget(without_flags(common, ("--tst-bag-size", "--tst-ratio", "--tst-iters",
                                                         "--tst-loss-weighting", "--tst-mode")) + ["--save", phase2],
                                  config.training.exit_duration_in_mins, started)
    if recovery_argv is None:
        print("[launch] --exit-duration-in-mins is spent before the recovery job; run the same command to resume",
              flush=True)
        return 0
    code = run_job(launch, recovery_argv, f"phase 2: next-token recovery to iteration {plan.total_iters}")
    return export_hf(launch, code, phase2, plan.total_iters)


def one_wandb_run(config, root: str) -> list[str]:
    """With --wandb-project: both jobs log into one W&B run, whose id the launcher makes now and
    keeps in their shared --wandb-save-dir (default <save>/wandb, not each phase's own <save>)."""
    if not config.logging.wandb_project:
        return []
    from megatron_tst import logging_wandb

    directory = logging_wandb.save_dir(config.logging, root)
    logging_wandb.run_id(directory)
    return ["--wandb-save-dir", directory]


def recovery_plan_mismatch(phase2: str, plan) -> str | None:
    """How the TST flags differ from the plan the recovery checkpoints were made with, or None."""
    iteration = checkpointing.latest_iteration(phase2)
    if iteration is None:
        return None
    import torch

    directory = checkpointing.checkpoint_dir(phase2, iteration)
    try:
        saved = torch.load(os.path.join(directory, "common.pt"), weights_only=False)["common"]["data_identity"]["tst"]
    except Exception:  # a damaged checkpoint: the recovery job names what is wrong with it
        return None
    current = dict(bag_size=plan.bag_size, switch_iter=plan.switch_iter, total_iters=plan.total_iters,
                   mode=plan.mode, loss_weighting=plan.loss_weighting)
    for key, value in current.items():
        if saved and key in saved and saved[key] != value:
            return (f"cannot resume from {directory}: tst.{key} is {value!r} but the checkpoint was made with "
                    f"{saved[key]!r}; run with the checkpoint's settings, or give another --save directory "
                    "to start a new run")
    return None


def export_hf(launch, code: int, save: str, total_iters: int) -> int:
    """With --export-hf, node 0 exports the finished run's final checkpoint; a stopped run exports nothing."""
    if code or not launch.export_hf or launch.node_rank != 0:
        return code
    if checkpointing.latest_iteration(save) != total_iters:
        print(f"[launch] the run has not reached iteration {total_iters}; no Hugging Face export yet", flush=True)
        return code
    from megatron_tst.hf_conversion import ConversionError, to_hf

    try:
        written = to_hf(save, launch.export_hf, overwrite=True)
    except (ConversionError, OSError) as error:
        print(f"error: Hugging Face export failed: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        return 1
    print(f"[launch] exported the final model to {written}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

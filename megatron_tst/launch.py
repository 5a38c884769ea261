"""Two-phase TST in one command: ``python -m megatron_tst.launch [launcher options] <pretrain flags>``.

1. The superposition job (``megatron_tst.pretrain`` with the TST flags and
   ``--exit-at-phase-switch``) trains up to the switch iteration r*T and saves under
   ``<save>/superposition``.
2. ``tools/convert_checkpoint.py tst-to-ntp`` logic converts that checkpoint into
   ``<save>/recovery`` (weights, optimizer and scheduler kept unless --reset-optimizer; the data
   position kept so recovery reads unseen data; the TST state removed).
3. The recovery job, in fresh processes and without the TST flags, trains from there to T.

Run the same command again after an interruption in either phase: each job resumes from its newest
complete checkpoint and finished steps are skipped. Without TST flags the command is the matched
baseline (one job, ``<save>`` as given). With more than one process per node (or several nodes) the
jobs run under ``torch.distributed.run`` with the given rendezvous options.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from megatron_tst import checkpointing
from megatron_tst.arguments import parse_args
from megatron_tst.conversion import tst_to_ntp

SUPERPOSITION_DIR, RECOVERY_DIR = "superposition", "recovery"


def launcher_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=int(os.environ.get("NODE_RANK", 0)))
    parser.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR", "127.0.0.1"))
    parser.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT", 29500)))
    parser.add_argument("--reset-optimizer", action="store_true",
                        help="start recovery with fresh optimizer state (the LR schedule continues)")
    parser.add_argument("--reinit-embeddings-at-switch", action="store_true",
                        help="re-initialise the input embedding and output head at the switch (paper Table 2)")
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
                    f"--master-addr={launch.master_addr}", f"--master-port={launch.master_port}"]
    command += ["-m", "megatron_tst.pretrain", *pretrain_argv]
    print(f"[launch] {label}: {' '.join(command)}", flush=True)
    return subprocess.call(command)


def superposition_finished(directory: str, switch_iter: int) -> bool:
    return checkpointing.latest_iteration(directory) == switch_iter


def main(argv=None) -> int:
    launch, pretrain_argv = launcher_parser().parse_known_args(argv)
    try:
        config = parse_args(pretrain_argv)  # validate everything before any job starts
        if not config.checkpoint.save:
            raise ValueError("the launcher needs --save (the run's checkpoint directory)")
        plan = config.tst.plan(config.training.train_iters)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if plan is None:  # the matched baseline: one ordinary job
        return run_job(launch, pretrain_argv, "baseline")

    root = config.checkpoint.save
    phase1, phase2 = os.path.join(root, SUPERPOSITION_DIR), os.path.join(root, RECOVERY_DIR)
    common = without_flags(pretrain_argv, ("--save", "--load"))
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
        if launch.node_rank == 0:
            converted = tst_to_ntp(phase1, phase2, reset_optimizer=launch.reset_optimizer,
                                   reinit_embeddings=launch.reinit_embeddings_at_switch)
            print(f"[launch] converted the switch checkpoint into {converted}", flush=True)
        else:  # the other nodes wait for node 0's conversion on the shared filesystem
            while checkpointing.latest_iteration(phase2) is None:
                time.sleep(5)
    recovery_argv = without_flags(common, ("--tst-bag-size", "--tst-ratio", "--tst-iters",
                                           "--tst-loss-weighting", "--tst-mode")) + ["--save", phase2]
    return run_job(launch, recovery_argv, f"phase 2: next-token recovery to iteration {plan.total_iters}")


if __name__ == "__main__":
    sys.exit(main())

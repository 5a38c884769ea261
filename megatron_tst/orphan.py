"""A torchrun worker whose torchrun died (killed, or its node's launcher gone) must not train on
unattended: it is asked to save and stop, as by SIGTERM. torchrun starts its workers in their own
sessions, so killing torchrun's process group does not reach them; the launcher covers its own
child with PR_SET_PDEATHSIG (launch.py), this covers torchrun's."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time


def stop_when_orphaned(poll_seconds: float = 1.0) -> None:
    """Under torchrun: SIGTERM this process once its parent (torchrun) is gone. Only there: a run
    started by hand under nohup outlives its shell on purpose."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:  # a dead parent's children are re-parented
            time.sleep(poll_seconds)
        print(f"[rank {os.environ.get('RANK', '?')}] torchrun (pid {parent}) is gone: saving and stopping",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="orphan-watchdog", daemon=True).start()


def signal_on_parent_death(signum: int) -> None:
    """This process gets ``signum`` when the thread that started it ends (Linux PR_SET_PDEATHSIG);
    elsewhere nothing happens."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum))
    except (OSError, AttributeError):  # not Linux: no parent-death signal
        pass


def keep_helper_through_job_signals() -> None:
    """In a helper process of a job (megatron-core's checkpoint-writer queue server): ignore the
    SIGTERM / Ctrl-C that a scheduler sends to every process of the job (SLURM, Kubernetes, killpg),
    which ask the job to save, a save that needs this helper alive; end with the parent instead, so
    an abnormally ended job leaves no helper behind."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal_on_parent_death(signal.SIGKILL)

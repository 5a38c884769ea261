"""Where megatron-core runs: CUDA/NCCL when present, otherwise CPU/gloo through ``cpu``."""

import os
import re
import sys
import warnings

import torch

from megatron_tst.platform.cpu import install, install_megatron

# megatron-core warns once per module (six times per process, in every rank) that it falls back
# from Transformer Engine and Apex; that is expected without them, so it is said once, in one line.
_FALLBACK_WARNING = re.compile(r"(Transformer Engine and Apex are|Apex is) not installed\. Falling back to ")
FALLBACK_NOTE = ("note: Transformer Engine and Apex are not installed: megatron-core uses its local layer spec, "
                 "torch norms, torch Adam and local multi-tensor ops (on a CUDA machine, pip install -e "
                 "'.[te]' for Transformer Engine)")
_fallback_noted = False


def _first_rank() -> bool:
    """Global rank 0 under torchrun, local rank 0 under a launcher that sets only that, or no launcher."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def quiet_fallback_warnings() -> None:
    """Replace megatron-core's Transformer Engine / Apex fallback warnings by ``FALLBACK_NOTE``, once,
    on the first rank only; every other warning is shown as before. Idempotent."""
    if getattr(warnings.showwarning, "_megatron_tst", False):
        return
    shown_before = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        global _fallback_noted
        if issubclass(category, UserWarning) and _FALLBACK_WARNING.match(str(message)):
            if not _fallback_noted and _first_rank():
                print(FALLBACK_NOTE, file=sys.stderr if file is None else file, flush=True)
            _fallback_noted = True
            return
        shown_before(message, category, filename, lineno, file, line)

    showwarning._megatron_tst = True
    warnings.showwarning = showwarning


def distributed_backend() -> str:
    """The torch.distributed backend for this machine."""
    return "nccl" if torch.cuda.is_available() else "gloo"


__all__ = ["FALLBACK_NOTE", "distributed_backend", "install", "install_megatron", "quiet_fallback_warnings"]

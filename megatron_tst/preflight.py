"""Checks every rank makes before the process groups start.

Some things are used by one rank only: the logging rank imports TensorBoard and writes the metrics,
rank 0 creates the checkpoint folder. Failing there, that rank would exit while the others wait in
a collective until the timeout. Checked on every rank first, the same error stops every rank at once.
Nothing here writes to disk.
"""

from __future__ import annotations

import os

from megatron_tst.arguments import PretrainConfig


def check(config: PretrainConfig) -> None:
    """Raise a one-line ValueError for what would fail later on one rank only."""
    if config.logging.tensorboard_dir:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ValueError("--tensorboard-dir needs the tensorboard package: pip install tensorboard") from None
    for flag, folder in (("--save", config.checkpoint.save), ("--tensorboard-dir", config.logging.tensorboard_dir),
                         ("--data-cache-path", config.data.data_cache_path)):
        if folder:
            _check_creatable(flag, folder)
    if config.data.data_path:
        from megatron_tst.data.tst_datasets import check_indexed_files, resolve_blend

        for prefix in resolve_blend(config.data.data_path)[0]:
            check_indexed_files(prefix)


def _check_creatable(flag: str, folder: str) -> None:
    """``folder`` exists as a writable folder, or could be created (its nearest existing ancestor is
    a writable folder)."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ValueError(f"{flag} {folder} cannot be created: {path} is a file, not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {folder} is not writable here ({path} denies writing); give a folder "
                         "this user can write on every node")

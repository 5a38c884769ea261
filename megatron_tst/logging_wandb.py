"""Weights & Biases logging as Megatron-LM: ``--wandb-project``, ``--wandb-exp-name``,
``--wandb-save-dir`` (default ``<save>/wandb``), ``--wandb-entity``; the last rank logs.

The records are metrics.jsonl's, with the iteration as W&B's step. One W&B run per training run:
its id is kept in ``<wandb save dir>/run_id.txt``, so the same command resumes the same W&B run,
and the two-phase launcher, which creates the id before phase 1 and gives both jobs the same save
dir, logs both phases into it. Offline (WANDB_MODE=offline) each job writes its own
``offline-run-*-<id>`` folder there; ``wandb sync`` uploads them into the one run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import secrets
import string

RUN_ID_FILE = "run_id.txt"


def wandb_problem(logging, save: str | None) -> str | None:
    """Why --wandb-* cannot run here (one line naming the fix), or None. Checked before any process group."""
    given = [flag for flag, value in (("--wandb-exp-name", logging.wandb_exp_name),
                                      ("--wandb-save-dir", logging.wandb_save_dir),
                                      ("--wandb-entity", logging.wandb_entity)) if value]
    if not logging.wandb_project:
        return f"{given[0]} needs --wandb-project; give it, or drop {given[0]}" if given else None
    if not logging.wandb_exp_name:  # Megatron-LM refuses it too
        return "--wandb-project needs --wandb-exp-name (the W&B run's name); give it"
    if importlib.util.find_spec("wandb") is None:
        return ("--wandb-project needs the wandb package, which is not installed: "
                "pip install 'megatron_tst[wandb]', or drop the --wandb-* flags")
    if not logging.wandb_save_dir and not save:
        return "--wandb-project needs --wandb-save-dir or --save (W&B's files go to <save>/wandb)"
    return None


def save_dir(logging, save: str | None) -> str:
    return logging.wandb_save_dir or os.path.join(save, "wandb")


def run_id(directory: str) -> str:
    """The W&B run id kept in ``directory`` (made and stored on the first call)."""
    path = os.path.join(directory, RUN_ID_FILE)
    if os.path.isfile(path):
        with open(path) as handle:
            return handle.read().strip()
    os.makedirs(directory, exist_ok=True)
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id form
    with open(path + ".tmp", "w") as handle:
        handle.write(new + "\n")
    os.replace(path + ".tmp", path)
    return new


class WandbWriter:
    """metrics.jsonl's records into one W&B run (resumed when its id exists)."""

    def __init__(self, config):
        import wandb

        logging = config.logging
        directory = save_dir(logging, config.checkpoint.save)
        self.run = wandb.init(project=logging.wandb_project, entity=logging.wandb_entity,
                              name=logging.wandb_exp_name, dir=directory, id=run_id(directory), resume="allow",
                              config={f"{group}.{key}": value
                                      for group, options in dataclasses.asdict(config).items()
                                      for key, value in options.items()})

    def write(self, record: dict) -> None:
        values = {k: v for k, v in record.items() if k != "iteration" and v is not None}
        self.run.log(values, step=record["iteration"])

    def close(self) -> None:
        self.run.finish()


def open_writer(config, is_logger: bool) -> WandbWriter | None:
    """The W&B writer on the logging rank when --wandb-project is given, else None."""
    if not (is_logger and config.logging.wandb_project):
        return None
    return WandbWriter(config)

"""Weights & Biases as Megatron-LM (--wandb-*), offline (WANDB_MODE=offline, no network): the
launcher's two phases are one W&B run holding every record of metrics.jsonl; bad flags are one line
before any process group."""

import glob
import importlib.util
import json
import os
import struct
import time

import pytest
import torch.distributed as dist

from megatron_tst import launch, logging_wandb, pretrain
from tests.test_pretrain import args, records

needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")


def wandb_records(path):
    """The protobuf records of a .wandb file: W&B's transaction log (LevelDB's log format: a 7-byte
    file header, then 32 KiB blocks of records with a crc32/length/type header, long ones in pieces),
    parsed with W&B's own protobuf schema. wandb 0.31 ships no Python reader of it."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", path
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zero padding up to the block's end (the file was cut off there)
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL, or the LAST piece of a FIRST/MIDDLE.../LAST chain
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def logged_steps(save):
    """Per offline run folder of <save>/wandb (oldest first): (run id, project, name, history rows).
    wandb.init(dir=D) writes under D/wandb."""
    runs = []
    for folder in sorted(glob.glob(os.path.join(save, "wandb", "wandb", "offline-run-*"))):
        (path,) = glob.glob(os.path.join(folder, "run-*.wandb"))
        run, rows = None, []
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = (record.run.run_id, record.run.project, record.run.display_name)
            elif kind == "history":
                row = {item.key or ".".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                rows.append({k: v for k, v in row.items() if not k.startswith("_")}
                            | {"iteration": record.history.step.num})
        runs.append((*run, rows))
    return runs


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"),
                        ("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config")),
                        ("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache")),
                        ("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))):
        monkeypatch.setenv(name, value)


@needs_wandb
@pytest.mark.slow
def test_launcher_logs_both_phases_into_one_offline_wandb_run(corpus, tmp_path, wandb_offline):
    save = str(tmp_path / "run")
    argv = args(corpus, save, "--tst-ratio", "0.5", "--eval-interval", "3", "--wandb-project", "tst",
                "--wandb-exp-name", "tiny", "--seq-length", "16", iters=6)
    assert launch.main(argv) == 0
    with open(os.path.join(save, "wandb", logging_wandb.RUN_ID_FILE)) as handle:
        run_id = handle.read().strip()
    runs = logged_steps(save)
    assert [run[:3] for run in runs] == [(run_id, "tst", "tiny")] * 2  # phase 1's job, then phase 2's: one run

    def jsonl(phase_dir):  # metrics.jsonl's records, a step's validation merged into its row as W&B does
        steps, valid = records(os.path.join(save, phase_dir))
        rows = {row["iteration"]: {k: v for k, v in row.items() if v is not None} for row in steps}
        for row in valid:
            rows[row["iteration"]]["validation_loss"] = row["validation_loss"]
        return list(rows.values())

    def merged(rows):  # W&B writes a step's row once its step is done: one per step
        by_step = {}
        for row in rows:
            by_step.setdefault(row["iteration"], {}).update(row)
        return list(by_step.values())

    phase1, phase2 = merged(runs[0][3]), merged(runs[1][3])
    assert [r["iteration"] for r in phase1 + phase2] == list(range(1, 7))
    assert phase1 == jsonl("superposition") and phase2 == jsonl("recovery")
    assert {r["phase"] for r in phase1} == {"superposition"} and "validation_loss" in phase2[-1]


@needs_wandb
def test_the_same_command_resumes_the_same_wandb_run(corpus, tmp_path, wandb_offline):
    save = str(tmp_path / "run")
    argv = args(corpus, save, "--wandb-project", "tst", "--wandb-exp-name", "tiny", "--eval-interval", "0",
                "--seq-length", "16", iters=4, tst=False)
    started = time.time()
    assert pretrain.main(argv + ["--exit-interval", "2"]) == 0
    time.sleep(max(0.0, 1.1 - (time.time() - started)))  # W&B names offline folders by the second they start
    assert pretrain.main(argv) == 0
    runs = logged_steps(save)
    assert len(runs) == 2 and runs[0][0] == runs[1][0]
    assert [[r["iteration"] for r in run[3]] for run in runs] == [[1, 2], [3, 4]]
    assert [r["loss"] for run in runs for r in run[3]] == [r["loss"] for r in records(save)[0]]


@pytest.mark.parametrize("flags, message", [
    (["--wandb-project", "p"], "--wandb-project needs --wandb-exp-name"),
    (["--wandb-exp-name", "x"], "--wandb-exp-name needs --wandb-project"),
    (["--wandb-entity", "team"], "--wandb-entity needs --wandb-project"),
])
def test_bad_wandb_flags_are_one_line_errors_before_any_process_group(flags, message, corpus, tmp_path, capsys,
                                                                      monkeypatch):
    argv = args(corpus, str(tmp_path / "run"), *flags, iters=2, tst=False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("a process group was started"))
    assert pretrain.main(argv) == 1
    assert launch.main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(f"error: {message}") for line in lines), lines


def test_wandb_project_without_the_package_is_one_line_before_any_process_group(corpus, tmp_path, capsys,
                                                                               monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("a process group was started"))
    argv = args(corpus, str(tmp_path / "run"), "--wandb-project", "p", "--wandb-exp-name", "x", iters=2, tst=False)
    assert pretrain.main(argv) == 1
    assert capsys.readouterr().err == ("error: --wandb-project needs the wandb package, which is not installed: "
                                       "pip install 'megatron_tst[wandb]', or drop the --wandb-* flags\n")

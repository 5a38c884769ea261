"""--async-save: megatron-core's async torch_dist writer (a forked process) on CPU/gloo. The save
returns while the checkpoint is still under its temporary name, is renamed into place when
finalised, holds what a synchronous save writes, and a run resumed from it is bit-identical."""

import json
import os

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from megatron_tst import checkpointing, parallel, pretrain
from megatron_tst.arguments import parse_args


def tensors(directory, tmp_path):
    """A torch_dist checkpoint's tensors and common state, read with torch's own converter."""
    out = str(tmp_path / f"{os.path.basename(os.path.dirname(directory))}.pt")
    dcp_to_torch_save(directory, out)
    return torch.load(out, weights_only=False), torch.load(os.path.join(directory, "common.pt"), weights_only=False)


def test_async_save_returns_early_writes_what_a_sync_save_writes_and_resumes_identically(corpus, tmp_path):
    common = ["--model-preset", "tiny", "--hidden-dropout", "0.1", "--vocab-size", "511", "--tokenizer-type",
              "NullTokenizer", "--data-path", corpus, "--seq-length", "16", "--micro-batch-size", "2",
              "--global-batch-size", "4", "--train-iters", "4", "--lr-warmup-iters", "1", "--log-interval", "1"]

    run = pretrain.setup(parse_args(common))
    try:
        sync_root, async_root = str(tmp_path / "sync"), str(tmp_path / "async")
        args = (run.modules, run.optimizer, run.scheduler, {"step": 1}, {"model": "tiny"})
        checkpointing.save(sync_root, 1, *args)
        final = checkpointing.save(async_root, 1, *args, async_save=True)
        # returned with the writer started: nothing under the final name, no tracker yet
        assert not os.path.exists(final) and os.path.isdir(final + ".tmp")
        assert checkpointing.latest_iteration(async_root) is None
        checkpointing.finalize_async_saves()
        assert checkpointing.latest_iteration(async_root) == 1 and not os.path.exists(final + ".tmp")
        assert checkpointing.damage(final) is None
        (written, common_async), (expected, common_sync) = (
            tensors(final, tmp_path), tensors(checkpointing.checkpoint_dir(sync_root, 1), tmp_path))
        assert written.keys() == expected.keys() and len(written) > 10
        assert all(torch.equal(written[k], expected[k]) if torch.is_tensor(expected[k]) else written[k] == expected[k]
                   for k in expected)
        assert common_async == common_sync
    finally:
        parallel.shutdown()

    def losses(save):
        with open(os.path.join(save, "metrics.jsonl")) as handle:
            return [row["loss"] for row in map(json.loads, handle) if "loss" in row]

    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    assert pretrain.main(common + ["--save", whole]) == 0
    # saved asynchronously at every step (each finalised before the next), stopped at 2, resumed from it
    background = common + ["--save", resumed, "--async-save", "--save-interval", "1"]
    queued = checkpointing._async_queue.call_idx  # the first part's one async save
    assert pretrain.main(background + ["--exit-interval", "2"]) == 0
    assert checkpointing.latest_iteration(resumed) == 2  # published before the process ended
    assert pretrain.main(background) == 0
    assert checkpointing.latest_iteration(resumed) == 4
    assert checkpointing._async_queue.call_idx == queued + 4  # all four through megatron-core's async queue
    assert sorted(name for name in os.listdir(resumed) if name.startswith("iter_")) == [
        f"iter_{i:07d}" for i in range(1, 5)]  # no temporary folder left
    assert losses(resumed) == losses(whole) and len(losses(whole)) == 4  # dropout on: RNG resumed too


def test_megatron_lm_async_save_flags_parse_and_help_says_what_they_do(capsys):
    # Megatron-LM 0.16.1 keeps --async-save only with --use-persistent-ckpt-worker: its scripts pass both
    config = parse_args(["--model-preset", "tiny", "--seq-length", "32", "--async-save",
                         "--use-persistent-ckpt-worker"])
    assert config.checkpoint.async_save
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--use-persistent-ckpt-worker accepted, no effect: --async-save forks a writer per save" in text

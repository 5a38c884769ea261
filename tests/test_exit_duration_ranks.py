"""--exit-duration-in-mins across ranks (gloo, DP=2): the rank whose clock runs out decides for all
(an all-reduce of the decision, as Megatron-LM), every rank saves and stops after the same step,
and the same command resumes bit-identically; its checkpoints written with --async-save on both
ranks, the run in fp16 with the distributed optimizer (its shards, the loss scale)."""

import json
import os

import pytest

from megatron_tst.arguments import parse_args
from megatron_tst.pretrain import build_data, pretrain, resume, setup, train
from tests.distributed import run_distributed


def exit_duration_worker(rank, world_size, common, whole, stopped):
    pretrain(parse_args(common + ["--save", whole]))
    stops = []
    for _ in range(3):  # the same command, three times
        # --async-save too: two ranks' background writers, finalised together before the exit
        run = setup(parse_args(common + ["--save", stopped, "--exit-duration-in-mins", "1e-9", "--async-save"]))
        if rank == 1:  # this rank's clock is far from the budget: only rank 0's runs out
            run.started += 3600
        resume(run)
        run.data = build_data(run)
        result = train(run)
        stops.append((result["iteration"], result["stopped"]))
    return stops


@pytest.mark.slow
def test_exit_duration_stops_every_rank_together_and_resumes_bit_identically(corpus, tmp_path):
    common = ["--model-preset", "tiny", "--hidden-dropout", "0.1", "--vocab-size", "511", "--tokenizer-type",
              "NullTokenizer", "--data-path", corpus, "--seq-length", "16", "--micro-batch-size", "2",
              "--global-batch-size", "4", "--train-iters", "3", "--log-interval", "1",
              "--distributed-timeout-minutes", "2",
              # and fp16 with megatron-core's distributed optimizer sharded over the two ranks (issue 21)
              "--fp16", "--initial-loss-scale", "256", "--loss-scale-window", "1", "--use-distributed-optimizer"]
    whole, stopped = str(tmp_path / "whole"), str(tmp_path / "stopped")
    stops = run_distributed(exit_duration_worker, 2, common, whole, stopped, timeout=300)
    # each rank: saved and stopped after one step, three times, on rank 0's budget alone
    assert stops == [[(1, "exit duration"), (2, "exit duration"), (3, "exit duration")]] * 2
    assert sorted(os.listdir(os.path.join(stopped, "iter_0000003", "rng"))) == ["rank_0.pt", "rank_1.pt"]

    def losses(save):
        with open(os.path.join(save, "metrics.jsonl")) as handle:
            return [(row["iteration"], row["loss"]) for row in map(json.loads, handle) if "loss" in row]

    assert losses(stopped) == losses(whole) and len(losses(whole)) == 3  # dropout on: RNG resumed per rank
    with open(os.path.join(whole, "metrics.jsonl")) as handle:
        assert all(row["grad_norm"] is not None for row in map(json.loads, handle) if "loss" in row)  # fp16 updated

"""The pretraining entry end to end on CPU: two phases, one WSD schedule, resume, layouts, errors."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from megatron_tst.arguments import parse_args
from megatron_tst.pretrain import main, pretrain
from tests.conftest import NULL_VOCAB, VOCAB
from tests.distributed import run_distributed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def args(corpus, save, *extra, iters=24, tst=True):
    # tied unless asked otherwise: the shared-table paths (embedding group, tied gradients) then run
    tie = [] if "--untie-embeddings-and-output-weights" in extra else ["--tie-embeddings-and-output-weights"]
    argv = ["--model-preset", "tiny", *tie, "--vocab-size", str(NULL_VOCAB), "--tokenizer-type", "NullTokenizer",
            "--data-path", corpus, "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "8",
            "--train-iters", str(iters), "--lr", "3e-3", "--lr-warmup-iters", "3", "--log-interval", "1",
            "--eval-interval", "12", "--eval-iters", "2", "--save", save]
    if tst:
        argv += ["--tst-bag-size", "4", "--tst-ratio", "0.25"]
    return argv + list(extra)


def records(save):
    with open(os.path.join(save, "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle]
    return [r for r in rows if "loss" in r], [r for r in rows if "validation_loss" in r]


def run_worker(rank, world_size, argv):
    return pretrain(parse_args(argv))


def run(argv, world_size=1):
    return run_distributed(run_worker, world_size, argv)[-1]


def test_two_phase_run_switches_at_r_T_on_one_wsd_schedule(corpus, tmp_path, tst_run):
    tst_dir, base_dir = tst_run, str(tmp_path / "base")
    run(args(corpus, base_dir, tst=False))
    steps, valid = records(tst_dir)
    base_steps, _ = records(base_dir)
    assert [r["iteration"] for r in steps] == list(range(1, 25))
    assert [r["phase"] for r in steps] == ["superposition"] * 6 + ["recovery"] * 18  # r*T = 6
    assert [r["lr"] for r in steps] == [r["lr"] for r in base_steps]  # the same single WSD schedule
    lrs = [r["lr"] for r in steps]
    assert lrs[0] == pytest.approx(1e-3) and lrs[10] == pytest.approx(3e-3) and lrs[-1] == pytest.approx(0.0)
    # phase 1 eats s times the raw tokens per step; the model sees the same positions per step
    assert steps[5]["raw_tokens"] == 6 * 8 * 32 * 4 and steps[6]["raw_tokens"] - steps[5]["raw_tokens"] == 8 * 32
    assert steps[-1]["latent_positions"] == 24 * 8 * 32
    assert all(r["loss_minus_target_entropy"] == pytest.approx(r["loss"] - np.log(4)) for r in steps[:6])
    assert all(r["loss_minus_target_entropy"] is None for r in steps[6:])
    assert steps[-1]["loss"] < steps[6]["loss"]  # recovery learns
    assert [v["iteration"] for v in valid] == [12, 24] and all(v["validation_loss"] < np.log(VOCAB) for v in valid)
    for field in ("iteration", "phase", "loss", "loss_minus_target_entropy", "lr", "grad_norm", "raw_tokens",
                  "latent_positions", "model_flops", "tokens_per_s", "step_time_s", "mfu"):
        assert field in steps[0]
    config = json.load(open(os.path.join(tst_dir, "iter_0000024", "run_config.json")))
    assert config["tst"]["switch_iter"] == 6 and config["model"]["hidden_size"] == 64


def test_killed_mid_phase_and_resumed_is_bitwise_identical(corpus, tmp_path, tst_run):
    whole, interrupted = tst_run, str(tmp_path / "interrupted")
    result = run(args(corpus, interrupted, "--exit-interval", "4"))  # stops mid phase 1
    assert result["iteration"] == 4 and result["stopped"] == "exit interval"
    run(args(corpus, interrupted, "--exit-interval", "10"))  # resumes, stops mid phase 2
    run(args(corpus, interrupted))  # the same command again finishes the run
    assert [r["loss"] for r in records(whole)[0]] == [r["loss"] for r in records(interrupted)[0]]
    assert [r["validation_loss"] for r in records(whole)[1]] == [r["validation_loss"] for r in records(interrupted)[1]]


def test_sigterm_saves_a_checkpoint_before_exiting(corpus, tmp_path):
    save = str(tmp_path / "run")
    process = subprocess.Popen([sys.executable, "-m", "megatron_tst.pretrain", *args(corpus, save, "--allow-data-repetition", iters=5000)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen = []
    while True:  # wait for training to be under way (readline: no read-ahead lost to communicate)
        line = process.stdout.readline()
        seen.append(line)
        if not line or (" iteration " in line and "| loss" in line):
            break
    process.send_signal(signal.SIGTERM)
    output = "".join(seen) + process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    tracker = open(os.path.join(save, "latest_checkpointed_iteration.txt")).read()
    assert int(tracker) >= 1 and os.path.isdir(os.path.join(save, f"iter_{int(tracker):07d}"))
    assert not [name for name in os.listdir(save) if name.endswith(".tmp")]


def test_tensor_parallel_2_run_and_its_checkpoint_loads_at_tp_1(corpus, tmp_path, tst_run):
    single, split = tst_run, str(tmp_path / "tp2")
    run(args(corpus, split, "--tensor-model-parallel-size", "2", "--exit-interval", "8"), world_size=2)
    run(args(corpus, split))  # resume the TP=2 checkpoint at TP=1
    reference, resumed = records(single)[0], records(split)[0]
    assert [r["phase"] for r in resumed] == [r["phase"] for r in reference]
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in reference], rtol=2e-4)


def test_pipeline_parallel_2_two_phase_run_from_a_pp_1_checkpoint(corpus, tmp_path):
    """PP layouts initialise differently (megatron seeds each stage), so both runs start from the
    same PP=1 checkpoint at iteration 2 and must then agree through the phase switch."""
    single, piped = str(tmp_path / "pp1"), str(tmp_path / "pp2")
    run(args(corpus, single, "--exit-interval", "2", iters=12))
    shutil.copytree(single, piped)
    run(args(corpus, single, iters=12))
    run(args(corpus, piped, "--pipeline-model-parallel-size", "2", iters=12), world_size=2)
    reference, piped_steps = records(single)[0], records(piped)[0]
    assert [r["phase"] for r in piped_steps] == [r["phase"] for r in reference]
    np.testing.assert_allclose([r["loss"] for r in piped_steps], [r["loss"] for r in reference], rtol=2e-4)


@pytest.mark.parametrize("extra,message", [
    (["--tst-ratio", "1.5"], "TST ratio r must be in (0, 1], got 1.5"),
    (["--tst-bag-size", "0"], "bag size s must be an integer >= 1, got 0"),
    (["--train-iters", "100000"], "corpus too small for the planned run: the superposition phase reads"),
    (["--seq-length", "4096"], "--seq-length 4096 exceeds --max-position-embeddings 256"),
])
def test_flag_errors_are_one_line(corpus, tmp_path, capsys, extra, message):
    argv = args(corpus, str(tmp_path / "bad"), tst=False) + ["--tst-bag-size", "4", "--tst-ratio", "0.25"] + extra
    assert main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and "\n" not in error


def test_checkpoint_of_another_model_shape_is_refused(corpus, tmp_path, capsys, tst_run):
    assert main(args(corpus, str(tmp_path / "other"), "--load", tst_run, "--hidden-size", "128", iters=4)) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "another" in error and "\n" not in error


def test_moe_expert_parallel_with_distributed_optimizer_resumes_exactly(corpus, tmp_path):
    """tiny-moe at EP=2 (alltoall) with the distributed optimizer over 2 data-parallel ranks: a run
    interrupted mid phase 1 and resumed retraces the uninterrupted one."""
    whole, interrupted = str(tmp_path / "whole"), str(tmp_path / "interrupted")
    moe = ["--model-preset", "tiny-moe", "--expert-model-parallel-size", "2", "--use-distributed-optimizer"]
    run(args(corpus, whole, *moe, iters=12), world_size=2)
    run(args(corpus, interrupted, *moe, "--exit-interval", "2", iters=12), world_size=2)
    run(args(corpus, interrupted, *moe, iters=12), world_size=2)
    assert [r["loss"] for r in records(whole)[0]] == [r["loss"] for r in records(interrupted)[0]]
    assert records(whole)[0][-1]["loss"] < records(whole)[0][0]["loss"]


def test_peak_flops_gives_mfu_and_tensorboard_is_optional(corpus, tmp_path, capsys):
    save, board = str(tmp_path / "run"), str(tmp_path / "tb")
    run(args(corpus, save, "--peak-flops", "1e11", iters=4))
    steps, _ = records(save)
    assert all(0 < r["mfu"] < 1 for r in steps)
    argv = args(corpus, str(tmp_path / "tb_run"), "--tensorboard-dir", board, iters=4)
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert main(argv) == 1
        assert "--tensorboard-dir needs the tensorboard package: pip install tensorboard" in capsys.readouterr().err
        return
    run(argv)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(board))


def test_a_nan_loss_stops_the_run_naming_the_iteration(corpus, tmp_path, capsys):
    save = str(tmp_path / "run")
    assert main(args(corpus, save, "--lr", "1e30", "--clip-grad", "0", "--lr-warmup-iters", "0", iters=8)) == 1
    error = capsys.readouterr().err.strip()
    assert re.fullmatch(r"error: loss is (nan|inf) at iteration \d+ \((superposition|recovery) phase\); "
                        r"stopping without saving\. .*", error), error
    assert not os.path.exists(os.path.join(save, "latest_checkpointed_iteration.txt"))


def test_output_layer_loss_fusion_trains_as_the_unfused_layer_at_tp_2(corpus, tmp_path):
    """--output-layer-loss-fusion through the pretraining entry at TP=2 (tied table, both phases,
    8 steps): the per-step losses of the unfused run within 1e-5 (fp32), by another computation."""
    runs = {}
    for fused in (False, True):
        save = str(tmp_path / f"fused{fused}")
        extra = ["--tensor-model-parallel-size", "2"] + (["--output-layer-loss-fusion"] if fused else [])
        run(args(corpus, save, *extra, iters=8), world_size=2)
        runs[fused] = records(save)[0]
    plain, fused = runs[False], runs[True]
    assert [r["phase"] for r in fused] == [r["phase"] for r in plain] == ["superposition"] * 2 + ["recovery"] * 6
    for a, b in zip(plain, fused):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["iteration"]
    assert any(a["loss"] != b["loss"] for a, b in zip(plain, fused))  # the fused op did run

"""Many ranks, many nodes: a failure on one rank stops every rank with the same one-line error; the
launcher's other nodes learn of node 0's failed conversion; the conversion hard-links the shards and
survives an interruption; one note instead of megatron-core's fallback warnings."""

import contextlib
import io
import os
import subprocess
import sys
import time

import pytest
import torch

from megatron_tst import checkpointing, launch
from megatron_tst.conversion import tst_to_ntp
from megatron_tst.platform import FALLBACK_NOTE
from megatron_tst.pretrain import main
from tests.distributed import run_distributed
from tests.test_pretrain import args, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def main_on_rank(rank, world_size, argv, per_rank_extra):
    """``pretrain.main`` on one rank: (exit status, the error lines it printed, seconds it took)."""
    stderr = io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stderr(stderr):
        code = main(argv + per_rank_extra.get(rank, []))
    errors = [line for line in stderr.getvalue().splitlines() if line.startswith("error: ")]
    return code, errors, time.monotonic() - started


def run_ranks(argv, per_rank_extra=None, world_size=2):
    return run_distributed(main_on_rank, world_size, argv, per_rank_extra or {}, timeout=300)


def assert_every_rank_failed_alike(results, fragment):
    codes, errors = [r[0] for r in results], [r[1] for r in results]
    assert codes == [1] * len(results), results
    assert all(len(e) == 1 for e in errors) and len({e[0] for e in errors}) == 1, errors
    assert fragment in errors[0][0], errors[0][0]
    # promptly: not after the collective timeout (one minute here)
    assert max(r[2] for r in results) < 50, results


def test_a_dataset_build_failure_on_rank_0_stops_every_rank(corpus, tmp_path):
    argv = args(corpus, str(tmp_path / "run"), "--distributed-timeout-minutes", "1", iters=100000)
    assert_every_rank_failed_alike(run_ranks(argv), "corpus too small for the planned run")


def test_a_cache_folder_that_is_not_shared_is_named(corpus, tmp_path):
    """Each rank sees its own --data-cache-path, as nodes with a node-local cache would."""
    argv = args(corpus, str(tmp_path / "run"), "--distributed-timeout-minutes", "1", iters=4)
    results = run_ranks(argv, {0: ["--data-cache-path", str(tmp_path / "node0")],
                               1: ["--data-cache-path", str(tmp_path / "node1")]})
    assert_every_rank_failed_alike(results, f"the dataset index cache {tmp_path / 'node1'} is not shared: rank 1")
    assert not [name for name in os.listdir(tmp_path / "node0") if name.startswith(".shared-probe")]


def test_what_only_one_rank_uses_is_checked_on_every_rank(corpus, tmp_path):
    (tmp_path / "a_file").write_text("")
    argv = args(corpus, str(tmp_path / "a_file" / "run"), "--distributed-timeout-minutes", "1", iters=4)
    assert_every_rank_failed_alike(run_ranks(argv), f"--save {tmp_path / 'a_file' / 'run'} cannot be created")
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:  # only the logging rank (the last) would import it
        argv = args(corpus, str(tmp_path / "run"), "--tensorboard-dir", str(tmp_path / "tb"),
                    "--distributed-timeout-minutes", "1", iters=4)
        assert_every_rank_failed_alike(run_ranks(argv), "--tensorboard-dir needs the tensorboard package")


def test_distributed_timeout_reaches_the_process_group():
    from torch.distributed.distributed_c10d import _get_default_group

    from megatron_tst import parallel
    from megatron_tst.arguments import parse_args

    assert parse_args(["--model-preset", "tiny", "--seq-length", "32"]).parallel.distributed_timeout_minutes == 10  # Megatron-LM's
    parallel.initialize(timeout_minutes=0.25)
    try:
        assert _get_default_group()._get_backend(torch.device("cpu")).options._timeout.total_seconds() == 15
    finally:
        parallel.shutdown()


# -- the two-phase launcher across nodes -------------------------------------------------------------

@pytest.fixture(scope="module")
def phase1_done(corpus, tmp_path_factory):
    """A launcher save folder whose phase 1 reached the switch (iteration 6 of 24)."""
    root = str(tmp_path_factory.mktemp("launched") / "run")
    run(args(corpus, os.path.join(root, launch.SUPERPOSITION_DIR), "--exit-at-phase-switch"))
    return root


def copy_run(root, tmp_path):
    import shutil

    copy = str(tmp_path / "run")
    shutil.copytree(root, copy)
    return copy


def test_other_nodes_stop_with_node_0s_conversion_failure(corpus, phase1_done, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(launch, "CONVERSION_POLL_S", 0.1)
    root = copy_run(phase1_done, tmp_path)
    shard = os.path.join(root, launch.SUPERPOSITION_DIR, "iter_0000006", "__0_0.distcp")
    os.truncate(shard, 100)
    nodes = ["--nnodes", "2", "--master-port", "29655"]
    assert launch.main(nodes + ["--node-rank", "0"] + args(corpus, root)) == 1
    node0 = capsys.readouterr().err.strip().splitlines()[-1]
    assert node0.startswith("error: checkpoint ") and "is damaged" in node0
    marker = os.path.join(root, launch.CONVERSION_FAILED)
    assert "is damaged" in open(marker).read()
    assert launch.main(nodes + ["--node-rank", "1", "--conversion-timeout-minutes", "0.5"] + args(corpus, root)) == 1
    node1 = capsys.readouterr().err.strip().splitlines()[-1]
    assert node1.startswith("error: node 0 could not convert the phase-1 checkpoint (CheckpointError: checkpoint ")
    assert marker in node1


def test_other_nodes_give_up_after_the_conversion_timeout(corpus, phase1_done, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(launch, "CONVERSION_POLL_S", 0.1)
    root = copy_run(phase1_done, tmp_path)
    stale = os.path.join(root, launch.CONVERSION_FAILED)  # an earlier attempt's marker is not this one's
    with open(stale, "w") as handle:
        handle.write("an old failure\n")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    started = time.monotonic()
    assert launch.main(["--nnodes", "2", "--node-rank", "1", "--conversion-timeout-minutes", "0.05",
                        *args(corpus, root)]) == 1
    assert time.monotonic() - started < 30
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: node 0 did not convert the phase-1 checkpoint into ") and "0.05 minutes" in error


def test_conversion_hard_links_shards_and_rewrites_only_what_changes(phase1_done, tmp_path):
    source = os.path.join(phase1_done, launch.SUPERPOSITION_DIR)
    source_dir = os.path.join(source, "iter_0000006")
    before = {name: open(os.path.join(source_dir, name), "rb").read() for name in ("common.pt", "run_config.json")}
    final = tst_to_ntp(source, str(tmp_path / "recovery"))
    for folder, _, files in os.walk(source_dir):
        for name in files:
            original = os.path.join(folder, name)
            converted = os.path.join(final, os.path.relpath(original, source_dir))
            same_inode = os.stat(original).st_ino == os.stat(converted).st_ino
            assert same_inode == (name not in ("common.pt", "run_config.json")), converted
    for name, content in before.items():  # the rewritten files are new files: the source is intact
        assert open(os.path.join(source_dir, name), "rb").read() == content
    common = torch.load(os.path.join(final, "common.pt"), weights_only=False)["common"]
    assert common["tst_state"] is None and common["converted_from"]["tst_state"]["switch_iter"] == 6


@pytest.mark.parametrize("left_behind", ["partial", "renamed_without_tracker"])
def test_a_conversion_interrupted_half_way_is_redone(phase1_done, tmp_path, left_behind):
    source = os.path.join(phase1_done, launch.SUPERPOSITION_DIR)
    destination = str(tmp_path / "recovery")
    final = tst_to_ntp(source, destination)
    os.remove(os.path.join(destination, checkpointing.TRACKER))
    if left_behind == "partial":  # killed while linking: a half-filled iter_0000006.tmp
        os.rename(final, final + ".tmp")
        os.remove(os.path.join(final + ".tmp", "common.pt"))
    assert tst_to_ntp(source, destination) == final
    assert checkpointing.latest_iteration(destination) == 6 and checkpointing.damage(final) is None
    assert sorted(os.listdir(destination)) == ["iter_0000006", checkpointing.TRACKER]


# -- clean output ---------------------------------------------------------------------------------

def test_fallback_warnings_become_one_note_from_one_rank(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("import warnings\nimport megatron_tst\nfrom megatron_tst import parallel\n"
                      "parallel.initialize()\nimport megatron.core.optimizer\n"
                      "from megatron.core.models.gpt import gpt_layer_specs\n"
                      "warnings.warn('a real warning')\nparallel.shutdown()\n")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                             "--master-port=29657", str(script)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"})
    assert result.returncode == 0, result.stderr
    assert "not installed. Falling back" not in result.stderr, result.stderr
    assert result.stderr.count(FALLBACK_NOTE) == 1, result.stderr
    assert result.stderr.count("UserWarning: a real warning") == 2, result.stderr


def test_an_index_cache_file_cut_short_by_a_kill_is_rebuilt(corpus, tmp_path):
    """megatron-core writes its index .npy files in place; one truncated by a kill must not make
    every later run crash."""
    import shutil

    from megatron_tst.data import DataConfig, TSTData
    from megatron_tst.tst import TSTPlan
    from tests.conftest import EOD, VOCAB

    prefix = str(tmp_path / "arith")
    for suffix in (".bin", ".idx"):
        shutil.copy(corpus + suffix, prefix + suffix)
    config = DataConfig(data_path=[prefix], seq_length=32, global_batch_size=8, vocab_size=VOCAB, eod=EOD)
    plan = TSTPlan(bag_size=4, total_iters=24, ratio=0.25)
    first = TSTData(config, plan)
    expected = [first.sample("superposition", i)["tokens"] for i in range(8)]
    shuffles = [os.path.join(folder, name) for folder, _, names in os.walk(prefix + "/cache") for name in names
                if name.endswith("train-shuffle_index.npy")]
    assert shuffles
    for path in shuffles:
        os.truncate(path, os.path.getsize(path) // 2)
    again = TSTData(config, plan)
    assert all(torch.equal(again.sample("superposition", i)["tokens"], expected[i]) for i in range(8))


def test_other_tst_flags_after_the_switch_are_refused_by_the_launcher(corpus, phase1_done, tmp_path, capsys):
    """The recovery job runs without the TST flags; the launcher compares them with the plan its
    checkpoints were made with."""
    root = copy_run(phase1_done, tmp_path)
    tst_to_ntp(os.path.join(root, launch.SUPERPOSITION_DIR), os.path.join(root, launch.RECOVERY_DIR))
    argv = args(corpus, root)
    argv[argv.index("--tst-bag-size") + 1] = "2"
    assert launch.main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: cannot resume from {root}/recovery/iter_0000006: tst.bag_size is 2 but the "
                            "checkpoint was made with 4; run with the checkpoint's settings")

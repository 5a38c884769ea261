"""Bad inputs, run as a user runs them (the CLI in a subprocess): each gives one line, ``error: ...``,
naming the file and the fix, exit status 1, no traceback, and leaves every file as it was."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import NULL_VOCAB, write_corpus

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TINY = ["--model-preset", "tiny", "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "8",
        "--lr", "3e-3", "--log-interval", "1", "--eval-interval", "4", "--eval-iters", "1"]
TST = ["--tst-bag-size", "4", "--tst-ratio", "0.5"]


def cli(*argv, module="megatron_tst.pretrain"):
    return subprocess.run([sys.executable, "-m", module, *map(str, argv)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def assert_one_line_error(result, *fragments):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def snapshot(*roots):
    """Every file under ``roots`` with its size, mtime and content digest."""
    state = {}
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                with open(path, "rb") as handle:
                    state[path] = (os.path.getsize(path), os.stat(path).st_mtime_ns, hash(handle.read()))
    return state


def train_sentencepiece(prefix, seed_text):
    import sentencepiece

    source = os.path.join(os.path.dirname(os.__file__), seed_text)
    with open(source, encoding="utf-8") as handle:
        texts = [line for line in handle.read().splitlines() if line.strip()]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=600, model_type="bpe",
        byte_fallback=True, minloglevel=2)
    return prefix + ".model"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A corpus, two different SentencePiece tokenizers of the same size, and a TST run with
    checkpoints at iterations 2 and 4 (phase 1; the switch is at 4 of 8)."""
    root = tmp_path_factory.mktemp("bad_input")
    corpus = write_corpus(str(root / "arith"))
    tokenizer = train_sentencepiece(str(root / "tok_a"), "argparse.py")
    other_tokenizer = train_sentencepiece(str(root / "tok_b"), "subprocess.py")
    save = str(root / "run")
    command = [*TINY, "--data-path", corpus, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
               tokenizer, "--train-iters", "8", *TST, "--save", save, "--save-interval", "2", "--exit-interval", "4"]
    result = cli(*command)
    assert result.returncode == 0, result.stderr
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "4"
    return dict(root=root, corpus=corpus, tokenizer=tokenizer, other_tokenizer=other_tokenizer, save=save,
                command=command)


def copied_run(setup, tmp_path):
    """A private copy of the run (so a test may damage it) and the command that resumes it."""
    save = str(tmp_path / "run")
    shutil.copytree(setup["save"], save)
    command = list(setup["command"])
    command[command.index("--save") + 1] = save
    return save, command


# -- damaged checkpoints --------------------------------------------------------------------------

@pytest.mark.parametrize("damage,problem", [
    ("truncate_shard", "shard {dir}/__0_0.distcp is truncated"),
    ("remove_shard", "shard {dir}/__0_1.distcp is missing"),
    ("truncate_common", "{dir}/common.pt is truncated or corrupted"),
    ("truncate_metadata", "{dir}/.metadata is unreadable"),
])
def test_damaged_checkpoint_is_named_with_the_complete_earlier_one(setup, tmp_path, damage, problem):
    save, command = copied_run(setup, tmp_path)
    damage_checkpoint(os.path.join(save, "iter_0000004"), damage)
    before = snapshot(save, setup["corpus"] + ".bin")
    assert_damage_named(cli(*command), save, problem)
    assert snapshot(save, setup["corpus"] + ".bin") == before  # and never falls back silently


def damage_checkpoint(directory, damage):
    target = {"truncate_shard": "__0_0.distcp", "remove_shard": "__0_1.distcp", "truncate_common": "common.pt",
              "truncate_metadata": ".metadata"}[damage]
    path = os.path.join(directory, target)
    if damage == "remove_shard":
        os.remove(path)
    else:
        os.truncate(path, os.path.getsize(path) // 2)


def assert_damage_named(result, save, problem):
    newest, earlier = os.path.join(save, "iter_0000004"), os.path.join(save, "iter_0000002")
    assert_one_line_error(result, f"checkpoint {newest} is damaged: " + problem.format(dir=newest),
                          f"the newest complete earlier checkpoint is {earlier}",
                          f"writing 2 into {save}/latest_checkpointed_iteration.txt")


def test_damaged_checkpoint_through_the_launcher(setup, tmp_path):
    save, command = copied_run(setup, tmp_path)
    launch_root = str(tmp_path / "launched")
    os.makedirs(launch_root)
    phase1 = os.path.join(launch_root, "superposition")  # where the launcher's phase-1 job saves
    os.rename(save, phase1)
    damage_checkpoint(os.path.join(phase1, "iter_0000004"), "truncate_shard")
    before = snapshot(launch_root)
    result = cli(*replace_flag(command, "--save", launch_root), module="megatron_tst.launch")
    assert_damage_named(result, phase1, "shard {dir}/__0_0.distcp is truncated")
    assert snapshot(launch_root) == before


def test_damaged_checkpoint_without_an_earlier_one(setup, tmp_path):
    save, command = copied_run(setup, tmp_path)
    shutil.rmtree(os.path.join(save, "iter_0000002"))
    os.remove(os.path.join(save, "iter_0000004", "__0_0.distcp"))
    assert_one_line_error(cli(*command), "is damaged", f"no earlier complete checkpoint is under {save}")


# -- damaged or mismatched data ---------------------------------------------------------------------

def corpus_copy(setup, tmp_path):
    prefix = str(tmp_path / "data" / "arith")
    os.makedirs(os.path.dirname(prefix))
    for suffix in (".bin", ".idx"):
        shutil.copy(setup["corpus"] + suffix, prefix + suffix)
    return prefix


def fresh_command(setup, prefix, tmp_path, *extra):
    return [*TINY, "--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", str(NULL_VOCAB),
            "--train-iters", "8", "--save", str(tmp_path / "fresh"), *extra]


def patch_byte(path, offset, value: bytes):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(value)


@pytest.mark.parametrize("damage,fragments", [
    ("truncate_bin", ["arith.bin is shorter than its index describes", "copy it again or preprocess"]),
    ("idx_version", ["arith.idx is index format version 2", "megatron-core 0.16.1 reads version 1"]),
    ("idx_dtype_code", ["arith.idx names token dtype code 99", "preprocess the data again"]),
    ("idx_other_dtype", ["arith.idx says its tokens are int32 (4 bytes) but its offsets advance 2 bytes a token"]),
    ("idx_not_an_index", ["arith.idx is not a Megatron indexed-dataset index"]),
    ("idx_truncated", ["arith.idx is truncated"]),
])
def test_damaged_dataset_files(setup, tmp_path, damage, fragments):
    prefix = corpus_copy(setup, tmp_path)
    if damage == "truncate_bin":
        os.truncate(prefix + ".bin", os.path.getsize(prefix + ".bin") - 100)
    elif damage == "idx_version":
        patch_byte(prefix + ".idx", 9, (2).to_bytes(8, "little"))
    elif damage == "idx_dtype_code":
        patch_byte(prefix + ".idx", 17, bytes([99]))
    elif damage == "idx_other_dtype":
        patch_byte(prefix + ".idx", 17, bytes([4]))  # int32: the .bin would have to be twice as long
    elif damage == "idx_not_an_index":
        patch_byte(prefix + ".idx", 0, b"NOTANIDX")
    else:
        os.truncate(prefix + ".idx", os.path.getsize(prefix + ".idx") - 10)
    before = snapshot(os.path.dirname(prefix))
    assert_one_line_error(cli(*fresh_command(setup, prefix, tmp_path)), prefix, *fragments)
    assert snapshot(os.path.dirname(prefix)) == before and not os.path.exists(tmp_path / "fresh")


def test_tokenizer_smaller_than_the_data(setup, tmp_path):
    prefix = corpus_copy(setup, tmp_path)
    command = fresh_command(setup, prefix, tmp_path)
    command[command.index("--vocab-size") + 1] = "400"  # NullTokenizer: ids 0..400 (EOD 400); the corpus holds 511
    before = snapshot(os.path.dirname(prefix))
    assert_one_line_error(cli(*command), f"{prefix}.bin holds token id 511 but the tokenizer's vocabulary has "
                          "only 401 ids", "preprocess it again with this one")
    assert snapshot(os.path.dirname(prefix)) == before and not os.path.exists(tmp_path / "fresh")


# -- a resume that does not match its checkpoint ----------------------------------------------------

def replace_flag(command, flag, value):
    command = list(command)
    if flag in command:
        command[command.index(flag) + 1] = value
    else:
        command += [flag, value]
    return command


@pytest.mark.parametrize("change,field", [
    (("--split", "900,90,10"), "split"),
    (("--seed", "7"), "seed"),
    (("--seq-length", "16"), "seq_length"),
    (("--global-batch-size", "16"), "global_batch_size"),
    (("--train-iters", "10"), "train_iters"),
    (("--eod-mask-loss",), "eod_mask_loss"),
    (("--tst-bag-size", "2"), "tst.bag_size"),
    (("--tst-ratio", "0.75"), "tst.switch_iter"),
    (("--tst-mode", "input-only"), "tst.mode"),
    (("--tst-loss-weighting", "power"), "tst.loss_weighting"),
    (("other_tokenizer",), "tokenizer.files_md5"),
    (("other_data_path",), "data_path"),
    (("rewritten_data",), "data_files"),
    (("no_tst",), "tst is None"),
])
def test_resume_with_other_data_tokenizer_or_plan_is_refused(setup, tmp_path, change, field):
    save, command = copied_run(setup, tmp_path)
    watched = [save, os.path.dirname(setup["corpus"])]
    if change == ("other_tokenizer",):
        command = replace_flag(command, "--tokenizer-model", setup["other_tokenizer"])
    elif change == ("other_data_path",):
        command = replace_flag(command, "--data-path", corpus_copy(setup, tmp_path))
    elif change == ("rewritten_data",):  # another corpus under the checkpoint's prefix
        other = write_corpus(str(tmp_path / "other"), documents=2500, seed=1)
        for suffix in (".bin", ".idx"):
            os.replace(setup["corpus"] + suffix, setup["corpus"] + suffix + ".orig")
            shutil.copy(other + suffix, setup["corpus"] + suffix)
    elif change == ("no_tst",):
        for flag in ("--tst-bag-size", "--tst-ratio"):
            index = command.index(flag)
            command = command[:index] + command[index + 2:]
    elif len(change) == 1:
        command = command + list(change)
    else:
        command = replace_flag(command, *change)
    before = snapshot(*watched)
    try:
        error = assert_one_line_error(cli(*command), f"cannot resume from {save}/iter_0000004: {field}",
                                      "run with the checkpoint's settings, or give another --save directory")
        assert snapshot(*watched) == before, error
    finally:
        if change == ("rewritten_data",):
            for suffix in (".bin", ".idx"):
                os.replace(setup["corpus"] + suffix + ".orig", setup["corpus"] + suffix)

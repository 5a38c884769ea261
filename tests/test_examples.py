"""The launch recipes: valid bash, required variables checked, and every flag they resolve to is one
our launcher and pretrain parser accept (so a renamed flag breaks this test, not a cluster job)."""

import os
import shlex
import subprocess

import pytest

from megatron_tst.arguments import parse_args
from megatron_tst.launch import launcher_parser

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
RECIPES = {
    "pretrain_tst_dense.sh": [{"MODEL": "270M"}, {"MODEL": "600M"}, {"MODEL": "3B"}, {"MODEL": "3B", "BASELINE": "1"}],
    "pretrain_tst_moe_10b_a1b.sh": [{}, {"BASELINE": "1"}],
    "pretrain_tst_tiny_cpu.sh": [{}],
}
REQUIRED = {"DATA_PATH": "/data/corpus_text_document", "TOKENIZER_MODEL": "/data/tok", "CHECKPOINT_DIR": "/ckpt"}


def _run(script, env):
    return subprocess.run(["bash", os.path.join(EXAMPLES, script)], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], **env}, timeout=60)


@pytest.mark.parametrize("script", sorted(os.listdir(EXAMPLES)))
def test_shell_scripts_parse(script):
    if script.endswith((".sh", ".sbatch")):
        subprocess.run(["bash", "-n", os.path.join(EXAMPLES, script)], check=True)


@pytest.mark.parametrize("script,extra", [(s, e) for s, envs in RECIPES.items() for e in envs])
def test_recipes_resolve_to_valid_flags(script, extra):
    result = _run(script, {**REQUIRED, **extra, "DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr
    line = result.stdout.splitlines()[result.stdout.splitlines().index("resolved command:") + 1]
    argv = shlex.split(line)
    assert argv[1:3] == ["-m", "megatron_tst.launch"]
    launch, rest = launcher_parser().parse_known_args(argv[3:])
    config = parse_args(rest)  # raises on an unknown flag or an invalid setting
    assert config.checkpoint.save == "/ckpt"
    assert (config.tst.tst_bag_size is None) == (extra.get("BASELINE") == "1")


@pytest.mark.parametrize("script", sorted(RECIPES))
def test_recipes_name_a_missing_variable(script):
    result = _run(script, {"TOKENIZER_MODEL": "/t", "CHECKPOINT_DIR": "/c"})
    assert result.returncode == 2
    assert result.stderr.startswith("error: set DATA_PATH (")


def test_paper_recipes():
    dense = shlex.split(_run("pretrain_tst_dense.sh", {**REQUIRED, "DRY_RUN": "1"}).stdout.splitlines()[1])
    assert dense[dense.index("--tst-bag-size") + 1] == "6" and dense[dense.index("--tst-ratio") + 1] == "0.3"
    moe = shlex.split(_run("pretrain_tst_moe_10b_a1b.sh", {**REQUIRED, "DRY_RUN": "1"}).stdout.splitlines()[1])
    assert moe[moe.index("--tst-bag-size") + 1] == "16" and moe[moe.index("--tst-iters") + 1] == "12483"
    assert moe[moe.index("--train-iters") + 1] == "49983"

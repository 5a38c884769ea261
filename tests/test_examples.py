"""The launch recipes: valid bash, required variables checked, and every flag they resolve to is one
our launcher and pretrain parser accept (so a renamed flag breaks this test, not a cluster job)."""

import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys

import pytest

from megatron_tst.arguments import parse_args
from megatron_tst.launch import launcher_parser

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
RECIPES = {
    "pretrain_tst_dense.sh": [{"MODEL": "270M"}, {"MODEL": "600M"}, {"MODEL": "3B"}, {"MODEL": "3B", "BASELINE": "1"},
                              {"MODEL": "270M", "TRAIN_ITERS": "100000"},
                              {"MODEL": "3B", "BASELINE": "1", "TRAIN_ITERS": "36000"},
                              {"MODEL": "3B", "BASELINE": "1", "TRAIN_ITERS": "50000"}],
    "pretrain_tst_270m_100k.sh": [{}, {"BASELINE": "1"}],
    "pretrain_tst_moe_10b_a1b.sh": [{}, {"BASELINE": "1"}],
    "pretrain_tst_tiny_cpu.sh": [{}],
}
REQUIRED = {"DATA_PATH": "/data/corpus_text_document", "TOKENIZER_MODEL": "/data/tok", "CHECKPOINT_DIR": "/ckpt"}


def _run(script, env):
    return subprocess.run(["bash", os.path.join(EXAMPLES, script)], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], **env}, timeout=60)


@pytest.mark.parametrize("script", sorted(os.listdir(EXAMPLES)) + sorted(
    os.path.join("repro", name) for name in os.listdir(os.path.join(EXAMPLES, "repro"))))
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


def test_slurm_batch_script_signals_the_ranks_and_launches_them_with_srun(tmp_path):
    """The early SIGTERM must reach the tasks (``--signal=TERM@...`` without ``B:``, which would
    signal only the batch shell), and srun must start the launcher as the task process itself."""
    script = os.path.join(EXAMPLES, "slurm_tst.sbatch")
    directives = [line.split(None, 1)[1] for line in open(script) if line.startswith("#SBATCH")]
    signal_directive = next(d for d in directives if d.startswith("--signal="))
    assert signal_directive.startswith("--signal=TERM@") and "B:" not in signal_directive
    # dry run under stand-ins for scontrol and srun (srun runs its command as node 1 of 2)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node-a; echo node-b\n")
    (bin_dir / "srun").write_text('#!/bin/bash\necho "srun $*" > "$SRUN_LOG"\n'
                                  'while [[ $1 == --* ]]; do shift; done\nSLURM_NODEID=1 exec "$@"\n')
    for stub in ("scontrol", "srun"):
        os.chmod(bin_dir / stub, 0o755)
    env = {**REQUIRED, "DRY_RUN": "1", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SRUN_LOG": str(tmp_path / "srun.log"), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", script, os.path.join(EXAMPLES, "pretrain_tst_dense.sh")], capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "srun.log").read_text().startswith("srun --kill-on-bad-exit=1 bash -c")
    argv = shlex.split(result.stdout.splitlines()[result.stdout.splitlines().index("resolved command:") + 1])
    launch, _ = launcher_parser().parse_known_args(argv[3:])
    assert (launch.nnodes, launch.node_rank, launch.master_addr) == (2, 1, "node-a")


def _resolved(script, **env):
    result = _run(script, {**REQUIRED, "DRY_RUN": "1", **env})
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout.splitlines()[1])
    launch, rest = launcher_parser().parse_known_args(argv[3:])
    return parse_args(rest)


def test_study_gpu_stage_runs_baseline_and_tst_at_every_rate_of_l_and_xl():
    """study.sh's gpu stage (examples/repro/gpu_size_up.sh on a GPU machine): valid launcher commands,
    a baseline and TST s=4 r=0.3 at each rate of each size, XL one size above L."""
    result = subprocess.run(["bash", os.path.join(EXAMPLES, "repro", "study.sh"), "gpu", "gpu_report"],
                            capture_output=True, text=True, timeout=60,
                            env={"PATH": os.environ["PATH"], "DRY_RUN": "1", "PYTHON": "python"})
    assert result.returncode == 0, result.stderr
    runs = {}
    for line in result.stdout.splitlines():
        argv = shlex.split(line)
        if argv[1:3] == ["-m", "megatron_tst.launch"]:
            config = parse_args(launcher_parser().parse_known_args(argv[3:])[1])
            runs[os.path.basename(config.checkpoint.save)] = config
    assert set(runs) == {"L-base-lr5e-4", "L-tst-s4-r0.3-lr5e-4", "XL-base-lr2.5e-4", "XL-tst-s4-r0.3-lr2.5e-4",
                         "XL-base-lr5e-4", "XL-tst-s4-r0.3-lr5e-4"}
    for name, config in runs.items():
        assert (config.tst.tst_bag_size, config.tst.tst_ratio) == ((4, 0.3) if "-tst-" in name else (None, None))
        assert config.training.lr == float(name.rsplit("-lr", 1)[1]) and config.training.train_iters == 2000
    l, xl = runs["L-base-lr5e-4"].model.architecture(), runs["XL-base-lr5e-4"].model.architecture()
    assert (l.num_layers, l.hidden_size, xl.num_layers, xl.hidden_size) == (6, 384, 8, 512)
    assert sum("tools/tst_report.py" in line for line in result.stdout.splitlines()) == 2


def test_paper_step_counts():
    long_270m = _resolved("pretrain_tst_270m_100k.sh")
    assert long_270m.training.train_iters == 100000 and long_270m.training.lr_wsd_decay_iters == 10000
    assert long_270m.tst.plan(100000).switch_iter == 30000 and long_270m.training.lr == 2e-3  # Table 1 row
    moe_baseline = _resolved("pretrain_tst_moe_10b_a1b.sh", BASELINE="1")
    assert moe_baseline.training.train_iters == 125000 and moe_baseline.tst.tst_bag_size is None
    moe = _resolved("pretrain_tst_moe_10b_a1b.sh")
    assert moe.training.train_iters == 49983 and moe.tst.plan(49983).switch_iter == 12483


@pytest.mark.parametrize("steps", [36000, 50000])
def test_3b_recipe_offers_the_papers_equal_loss_and_equal_data_baselines(steps):
    config = _resolved("pretrain_tst_dense.sh", MODEL="3B", BASELINE="1", TRAIN_ITERS=str(steps))
    assert config.training.train_iters == steps and config.tst.tst_bag_size is None
    assert config.training.lr_warmup_iters == 2000 and config.training.lr_wsd_decay_iters == steps // 10


@pytest.mark.parametrize("script", ["pretrain_tst_dense.sh", "pretrain_tst_moe_10b_a1b.sh"])
def test_recipes_say_which_values_are_the_papers_and_which_ours(script):
    lines = open(os.path.join(EXAMPLES, script)).read().splitlines()
    for flag in ("--seq-length", "--min-lr", "--weight-decay", "--clip-grad", "--lr-wsd-decay-style"):
        line = next(line for line in lines if line.strip().startswith(flag))
        assert "[ours]" in line, line  # the paper does not state these
    for flag in ("--global-batch-size", "--lr ", "--adam-beta1", "--tst-bag-size"):
        line = next(line for line in lines if flag in line and "#" in line)
        assert "[paper]" in line, line


def test_study_driver_resolves_every_run_to_valid_flags():
    """examples/repro/study.sh: every planned run is a valid launcher command with its own --save,
    the grid is the one issue 10 asks for, and the report stage covers every run."""
    result = subprocess.run(["bash", os.path.join(EXAMPLES, "repro", "study.sh")], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], "DRY_RUN": "1", "PYTHON": "python"}, timeout=60)
    assert result.returncode == 0, result.stderr
    runs, commands, reports = {}, {}, []
    for line in result.stdout.splitlines():
        argv = shlex.split(line)
        if argv[1:3] == ["-m", "megatron_tst.launch"]:
            launch, rest = launcher_parser().parse_known_args(argv[3:])
            config = parse_args(rest)
            name = os.path.basename(config.checkpoint.save)
            assert name not in runs or commands[name] == line  # a name is one run (stages may share it)
            runs[name], commands[name] = (launch, config), line
        elif argv[1] != "examples/repro/gap_vs_size.py":
            assert argv[1] == "tools/tst_report.py", line
            reports.append(line)
    assert len(runs) == 79
    # the crossover stage: M's pair at T_LONG, at M's rate
    assert {runs[f"M-T8000-{kind}-lr5e-4"][1].training.train_iters for kind in ("base", "tst-s4-r0.3")} == {8000}
    sizes = {name: config.model.architecture() for name, (_, config) in runs.items()}
    assert {sizes[f"{size}-base-lr{lr}"].hidden_size for size, lr in (("S", "4e-3"), ("M", "2e-3"), ("L", "1e-3"))} \
        == {128, 256, 384}
    grid = {(c.tst.tst_bag_size, c.tst.tst_ratio) for n, (_, c) in runs.items() if n.startswith("L-tst-")}
    assert grid == {(s, r) for s in (2, 4, 8) for r in (0.2, 0.4)} | {(4, 0.3)}
    assert runs["L-input-only-s4-r0.3"][1].tst.tst_mode == "input-only"
    assert runs["L-output-only-s4-r0.3"][1].tst.tst_mode == "output-only"
    assert runs["L-reinit-s4-r0.3"][0].reinit_embeddings_at_switch
    assert runs["L-power-s8-r0.4"][1].tst.tst_loss_weighting == "power"
    assert {runs[f"S-T{t}-{kind}-lr1e-3"][1].training.train_iters for t in (4000, 8000)
            for kind in ("base", "tst-s4-r0.3")} == {4000, 8000}
    long = {n: c for n, (_, c) in runs.items() if n.startswith("S-T8000-")}  # the long stage at S
    assert {n: c.training.lr for n, c in long.items() if "-base-" in n} == {"S-T8000-base-lr5e-4": 5e-4,
        "S-T8000-base-lr1e-3": 1e-3, "S-T8000-base-lr2e-3": 2e-3,
        **{f"S-T8000-base-lr1e-3-seed{n}": 1e-3 for n in range(2, 6)}}
    assert {(c.tst.tst_mode, c.tst.tst_bag_size) for n, c in long.items() if "-base-" not in n} == \
        {("full", 4), ("input-only", 4), ("output-only", 4), ("full", 2), ("full", 3), ("full", 6), ("full", 8)}
    assert runs["S-T8000-reinit-s4-r0.3-lr1e-3"][0].reinit_embeddings_at_switch
    assert all(c.training.train_iters == 8000 for c in long.values())
    assert runs["S-T16000-base-lr1e-3"][1].training.train_iters == 16000
    for suffix, seed in (("-seed2", 2345), ("-seed3", 3456)):  # the seeds stage's pair and the grid's best cell
        assert {runs[f"S-T8000-{kind}-lr1e-3{suffix}"][1].training.seed
                for kind in ("base", "tst-s4-r0.3", "tst-s4-r0.2")} == {seed}
        assert runs[f"S-T8000-tst-s4-r0.2-lr1e-3{suffix}"][1].tst.tst_ratio == 0.2
    assert runs["S-T8000-base-lr1e-3"][1].training.seed == 1234
    assert runs["L-base-2T"][1].training.train_iters == 2 * runs["L-base-lr1e-3"][1].training.train_iters
    assert not sizes["M-tied-base"].untie_embeddings_and_output_weights
    assert sizes["M-base-lr2e-3"].untie_embeddings_and_output_weights
    for name, (_, config) in runs.items():  # warm-up well before the earliest switch (r=0.2)
        assert config.training.lr_warmup_iters * 4 <= 0.2 * 2000 and config.data.allow_data_repetition is False
    # issue 22: batch 64 at T=500 and 2000 (the tokens of batch 16 at 2000 and 8000), rates tuned per length
    batch = {n: c for n, (_, c) in runs.items() if n.startswith("S-B64-")}
    assert {c.training.global_batch_size for c in batch.values()} == {64}
    assert {(c.training.train_iters, c.training.lr) for n, c in batch.items() if "-base-" in n} == \
        {(t, lr) for t in (500, 2000) for lr in (1e-3, 2e-3, 4e-3)} | {(1000, 2e-3), (4000, 2e-3)}
    assert {c.training.train_iters for n, c in batch.items() if "-tst-" in n} == {500, 2000}
    assert batch["S-B64-T500-base-lr1e-3"].training.lr_warmup_iters == 25
    assert {runs[f"S-T8000-{kind}-lr1e-3{suffix}"][1].training.seed for kind in ("base", "tst-s4-r0.3")
            for suffix in ("", "-seed2", "-seed3", "-seed4", "-seed5")} == {1234, 2345, 3456, 4567, 5678}
    grid = {(c.tst.tst_bag_size, c.tst.tst_ratio) for n, (_, c) in runs.items()
            if n.startswith("S-T8000-tst-") and "-seed" not in n}
    assert grid == {(s, r) for s in (2, 3, 4, 6) for r in (0.2, 0.3, 0.4)} | {(8, 0.3)}
    linux = {n: c for n, (_, c) in runs.items() if n.startswith("linux-")}
    assert len(linux) == 6 and all("/linux/" in c.data.data_path[0] and "/linux/" in c.data.tokenizer_model
                                   for c in linux.values())
    seeds = next(shlex.split(line) for line in reports if "reports/seeds" in line)
    assert seeds.count("--pair") == 15  # 5 seeds at batch 16, 5 at batch 64, 2 on the second corpus, 3 of the best s x r cell
    reported = " ".join(reports)
    iso_s = next(shlex.split(line) for line in reports if "reports/iso-loss-S-T8000" in line)
    ladder = iso_s[iso_s.index("--baselines-by-length") + 1:iso_s.index("--output")]
    assert sorted(runs[os.path.basename(p)][1].training.train_iters for p in ladder) == [2000, 4000, 8000, 16000]
    assert all(name in reported for name in runs if "-base-lr" not in name)


def test_study_corpus_writes_its_fingerprint_once(tmp_path):
    """study.sh corpus on a built corpus: corpus.fingerprint names the Python and the sha256 of the tokenizer
    and the tokens, so that a rebuild on another machine can be checked; an existing fingerprint is kept."""
    files = {"tokenizer.model": b"pieces", "corpus_text_document.bin": b"\x01\x02" * 64, "corpus_text_document.idx": b""}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    env = {"PATH": os.environ["PATH"], "STUDY": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(["bash", os.path.join(EXAMPLES, "repro", "study.sh"), "corpus"], capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "corpus.fingerprint").read_text().splitlines()
    assert f"python {platform.python_version()}" in lines
    for name in ("tokenizer.model", "corpus_text_document.bin"):
        assert f"{hashlib.sha256(files[name]).hexdigest()}  {name}" in lines
    (tmp_path / "tokenizer.model").write_bytes(b"other pieces")  # the fingerprint is the build's, not rewritten
    assert subprocess.run(["bash", os.path.join(EXAMPLES, "repro", "study.sh"), "corpus"], env=env,
                          timeout=60).returncode == 0
    assert (tmp_path / "corpus.fingerprint").read_text().splitlines() == lines


@pytest.mark.parametrize("finals, edge", [({"5e-4": 3.10, "1e-3": 3.14, "2e-3": 3.16, "2.5e-4": 3.17}, True),
                                           ({"5e-4": 3.12, "1e-3": 3.09, "2e-3": 3.16, "2.5e-4": 3.17}, False)])
def test_study_corpus2_goes_past_the_low_edge_and_runs_tst_at_the_best_rate(tmp_path, finals, edge):
    """study.sh corpus2 over finished baselines: where the lowest rate of the check wins, one rate below it
    and TST at the winner; where the first corpus's rate wins, neither."""
    linux = tmp_path / "linux"
    linux.mkdir()
    for name in ("tokenizer.model", "corpus_text_document.bin", "corpus_text_document.idx"):
        (linux / name).write_bytes(b"x")
    runs = {f"linux-S-T8000-base-lr{rate}": loss for rate, loss in finals.items()}
    runs["linux-S-T8000-tst-s4-r0.3-lr5e-4"] = 3.0
    for name, loss in runs.items():
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "latest_checkpointed_iteration.txt").write_text("8000")
        (run / "metrics.jsonl").write_text(json.dumps({"iteration": 8000, "validation_loss": loss}) + "\n")
    env = {"PATH": os.environ["PATH"], "STUDY": str(tmp_path), "PYTHON": sys.executable,
           "RUN_FILTER": "^linux-S-T8000-(base-lr(5e-4|1e-3|2e-3|2.5e-4)|tst-s4-r0.3-lr5e-4)$"}
    result = subprocess.run(["bash", os.path.join(EXAMPLES, "repro", "study.sh"), "corpus2"], capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    for name in ("linux-S-T8000-base-lr2.5e-4", "linux-S-T8000-tst-s4-r0.3-lr5e-4"):
        assert (f"[study] {name}: finished, skipped" in result.stdout) == edge, result.stdout


def test_presets_keep_their_shape_through_the_command_line():
    """A switch left out keeps the preset's value: the recipes' 270M/3B are untied and 10B-A1B has
    QK-norm, as the presets say; the tie/untie switches override."""
    from megatron_tst.models import PRESETS

    for name in ("270M", "3B", "10B-A1B", "tiny", "tiny-moe"):
        assert parse_args(["--model-preset", name, "--seq-length", "64"]).model.architecture() == PRESETS[name]
    tied = parse_args(["--model-preset", "270M", "--tie-embeddings-and-output-weights"]).model.architecture()
    assert not tied.untie_embeddings_and_output_weights
    with pytest.raises(ValueError, match="contradict each other"):
        parse_args(["--model-preset", "270M", "--tie-embeddings-and-output-weights",
                    "--untie-embeddings-and-output-weights"])
    shaped = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
              "--vocab-size", "512", "--seq-length", "64"]
    assert not parse_args(shaped).model.architecture().untie_embeddings_and_output_weights  # Megatron-LM's default


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_runs_end_to_end_in_a_tiny_configuration(tmp_path):
    """examples/demo.sh (make demo) at a tiny size: corpus, tokenizer, both runs through the launcher, the
    report with its figure, and the closing line with the gap and the iso-loss ratio, read back from the
    runs' own metrics."""
    work = str(tmp_path / "demo")
    env = dict(os.environ, PYTHON=sys.executable, STEPS="40", BATCH="16", WARMUP="4", EVAL_INTERVAL="10", BAG="4",
               RATIO="0.25", SEQ="16", VOCAB="512", CORPUS_SOURCES="stdlib", CORPUS_BYTES="3000000",
               SHAPE="--num-layers 1 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 2 --num-query-groups 2")
    result = subprocess.run(["bash", os.path.join(EXAMPLES, "demo.sh"), work], capture_output=True, text=True,
                            env=env, timeout=560)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    closing = result.stdout.strip().splitlines()[-1]
    finals = {}
    for run, path in (("baseline", os.path.join(work, "baseline")), ("tst", os.path.join(work, "tst", "recovery"))):
        rows = [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]
        finals[run] = [r for r in rows if "validation_loss" in r][-1]
        assert finals[run]["iteration"] == 40
    base, tst = finals["baseline"]["validation_loss"], finals["tst"]["validation_loss"]
    assert f"{tst:.4f} vs {base:.4f} after 40 steps, a gap of {tst - base:+.4f}" in closing
    assert ("ends below" in closing) == (tst < base) and "iso-loss ratio" in closing
    assert os.path.getsize(os.path.join(work, "report", "report.png")) > 10_000

"""tools/tst_report.py: the comparison tables and figure, on real launcher runs and on hand-made
metrics whose iso-loss answer is worked out by hand."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from megatron_tst import launch
from tests.test_pretrain import args, records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("tst_report", os.path.join(ROOT, "tools", "tst_report.py"))
tst_report = sys.modules.setdefault("tst_report", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(tst_report)


@pytest.fixture(scope="module")
def launched_runs(corpus, tmp_path_factory):
    """A baseline and a two-phase TST run (s=4, r=0.25 of 24 steps) through the real launcher."""
    root = tmp_path_factory.mktemp("report_runs")
    baseline, tst = str(root / "baseline"), str(root / "tst")
    assert launch.main(args(corpus, baseline, "--eval-interval", "4", tst=False)) == 0
    assert launch.main(args(corpus, tst, "--eval-interval", "4")) == 0
    return baseline, tst


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_report_on_launcher_runs(launched_runs, tmp_path, capsys):
    baseline, tst = launched_runs
    out = str(tmp_path / "report")
    assert tst_report.main([tst, "--baseline", baseline, "--output", out]) == 0
    markdown = open(os.path.join(out, "report.md")).read()
    assert markdown == capsys.readouterr().out.split("written: ")[0]
    _, tst_valid = records(os.path.join(tst, "recovery"))
    _, base_valid = records(baseline)
    tst_final, base_final = tst_valid[-1]["validation_loss"], base_valid[-1]["validation_loss"]
    rows = {}  # table (a): the first row of each run
    for line in markdown.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0].lstrip("| "), line)
    tst_row = rows["tst (s=4, r=0.25)"].split(" | ")
    # steps, switch, its final loss, the baseline's at step 24, the difference, FLOPs, raw tokens
    assert tst_row[1:6] == ["24", "6", f"{tst_final:.4f}", f"{base_final:.4f}", f"{tst_final - base_final:+.4f}"]
    assert tst_row[7] == "10.8k"  # 6 x 8 x 32 x 4 phase-1 + 18 x 8 x 32 recovery raw tokens
    assert rows["baseline"].split(" | ")[7] == "6.14k"  # 24 x 8 x 32
    iso = [line for line in markdown.splitlines() if line.startswith("| tst (")][1]
    assert f"{tst_final:.4f} at 24" in iso
    assert ("not reached" in iso) == (tst_final < min(v["validation_loss"] for v in base_valid))
    with open(os.path.join(out, "report.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(os.path.join(out, "report.png")) > 10_000


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_report_picks_the_plain_run_as_baseline_and_reads_the_phase1_kl_scale(launched_runs, tmp_path):
    baseline, tst = launched_runs
    runs = [tst_report.load_run(path) for path in (tst, baseline)]
    assert tst_report.pick_baseline(runs, None) is runs[1]
    tst_run = runs[0]
    assert tst_run.is_tst and tst_run.switch_iter == 6 and tst_run.last_iter == 24
    assert [r["iteration"] for r in tst_run.steps] == list(range(1, 25))  # both phases, in order
    assert tst_report.main([tst, baseline, "--output", str(tmp_path / "auto")]) == 0
    assert "Baseline: baseline." in open(tmp_path / "auto" / "report.md").read()


def _write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


def _steps(iterations, phase, flops_per_step, step_time, loss=4.0):
    return [dict(iteration=i, phase=phase, loss=loss, model_flops=flops_per_step * i, raw_tokens=10 * i,
                 step_time_s=step_time(i), loss_minus_target_entropy=loss - 1.0 if phase == "superposition" else None)
            for i in iterations]


@pytest.fixture
def hand_made(tmp_path):
    """Baseline: evaluations 5.0, 4.0, 3.5, 3.2 at steps 10..40; steps 1-20 take 0.5 s, later ones
    1 s; 100 FLOPs per step. TST runs (superposition/ + recovery/) end at step 20 at 3.35, 3.1, 5.5."""
    base = str(tmp_path / "base")
    _write(os.path.join(base, "metrics.jsonl"),
           _steps(range(10, 41, 10), "next-token", 100, lambda i: 0.5 if i <= 20 else 1.0)
           + [dict(iteration=i, phase="next-token", validation_loss=v)
              for i, v in ((10, 5.0), (20, 4.0), (30, 3.5), (40, 3.2))])
    runs = []
    for name, final in (("tst", 3.35), ("lower", 3.1), ("higher", 5.5)):
        run = str(tmp_path / name)
        _write(os.path.join(run, "superposition", "metrics.jsonl"), _steps([5], "superposition", 100, lambda i: 0.25))
        _write(os.path.join(run, "recovery", "metrics.jsonl"),
               _steps([10, 15, 20], "recovery", 100, lambda i: 0.25)
               + [dict(iteration=20, phase="recovery", validation_loss=final)])
        runs.append(run)
    return base, runs


def test_iso_loss_interpolates_between_the_baseline_evaluations(hand_made, tmp_path, capsys):
    base, (tst, lower, higher) = hand_made
    baseline = tst_report.load_run(base)
    # 3.35 lies between 3.5 (step 30) and 3.2 (step 40): 30 + (3.5 - 3.35) / (3.5 - 3.2) * 10 = 35;
    # 100 FLOPs a step -> 3500; wall-clock 20 x 0.5 s + 15 x 1 s = 25 s
    found = tst_report.iso_loss(baseline, 3.35)
    assert found["reached"] and not found["upper_bound"]
    assert found["step"] == pytest.approx(35.0) and found["flops"] == pytest.approx(3500.0)
    assert found["seconds"] == pytest.approx(25.0)
    assert tst_report.iso_loss(baseline, 3.1) == dict(reached=False, step=40, loss=3.2)
    assert tst_report.iso_loss(baseline, 5.5)["upper_bound"]

    assert tst_report.main([tst, lower, higher, "--baseline", base, "--output", str(tmp_path / "out")]) == 0
    lines = open(tmp_path / "out" / "report.md").read().splitlines()
    iso = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines[lines.index(
        "## (b) Iso-loss: what the baseline needs to reach each run's final loss"):] if line.startswith("| ")}
    # the TST run: 35 baseline steps for its 20 -> 1.75x in steps and FLOPs; 25 s vs 20 x 0.25 s = 5x
    assert iso["tst"][2:] == ["35", "3.5k", "25.0 s", "1.75x", "1.75x", "5.00x |"]
    assert iso["lower"][2].startswith("not reached (baseline ends at 3.2000 after 40)") and iso["lower"][5] == "> 2.00x"
    assert iso["higher"][2] == "≤ 10"
    table_a = [line.split(" | ") for line in lines if line.startswith("| tst |")][0]
    assert table_a[1:6] == ["20", "5", "3.3500", "4.0000", "-0.6500"]  # the baseline at the same step 20


def test_grid_of_bag_size_and_ratio_puts_each_gap_in_its_cell(hand_made, tmp_path, capsys):
    """Section (e): three runs whose plans say (s, r) = (4, 0.25), (4, 0.5), (2, 0.25); their gaps to
    the baseline at step 20 (4.0) are -0.65, -0.9 and +1.5, the lowest in bold, an empty cell a dash."""
    base, runs = hand_made

    def plan(run, bag, switch):
        folder = os.path.join(run, "superposition", "iter_0000005")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "run_config.json"), "w") as handle:
            json.dump({"tst": dict(bag_size=bag, switch_iter=switch, total_iters=20)}, handle)

    for run, (bag, switch) in zip(runs, ((4, 5), (4, 10), (2, 5))):
        plan(run, bag, switch)
    assert tst_report.main([*runs, "--baseline", base, "--output", str(tmp_path / "out")]) == 0
    lines = open(tmp_path / "out" / "report.md").read().splitlines()
    grid = lines[lines.index("## (e) Grid: gap to the baseline by bag size s and switch ratio r"):]
    assert grid[2] == "| s \\ r | 0.25 | 0.5 |"
    assert grid[4] == "| 2 | +1.5000 | – |" and grid[5] == "| 4 | -0.6500 | **-0.9000** |"
    assert "Lowest: s=4, r=0.5 (-0.9000, lower)" in grid[7]
    plan(runs[1], 4, 5)  # two runs in one cell: an error naming both, not a silent pick
    capsys.readouterr()
    assert tst_report.main([*runs, "--baseline", base, "--output", str(tmp_path / "again")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: two runs with s=4, r=0.25 for one grid cell (tst, lower)") and "\n" not in error


def test_iso_loss_by_length_reads_final_losses_in_log_steps(hand_made, tmp_path, capsys):
    """Baselines of 10, 20 and 40 steps, each ending (decayed) at 4.0, 3.6 and 3.2, 100 FLOPs and
    0.5 s a step; the mid-run evaluations of the 40-step one are deliberately high (before decay)."""
    _, (tst, lower, higher) = hand_made
    ladder = []
    for steps, final in ((10, 4.0), (20, 3.6), (40, 3.2)):
        run = str(tmp_path / f"base{steps}")
        _write(os.path.join(run, "metrics.jsonl"), _steps(range(10, steps + 1, 10), "next-token", 100, lambda i: 0.5)
               + [dict(iteration=i, phase="next-token", validation_loss=final if i == steps else 5.0)
                  for i in range(10, steps + 1, 10)])
        ladder.append(tst_report.load_run(run))
    # 3.35 lies between 3.6 (20 steps) and 3.2 (40): log-linear, 20 * 2 ** ((3.6 - 3.35) / 0.4) = 30.84
    found = tst_report.iso_loss_by_length(ladder[::-1], 3.35)
    assert found["reached"] and not found["upper_bound"]
    assert found["step"] == pytest.approx(20 * 2 ** (0.25 / 0.4), rel=1e-12)
    assert found["flops"] == pytest.approx(100 * found["step"]) and found["seconds"] == pytest.approx(0.5 * found["step"])
    assert tst_report.iso_loss_by_length(ladder, 3.1) == dict(reached=False, step=40, loss=3.2)
    assert tst_report.iso_loss_by_length(ladder, 5.5)["upper_bound"]
    assert tst_report.iso_loss(ladder[2], 3.35)["step"] == pytest.approx(40 - (3.35 - 3.2) / 1.8 * 10)  # the biased read

    paths = [run.path for run in ladder]
    assert tst_report.main([tst, lower, higher, paths[1], "--baseline", paths[1], "--baselines-by-length", *paths,
                            "--output", str(tmp_path / "out")]) == 0
    lines = open(tmp_path / "out" / "report.md").read().splitlines()
    section = lines[lines.index("## (b2) Iso-loss from baselines trained to different lengths"):]
    iso = {line.split(" | ")[0][2:]: line.split(" | ") for line in section if line.startswith("| ")}
    assert set(iso) == {"run", "tst", "lower", "higher"}  # the ladder's own runs are not rows
    assert iso["tst"][2:6] == ["31", "3.08k", "15.4 s", "1.54x"]
    assert iso["lower"][2].startswith("not reached (baseline ends at 3.2000 after 40)")
    assert iso["higher"][2] == "≤ 10"
    assert tst_report.main([tst, "--baselines-by-length", paths[0], "--output", str(tmp_path / "one")]) == 1
    assert "two or more baselines" in capsys.readouterr().err


@pytest.mark.parametrize("setup,message", [
    (lambda d: None, "has no metrics.jsonl"),
    (lambda d: _write(os.path.join(d, "metrics.jsonl"), []), "no training records"),
    (lambda d: _write(os.path.join(d, "metrics.jsonl"), _steps([1], "next-token", 1, lambda i: 1.0)),
     "no validation_loss records"),
    (lambda d: open(os.path.join(d, "metrics.jsonl"), "w").write("{not json\n"), "line 1 is not JSON"),
])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, setup, message):
    run = str(tmp_path / "run")
    os.makedirs(run)
    setup(run)
    assert tst_report.main([run, "--output", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and "\n" not in error


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_study_gap_vs_size_table(launched_runs, tmp_path, capsys):
    from megatron_tst.models import preset

    spec = importlib.util.spec_from_file_location("gap_vs_size", os.path.join(ROOT, "examples", "repro", "gap_vs_size.py"))
    gap_vs_size = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gap_vs_size)
    baseline, tst = launched_runs
    assert gap_vs_size.main([str(tmp_path), f"tiny:{baseline}:{tst}"]) == 0
    row = [line for line in open(tmp_path / "reports" / "gap_vs_size.md") if line.startswith("| tiny")][0].split(" | ")
    arch = preset("tiny", vocab_size=512, untie_embeddings_and_output_weights=False)  # as args() runs it
    blocks = arch.parameter_counts()["total"] - arch.vocab_size * arch.hidden_size - arch.hidden_size
    base_final = records(baseline)[1][-1]["validation_loss"]
    tst_final = records(os.path.join(tst, "recovery"))[1][-1]["validation_loss"]
    assert row[1] == f"{blocks / 1e6:.2f}M" and row[4].rstrip(" |\n") == f"{tst_final - base_final:+.4f}"
    assert os.path.getsize(tmp_path / "reports" / "gap_vs_size.png") > 5_000


def test_model_flops_the_report_compares_count_the_output_head_with_tied_or_untied_embeddings():
    from megatron_tst.metrics import model_flops_per_position
    from megatron_tst.models import preset

    untied = preset("tiny", vocab_size=4096)
    tied = preset("tiny", vocab_size=4096, untie_embeddings_and_output_weights=False)
    h, ffn, layers, heads, groups = 64, 128, 2, 4, 2
    head_dim = h // heads
    blocks = layers * (2 * h * heads * head_dim + 2 * h * groups * head_dim + 3 * h * ffn + 2 * h) + h
    expected = 2 * (blocks + 4096 * h) + 4 * 32 * heads * head_dim * layers  # blocks + head; seq 32
    assert model_flops_per_position(untied, 32) == expected == model_flops_per_position(tied, 32)


@pytest.mark.parametrize("count", [3, 10, 12, 20])
def test_every_run_in_a_figure_gets_its_own_colour(count):
    colors = pytest.importorskip("matplotlib.colors")
    rgba = [colors.to_rgba(color) for color in tst_report.run_colors(count)]
    assert len(rgba) == count and len(set(rgba)) == count


def _pair_runs(root, name, base_finals, tst_final, steps=20):
    """A baseline (evaluations at 10 and ``steps``) and a TST run (switch at 5) with given final losses;
    the mid-run gap at step 10 is 0.5."""
    base, tst = os.path.join(root, f"{name}-base"), os.path.join(root, f"{name}-tst")
    _write(os.path.join(base, "metrics.jsonl"), _steps([10, steps], "next-token", 100, lambda i: 1.0)
           + [dict(iteration=10, phase="next-token", validation_loss=4.0),
              dict(iteration=steps, phase="next-token", validation_loss=base_finals)])
    _write(os.path.join(tst, "superposition", "metrics.jsonl"), _steps([5], "superposition", 100, lambda i: 1.0))
    _write(os.path.join(tst, "recovery", "metrics.jsonl"), _steps([10, steps], "recovery", 100, lambda i: 1.0)
           + [dict(iteration=10, phase="recovery", validation_loss=4.5),
              dict(iteration=steps, phase="recovery", validation_loss=tst_final)])
    return base, tst


def test_study_seeds_report_takes_only_the_pairs_whose_runs_finished(tmp_path):
    """examples/repro/study.sh report on a study folder where the third seed's TST run is still in its
    recovery: the seeds report holds the two finished pairs and names the third as not finished (tst_report
    refuses pairs of different lengths, so taking it would fail the whole report)."""
    runs = tmp_path / "runs"
    for suffix, base_final, tst_final, tst_done in (("", 2.70, 2.64, 8000), ("-seed2", 2.75, 2.68, 8000),
                                                     ("-seed3", 2.69, 2.80, 4000)):
        base, tst = _pair_runs(str(runs), "pair", base_final, tst_final, steps=8000)
        names = (f"S-T8000-base-lr1e-3{suffix}", f"S-T8000-tst-s4-r0.3-lr1e-3{suffix}")
        for made, name, done, folder in ((base, names[0], 8000, ""), (tst, names[1], tst_done, "recovery")):
            if tst_done < 8000 and folder:  # still in recovery: its metrics stop at its last checkpoint
                _write(os.path.join(made, folder, "metrics.jsonl"),
                       _steps([10, tst_done], "recovery", 100, lambda i: 1.0)
                       + [dict(iteration=tst_done, phase="recovery", validation_loss=tst_final)])
            with open(os.path.join(made, folder, "latest_checkpointed_iteration.txt"), "w") as handle:
                handle.write(str(done))
            os.rename(made, runs / name)
    result = subprocess.run(["bash", os.path.join(ROOT, "examples", "repro", "study.sh"), "report"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "STUDY": str(tmp_path), "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    without = next(line for line in result.stdout.splitlines() if line.startswith("[study] report seeds: without"))
    assert " S-T8000-tst-s4-r0.3-lr1e-3-seed3 " in without and " S-T8000-tst-s4-r0.3-lr1e-3 " not in without
    report = open(tmp_path / "reports" / "seeds" / "report.md").read()
    pairs = [line for line in report.splitlines() if line.startswith("| S b16 T=8000 s=4 r=0.3 | S-T8000-")]
    assert [line.split(" | ")[-1] for line in pairs] == ["-0.0600 |", "-0.0700 |"]


def test_seeds_report_mean_standard_error_and_per_seed_pairs(tmp_path, capsys):
    # configuration A, three seeds: gaps -0.04, -0.02, +0.03 -> mean -0.01, sample sd sqrt(0.0013)
    # (deviations -0.03, -0.01, +0.04), standard error sqrt(0.0013 / 3); baseline finals 3.0, 3.1, 3.2
    seeds_a = [(3.0, 2.96), (3.1, 3.08), (3.2, 3.23)]
    arguments = []
    for index, (base_final, tst_final) in enumerate(seeds_a):
        arguments += ["--pair", "A", *_pair_runs(str(tmp_path), f"a{index}", base_final, tst_final)]
    arguments += ["--pair", "B", *_pair_runs(str(tmp_path), "b0", 3.0, 3.1)]
    out = str(tmp_path / "out")
    assert tst_report.main(arguments + ["--output", out]) == 0
    markdown = open(os.path.join(out, "report.md")).read()
    rows = {}  # the summary table comes first, then the per-seed rows
    for line in markdown.splitlines():
        if line.startswith("| A |") or line.startswith("| B |"):
            rows.setdefault(line.split(" | ")[0][2:], line.split(" | "))
    gap_error = (0.0013 / 3) ** 0.5
    assert rows["A"][1:7] == ["3", "20", f"3.1000 ± {0.1 / 3 ** 0.5:.4f}", f"3.0900 ± {(0.0366 / 2 / 3) ** 0.5:.4f}",
                              f"-0.0100 ± {gap_error:.4f}", "2 of 3 |"]
    assert rows["B"][1:7] == ["1", "20", "3.0000 (one seed)", "3.1000 (one seed)", "+0.1000 (one seed)", "0 of 1 |"]
    per_seed = [line.split(" | ") for line in markdown.splitlines() if line.startswith("| A | a")]
    assert [row[-1] for row in per_seed] == ["-0.0400 |", "-0.0200 |", "+0.0300 |"]
    mean, error = tst_report.mean_and_error([-0.04, -0.02, 0.03])
    assert mean == pytest.approx(-0.01) and error == pytest.approx(gap_error)
    pair = tst_report.make_pair("A", tst_report.load_run(str(tmp_path / "a0-base")), tst_report.load_run(str(tmp_path / "a0-tst")))
    assert pair.gap_curve() == [(10, pytest.approx(0.5)), (20, pytest.approx(-0.04))]
    if tst_report.plot_gaps([pair], str(tmp_path / "gap.png")):
        assert os.path.getsize(os.path.join(out, "gap.png")) > 5_000

    # bad pairs: the arms swapped, runs of different lengths
    swapped = ["--pair", "A", str(tmp_path / "a0-tst"), str(tmp_path / "a0-base")]
    short = ["--pair", "C", *_pair_runs(str(tmp_path), "c", 3.0, 3.1, steps=30)[:1], str(tmp_path / "a0-tst")]
    for bad, message in ((swapped, "give the baseline first"), (short, "pair runs of the same length")):
        capsys.readouterr()
        assert tst_report.main(bad + ["--output", str(tmp_path / "bad")]) == 1
        error = capsys.readouterr().err.strip()
        assert error.startswith("error: ") and message in error and "\n" not in error

#!/usr/bin/env python
"""Compare TST runs with a baseline the paper's way, from the runs' metrics.jsonl files.

    python tools/tst_report.py RUN_DIR... [--baseline RUN_DIR] [--baselines-by-length RUN_DIR...]
                               [--output DIR]
    python tools/tst_report.py --pair CONFIG BASELINE_DIR TST_DIR [--pair ...] [--output DIR]

A RUN_DIR is a launcher run's --save directory (its superposition/ and recovery/ metrics read as one
run) or any directory holding a metrics.jsonl. Writes DIR/report.md (also printed) and, with
matplotlib (pip install -e ".[plots]"), DIR/report.png:

(a) final next-token validation loss at equal steps (every step costs the same model FLOPs, TST or
    not), with the raw data tokens consumed and the training wall-clock;
(b) iso-loss: the steps, FLOPs and wall-clock the baseline needs to reach each run's final
    validation loss, interpolated linearly between the baseline's evaluations, and the speed-ups;
    with --baselines-by-length, also read from the final losses of baselines trained to different
    lengths (each decayed at its own end: the paper's reading, and the fair one under WSD);
(c) a figure: validation loss against step and against FLOPs for every run, the switch marked,
    and the phase-1 training loss on the KL scale (MCE minus its floor; a bag-prediction loss, not
    comparable with next-token losses, shown for its shape);
(d) with --pair (one seed of one configuration: its baseline and its TST run, trained from the same
    seed; pairs that share CONFIG are that configuration's seeds): per configuration the mean and
    standard error over seeds of each arm's final validation loss and of the paired gap (TST minus
    baseline, seed by seed), the per-seed pairs, and DIR/gap.png: the gap against steps from the switch on,
    one line per configuration (the mean over its seeds, shaded one standard error either side).

Wall-clock is the sum of the logged step times (evaluation, checkpoints and process start-up are
not counted). Without --baseline, the one run without a superposition phase is the baseline.
"""

from __future__ import annotations

import argparse
import bisect
import glob
import json
import math
import os
import sys
from dataclasses import dataclass, field

PHASE_DIRS = ("superposition", "recovery")  # the launcher's layout (megatron_tst/launch.py)


class ReportError(ValueError):
    pass


@dataclass
class Run:
    path: str
    name: str
    steps: list = field(default_factory=list)        # step records, by iteration
    validations: list = field(default_factory=list)  # (iteration, next-token validation loss)
    tst: dict | None = None                          # the plan from run_config.json, when found

    @property
    def is_tst(self) -> bool:
        return any(r["phase"] == "superposition" for r in self.steps)

    @property
    def bag_and_ratio(self) -> tuple[int, float] | None:
        """(s, r) from the run's plan; None without one."""
        if not self.tst:
            return None
        return self.tst["bag_size"], round(self.tst["switch_iter"] / self.tst["total_iters"], 2)

    @property
    def switch_iter(self) -> int | None:
        """The switch iteration (None without a recovery phase): the plan's, else the last logged
        phase-1 step (which lags the switch when it is not a multiple of --log-interval)."""
        phase1 = [r["iteration"] for r in self.steps if r["phase"] == "superposition"]
        if not phase1 or len(phase1) == len(self.steps):
            return None
        return self.tst["switch_iter"] if self.tst else max(phase1)

    @property
    def last_iter(self) -> int:
        return self.steps[-1]["iteration"]

    @property
    def final(self) -> tuple[int, float]:
        return self.validations[-1]

    def cumulative(self) -> tuple[list[int], list[float], list[float]]:
        """(iterations, model FLOPs so far, step seconds so far), starting at (0, 0, 0)."""
        iters, flops, seconds = [0], [0.0], [0.0]
        for record in self.steps:
            iters.append(record["iteration"])
            flops.append(float(record["model_flops"]))
            seconds.append(seconds[-1] + record["step_time_s"] * (record["iteration"] - iters[-2]))
        return iters, flops, seconds

    def flops_at(self, iteration: float) -> float:
        iters, flops, _ = self.cumulative()
        return interpolate(iteration, iters, flops)

    def seconds_at(self, iteration: float) -> float:
        iters, _, seconds = self.cumulative()
        return interpolate(iteration, iters, seconds)

    def label(self) -> str:
        if not self.tst:
            return self.name
        bag, ratio = self.bag_and_ratio
        parts = [f"s={bag}", f"r={ratio:.2g}"]
        if self.tst.get("mode", "full") != "full":
            parts.append(self.tst["mode"])
        weighting = self.tst.get("loss_weighting", "uniform")
        if weighting != "uniform":
            parts.append(weighting if isinstance(weighting, str) else "custom weights")
        return f"{self.name} ({', '.join(parts)})"


def interpolate(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear y(x) through sorted xs (x within [xs[0], xs[-1]])."""
    index = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[index - 1], xs[index], ys[index - 1], ys[index]
    return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ReportError(f"{path} line {number} is not JSON") from None
    return rows


def _run_plan(directory: str) -> dict | None:
    """The TST plan from the newest phase-1 checkpoint's run_config.json (labels only)."""
    for folder in (os.path.join(directory, "superposition"), directory):
        configs = sorted(glob.glob(os.path.join(folder, "iter_*", "run_config.json")))
        if configs:
            with open(configs[-1]) as handle:
                config = json.load(handle)
            return config.get("tst") or config.get("converted_from_tst")
    return None


def load_run(directory: str, name: str | None = None) -> Run:
    files = [os.path.join(directory, sub, "metrics.jsonl") for sub in PHASE_DIRS]
    files = [f for f in files if os.path.isfile(f)] or [os.path.join(directory, "metrics.jsonl")]
    if not os.path.isfile(files[0]):
        raise ReportError(f"{directory} has no metrics.jsonl (looked in it and in its "
                          f"{' and '.join(PHASE_DIRS)} folders)")
    rows = [row for path in files for row in _read_jsonl(path)]
    steps = {r["iteration"]: r for r in rows if "loss" in r}
    validations = {r["iteration"]: r["validation_loss"] for r in rows if "validation_loss" in r}
    if not steps:
        raise ReportError(f"{' and '.join(files)}: no training records")
    if not validations:
        raise ReportError(f"{' and '.join(files)}: no validation_loss records (train with --eval-interval)")
    return Run(path=directory, name=name or os.path.basename(os.path.normpath(directory)),
               steps=[steps[i] for i in sorted(steps)], validations=sorted(validations.items()),
               tst=_run_plan(directory))


def validation_at(run: Run, iteration: int) -> float | None:
    """The run's validation loss at ``iteration``, interpolated between evaluations; None outside."""
    iters = [i for i, _ in run.validations]
    if not iters[0] <= iteration <= iters[-1]:
        return None
    return interpolate(iteration, iters, [loss for _, loss in run.validations])


def iso_loss(baseline: Run, target: float) -> dict:
    """Where the baseline's validation loss first reaches ``target``: the step, linearly
    interpolated between the two evaluations around the crossing, and the baseline's FLOPs and
    wall-clock there. {"reached": False} when it never does."""
    previous = None
    for iteration, loss in baseline.validations:
        if loss <= target:
            if previous is None:  # already below at the first evaluation: an upper bound
                step, bound = float(iteration), True
            else:
                (i0, l0), bound = previous, False
                step = i0 + (l0 - target) / (l0 - loss) * (iteration - i0)
            return dict(reached=True, upper_bound=bound, step=step, flops=baseline.flops_at(step),
                        seconds=baseline.seconds_at(step))
        previous = (iteration, loss)
    return dict(reached=False, step=baseline.final[0], loss=baseline.final[1])


def iso_loss_by_length(baselines: list[Run], target: float) -> dict:
    """The baseline steps whose *final* loss would be ``target``, from baselines trained to different
    lengths, each with its own learning-rate decay: linear in log(steps) between the two final
    losses around ``target`` (the paper's reading: a run against baselines of other lengths). A
    decaying schedule makes a longer baseline's mid-run evaluations too high for this, since they
    come before its decay. FLOPs and wall-clock are the longer bracketing baseline's at that step."""
    finals = sorted(((run.final[0], run.final[1], run) for run in baselines), key=lambda row: row[:2])
    for (s0, l0, _), (s1, l1, longer) in zip(finals, finals[1:]):
        if l1 <= target <= l0 and l1 < l0:
            step = math.exp(math.log(s0) + (l0 - target) / (l0 - l1) * (math.log(s1) - math.log(s0)))
            return dict(reached=True, upper_bound=False, step=step, flops=longer.flops_at(step),
                        seconds=longer.seconds_at(step))
    shortest, longest = finals[0], finals[-1]
    if target >= shortest[1]:  # the shortest baseline already ends at or below it
        return dict(reached=True, upper_bound=True, step=float(shortest[0]),
                    flops=shortest[2].flops_at(shortest[0]), seconds=shortest[2].seconds_at(shortest[0]))
    return dict(reached=False, step=longest[0], loss=longest[1])


def _si(value: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def pick_baseline(runs: list[Run], baseline: Run | None) -> Run | None:
    if baseline is not None:
        return baseline
    plain = [run for run in runs if not run.is_tst]
    return plain[0] if len(plain) == 1 else None


def _iso_table(runs: list[Run], find) -> list[str]:
    lines = ["| run | final val. loss at step | baseline steps | baseline FLOPs | baseline wall-clock "
             "| speed-up (steps) | speed-up (FLOPs) | speed-up (wall-clock) |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        step, loss = run.final
        found = find(loss)
        if not found["reached"]:
            lower = found["step"] / step
            lines.append(f"| {run.label()} | {loss:.4f} at {step} | not reached (baseline ends at "
                         f"{found['loss']:.4f} after {found['step']}) | – | – | > {lower:.2f}x | – | – |")
            continue
        bound = "≤ " if found["upper_bound"] else ""
        lines.append(
            f"| {run.label()} | {loss:.4f} at {step} | {bound}{found['step']:.0f} | {bound}{_si(found['flops'])} | "
            f"{bound}{_duration(found['seconds'])} | {bound}{found['step'] / step:.2f}x | "
            f"{bound}{found['flops'] / run.flops_at(step):.2f}x | "
            f"{bound}{found['seconds'] / max(run.seconds_at(step), 1e-12):.2f}x |")
    return lines


def report_markdown(runs: list[Run], baseline: Run | None, figure: str | None,
                    by_length: list[Run] = ()) -> str:
    lines = ["# TST report", ""]
    lines.append("Next-token validation losses (the same validation samples at every evaluation). A step "
                 "costs the same model FLOPs with or without TST (the model sees the same number of "
                 "positions), so equal steps are equal FLOPs; a TST step reads s times the raw data.")
    lines.append(f"Baseline: {baseline.label() if baseline else 'none (give --baseline RUN_DIR)'}.")
    lines += ["", "## (a) Final validation loss at equal steps", "",
              "| run | steps | switch | val. loss | baseline at that step | vs baseline | model FLOPs "
              "| raw data tokens | wall-clock |",
              "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        step, loss = run.final
        reference = validation_at(baseline, step) if baseline and run is not baseline else None
        versus = f"{loss - reference:+.4f}" if reference is not None else "–"
        lines.append(
            f"| {run.label()} | {step} | {run.switch_iter or '–'} | {loss:.4f} | "
            f"{f'{reference:.4f}' if reference is not None else '–'} | {versus} | "
            f"{_si(run.flops_at(step))} | {_si(run.steps[-1]['raw_tokens'])} | {_duration(run.seconds_at(step))} |")
    lines += ["", "Wall-clock: logged training step times summed (no evaluation, checkpoints or start-up)."]
    if baseline is not None:
        lines += ["", "## (b) Iso-loss: what the baseline needs to reach each run's final loss", ""]
        lines += _iso_table([run for run in runs if run is not baseline], lambda loss: iso_loss(baseline, loss))
        lines += ["", "Baseline steps are interpolated linearly between its evaluations (\"≤\": already "
                  "reached at its first evaluation); a speed-up above 1x means the run reached that loss "
                  "with less. \"not reached\": the baseline never got that low in its run; train it longer "
                  "(about 2x the steps) for a reading. With a decaying schedule (WSD, cosine) the "
                  "baseline's evaluations before its own decay read high, which flatters any run that has "
                  "decayed by its end: a longer baseline read this way gives a shorter, fully decayed "
                  "baseline a speed-up too. Give --baselines-by-length for the reading from final losses."]
    if by_length:
        lengths = ", ".join(f"{run.name} ({run.final[0]} steps: {run.final[1]:.4f})"
                            for run in sorted(by_length, key=lambda run: run.final[0]))
        lines += ["", "## (b2) Iso-loss from baselines trained to different lengths", "",
                  f"Baselines, each decayed at its own end: {lengths}.", ""]
        lines += _iso_table([run for run in runs if all(run is not other for other in by_length)],
                            lambda loss: iso_loss_by_length(by_length, loss))
        lines += ["", "Baseline steps: linear in log(steps) between the two final losses around the run's "
                  "(\"≤\": the shortest baseline already ends at or below it; \"not reached\": the longest "
                  "ends above it)."]
    if baseline is not None:
        lines += grid_markdown([run for run in runs if run is not baseline], baseline)
    if figure:
        lines += ["", "## (c) Curves", "", f"![validation loss]({os.path.basename(figure)})", "",
                  "Solid: next-token validation loss. Dashed: phase-1 training loss on the KL scale (MCE "
                  "minus the entropy of the slot weights; a bag-prediction loss, not comparable with "
                  "next-token losses). Dotted vertical: the switch."]
    return "\n".join(lines) + "\n"


def grid_markdown(runs: list[Run], baseline: Run) -> list[str]:
    """Section (e): the gap to the baseline at equal steps, bag size s down, switch ratio r across,
    the lowest in bold: where finished runs of two or more (s, r) were given."""
    cells = {}
    for run in runs:
        step, loss = run.final
        reference = validation_at(baseline, step)
        finished = run.tst is not None and step == run.tst["total_iters"]  # a run still training is left out
        if finished and reference is not None and run.tst.get("mode", "full") == "full":
            cells.setdefault(run.bag_and_ratio, []).append((loss - reference, run))
    if len(cells) < 2:
        return []
    repeated = [key for key, found in cells.items() if len(found) > 1]
    if repeated:
        raise ReportError(f"two runs with s={repeated[0][0]}, r={repeated[0][1]:.2g} for one grid cell "
                          "({}); give one run per (s, r), or use --pair for seeds".format(
                              ", ".join(run.name for _, run in cells[repeated[0]])))
    bags, ratios = sorted({s for s, _ in cells}), sorted({r for _, r in cells})
    best = min(cells, key=lambda key: cells[key][0][0])
    lines = ["", "## (e) Grid: gap to the baseline by bag size s and switch ratio r", "",
             "| s \\ r | " + " | ".join(f"{r:.2g}" for r in ratios) + " |",
             "|---|" + "---|" * len(ratios)]
    for bag in bags:
        row = []
        for ratio in ratios:
            gap = cells.get((bag, ratio), [(None,)])[0][0]
            text = "–" if gap is None else f"{gap:+.4f}"
            row.append(f"**{text}**" if (bag, ratio) == best else text)
        lines.append(f"| {bag} | " + " | ".join(row) + " |")
    gap, run = cells[best][0]
    lines += ["", f"Final next-token validation loss minus the baseline's at the same step (negative: TST "
                  f"ahead); one run per cell. Lowest: s={best[0]}, r={best[1]:.2g} ({gap:+.4f}, {run.name}). "
                  "Read differences against the seed-to-seed noise of a gap (--pair over seeds)."]
    return lines


def run_colors(count: int) -> list:
    """One colour per run: matplotlib's default cycle up to 10 runs, tab20 up to 20 (a grid's
    dozen runs must not share colours); past 20 they repeat."""
    from matplotlib import colormaps

    if count <= 10:
        return [f"C{index}" for index in range(count)]
    palette = colormaps["tab20"].colors
    return [palette[index % len(palette)] for index in range(count)]


def plot(runs: list[Run], path: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for run, color in zip(runs, run_colors(len(runs))):
        iters = [i for i, _ in run.validations]
        losses = [loss for _, loss in run.validations]
        phase1 = [r for r in run.steps if r["phase"] == "superposition"]
        kl = [r.get("loss_minus_target_entropy", r.get("loss_minus_log_s")) for r in phase1]
        for axis, to_x in ((axes[0], float), (axes[1], run.flops_at)):
            axis.plot([to_x(i) for i in iters], losses, "-o", color=color, markersize=3, label=run.label())
            if phase1 and all(v is not None for v in kl):
                axis.plot([to_x(r["iteration"]) for r in phase1], kl, "--x", color=color, linewidth=1,
                          markersize=3, alpha=0.7)
            if run.switch_iter:
                axis.axvline(to_x(run.switch_iter), color=color, linestyle=":", linewidth=1)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("model FLOPs")
    axes[0].set_ylabel("next-token validation loss (solid)\nphase-1 KL-scale training loss (dashed)")
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("TST vs baseline: validation loss; dotted lines mark the switch")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


@dataclass
class Pair:
    """One seed of one configuration: a baseline and a TST run trained from the same seed."""
    config: str
    baseline: Run
    tst: Run

    def gap_curve(self) -> list[tuple[int, float]]:
        """(step, TST minus baseline validation loss) at the TST run's evaluations the baseline spans."""
        curve = []
        for iteration, loss in self.tst.validations:
            reference = validation_at(self.baseline, iteration)
            if reference is not None:
                curve.append((iteration, loss - reference))
        return curve


def make_pair(config: str, baseline: Run, tst: Run) -> Pair:
    """A seed's pair, refused in one line when it cannot be compared."""
    if baseline.is_tst or not tst.is_tst:
        raise ReportError(f"--pair {config}: give the baseline first and the TST run second "
                          f"({baseline.path} {'has' if baseline.is_tst else 'has no'} superposition phase, "
                          f"{tst.path} {'has' if tst.is_tst else 'has no'} superposition phase)")
    if baseline.final[0] != tst.final[0]:
        raise ReportError(f"--pair {config}: {baseline.path} ends at step {baseline.final[0]} and {tst.path} at "
                          f"{tst.final[0]}; pair runs of the same length (or let the shorter one finish)")
    return Pair(config, baseline, tst)


def mean_and_error(values: list[float]) -> tuple[float, float | None]:
    """The mean and its standard error (sample standard deviation over sqrt(n); None for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def _pm(mean: float, error: float | None, signed: bool = False) -> str:
    text = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    return text + (f" ± {error:.4f}" if error is not None else " (one seed)")


def by_config(pairs: list[Pair]) -> dict[str, list[Pair]]:
    grouped: dict[str, list[Pair]] = {}
    for pair in pairs:
        grouped.setdefault(pair.config, []).append(pair)
    return grouped


def pairs_markdown(pairs: list[Pair], figure: str | None) -> list[str]:
    lines = ["## (d) Seeds: mean ± standard error over seeds", "",
             "Each pair is one seed: a baseline and a TST run from the same seed (initialisation, data order "
             "and validation samples), so the gap is taken seed by seed and its standard error is that of the "
             "per-seed gaps. Final next-token validation loss at each run's last step.", "",
             "| configuration | seeds | steps | baseline | TST | gap (TST − baseline) | TST below baseline |",
             "|---|---|---|---|---|---|---|"]
    grouped = by_config(pairs)
    for config, group in grouped.items():
        base = mean_and_error([p.baseline.final[1] for p in group])
        tst = mean_and_error([p.tst.final[1] for p in group])
        gap = mean_and_error([p.tst.final[1] - p.baseline.final[1] for p in group])
        steps = sorted({p.tst.final[0] for p in group})
        wins = sum(p.tst.final[1] < p.baseline.final[1] for p in group)
        lines.append(f"| {config} | {len(group)} | {', '.join(map(str, steps))} | {_pm(*base)} | {_pm(*tst)} | "
                     f"{_pm(*gap, signed=True)} | {wins} of {len(group)} |")
    lines += ["", "Per-seed pairs:", "", "| configuration | baseline run | TST run | baseline | TST | gap |",
              "|---|---|---|---|---|---|"]
    for config, group in grouped.items():
        for p in group:
            lines.append(f"| {config} | {p.baseline.name} | {p.tst.name} | {p.baseline.final[1]:.4f} | "
                         f"{p.tst.final[1]:.4f} | {p.tst.final[1] - p.baseline.final[1]:+.4f} |")
    if figure:
        lines += ["", f"![gap against steps]({os.path.basename(figure)})", "",
                  "The gap (TST minus baseline next-token validation loss) against steps: one line per "
                  "configuration from its switch on, the mean over its seeds at the evaluations every seed has, "
                  "shaded one standard error either side; below zero TST is ahead."]
    return lines


def plot_gaps(pairs: list[Pair], path: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = by_config(pairs)
    figure, axis = plt.subplots(figsize=(8, 4.8))
    for (config, group), color in zip(grouped.items(), run_colors(len(grouped))):
        # from the switch on: before it the TST model reads bags, and its next-token loss is off the scale
        curves = [{i: gap for i, gap in p.gap_curve() if i > (p.tst.switch_iter or 0)} for p in group]
        common = sorted(set.intersection(*(set(c) for c in curves)))
        stats = [mean_and_error([c[i] for c in curves]) for i in common]
        means = [m for m, _ in stats]
        axis.plot(common, means, "-o", color=color, markersize=3, label=f"{config} ({len(group)} seed"
                  f"{'s' if len(group) > 1 else ''})")
        if len(group) > 1:
            axis.fill_between(common, [m - e for m, e in stats], [m + e for m, e in stats], color=color, alpha=0.2)
        switches = {p.tst.switch_iter for p in group if p.tst.switch_iter}
        for switch in switches:
            axis.axvline(switch, color=color, linestyle=":", linewidth=1)
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_xlabel("step")
    axis.set_ylabel("TST − baseline next-token validation loss")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title("The gap after the switch (mean over seeds ± 1 s.e.; dotted: the switch)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR")
    parser.add_argument("--pair", nargs=3, action="append", default=[], metavar=("CONFIG", "BASELINE_DIR", "TST_DIR"),
                        help="one seed of a configuration (repeat it: pairs sharing CONFIG are its seeds); adds "
                             "section (d), mean ± standard error over seeds, and gap.png")
    parser.add_argument("--baseline", metavar="RUN_DIR", help="the baseline run (default: the one non-TST run)")
    parser.add_argument("--baselines-by-length", nargs="+", metavar="RUN_DIR", default=[],
                        help="baselines trained to different lengths (each decayed at its own end): adds "
                             "the iso-loss read from their final losses")
    parser.add_argument("--output", metavar="DIR", default="tst_report", help="where report.md/.png go")
    args = parser.parse_args(argv)
    if not args.runs and not args.pair:
        parser.error("give RUN_DIRs, or --pair CONFIG BASELINE_DIR TST_DIR")
    try:
        pairs = [make_pair(config, load_run(base), load_run(tst)) for config, base, tst in args.pair]
        if not args.runs:
            return _pairs_report(pairs, args.output)
        paths = list(dict.fromkeys(os.path.normpath(p) for p in ([args.baseline] if args.baseline else []) + args.runs))
        names = [os.path.basename(p) for p in paths]
        runs = [load_run(p, p if names.count(os.path.basename(p)) > 1 else None) for p in paths]
        baseline = pick_baseline(runs, runs[0] if args.baseline else None)
        loaded = {run.path: run for run in runs}  # a ladder baseline also given as a RUN_DIR is one run
        by_length = [loaded.get(os.path.normpath(p)) or load_run(p) for p in dict.fromkeys(args.baselines_by_length)]
        if len(by_length) == 1:
            raise ReportError("--baselines-by-length needs two or more baselines of different lengths")
    except (ReportError, OSError, KeyError) as error:
        message = f"missing field {error}" if isinstance(error, KeyError) else str(error)
        print(f"error: {message}", file=sys.stderr)
        return 1
    figure = os.path.join(args.output, "report.png")
    try:  # the tables first: a refusal leaves the output folder as it was
        markdown = report_markdown(runs, baseline, figure, by_length)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    os.makedirs(args.output, exist_ok=True)
    if not plot(runs, figure):
        print("note: no figure (matplotlib missing: pip install -e \".[plots]\")", file=sys.stderr)
        figure = None
        markdown = report_markdown(runs, baseline, figure, by_length)
    if pairs:
        gaps = os.path.join(args.output, "gap.png")
        markdown += "\n" + "\n".join(pairs_markdown(pairs, gaps if plot_gaps(pairs, gaps) else None)) + "\n"
    with open(os.path.join(args.output, "report.md"), "w") as handle:
        handle.write(markdown)
    print(markdown, end="")
    print(f"written: {os.path.join(args.output, 'report.md')}" + (f", {figure}" if figure else ""))
    return 0


def _pairs_report(pairs: list[Pair], output: str) -> int:
    """Section (d) alone: a report of paired seeds without the single-run sections."""
    os.makedirs(output, exist_ok=True)
    gaps = os.path.join(output, "gap.png")
    markdown = "\n".join(["# TST report: seeds", ""] + pairs_markdown(pairs, gaps if plot_gaps(pairs, gaps) else None)) + "\n"
    with open(os.path.join(output, "report.md"), "w") as handle:
        handle.write(markdown)
    print(markdown, end="")
    print(f"written: {os.path.join(output, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

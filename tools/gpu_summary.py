"""The targets table of a tools/gpu_check.sh run: every GPU target of issues 19 and 20, its measured
value and pass/fail, read from the JSON and logs the run left in OUTDIR; written as OUTDIR/summary.md
(to paste into BENCHMARKS.md) and OUTDIR/summary.json, and printed.

gpu_check.sh calls it after every step (--quiet), so a run cut short still leaves its summary. A
target whose step did not run (or did not get that far) says "missing", never a guess. Standard
library only: it runs in a fraction of a second, without torch.

  python tools/gpu_summary.py OUTDIR [--quiet]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

PASS, FAIL, INFO, MISSING = "pass", "FAIL", "info", "missing"
TEST_LINE = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def load(outdir: str, name: str):
    path = os.path.join(outdir, name)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):  # a step killed while writing: treat as absent
        return None


def test_results(outdir: str, log: str) -> dict[str, str] | None:
    """test id -> outcome from a pytest -v log (partial logs too: pytest may have been stopped)."""
    path = os.path.join(outdir, log)
    if not os.path.exists(path):
        return None
    results = {}
    with open(path, errors="replace") as handle:
        for line in handle:
            match = TEST_LINE.match(line)
            if match:
                results[match.group(1)] = match.group(2)
    return results


def tests_status(outcomes) -> str:
    """FAIL on any failure or error; pass when something passed; missing when all skipped or none ran."""
    outcomes = list(outcomes)
    if any(o in ("FAILED", "ERROR") for o in outcomes):
        return FAIL
    return PASS if "PASSED" in outcomes else MISSING


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def row_named(rows: list[dict], name: str) -> dict | None:
    return next((row for row in rows or [] if row.get("step") == name), None)


def no_mfu(row: dict | None) -> str | None:
    """What a step row without an MFU (no GPU, so no peak FLOP/s) did measure."""
    return f"no MFU without a GPU's peak FLOP/s (step {row['median_ms']:.1f} ms)" if row else None


def target(issue, name, goal, measured=None, status=MISSING, value=None, source=""):
    return dict(issue=issue, target=name, goal=goal, measured=measured if measured is not None else "not measured",
                status=status, value=value, source=source)


def at_least(value, bound):
    return PASS if value >= bound else FAIL


def at_most(value, bound):
    return PASS if value <= bound else FAIL


def step_targets(outdir: str) -> list[dict]:
    rows = []
    head = load(outdir, "bench_gpu.json") or {}
    steps = head.get("steps", [])
    base, local = row_named(steps, "gptmodel"), row_named(steps, "gptmodel-local")
    tst = next((row for row in steps if str(row.get("step", "")).startswith("tst-s")), None)
    shape = ""
    if head.get("args"):
        a = head["args"]
        shape = f"{a['preset']}, seq {a['seq_length']}, mb {a['micro_batch_size']}x{a['micro_batches']}"

    goal = ">= 30% (H200 2026-12-04: 6.5%)"
    if base and base.get("mfu") is not None:
        rows.append(target(19, f"MFU, --attention-backend auto ({base['core_attention']}; {shape})", goal,
                           f"{pct(base['mfu'])} ({base['median_ms']:.1f} ms, {base['raw_tokens_per_s']:,.0f} tokens/s)",
                           at_least(base["mfu"], 0.30), base["mfu"], "bench_gpu.json"))
    else:
        rows.append(target(19, "MFU, 270M, --attention-backend auto (ours)", goal, no_mfu(base), source="bench_gpu.json"))
    if local and local.get("mfu") is not None:
        rows.append(target(19, f"MFU, --attention-backend local ({local['core_attention']})", "reference (was 6.5%)",
                           f"{pct(local['mfu'])} ({local['median_ms']:.1f} ms, peak {local['peak_memory_gib']:.1f} GiB)"
                           if local.get("peak_memory_gib") is not None else pct(local["mfu"]), INFO, local["mfu"],
                           "bench_gpu.json"))
        if "ours_vs_local" in local:
            rows.append(target(19, "step time, auto / local", "< 1 (faster)", f"{local['ours_vs_local']:.3f}x", INFO,
                               local["ours_vs_local"], "bench_gpu.json"))
    else:
        rows.append(target(19, "MFU, 270M, --attention-backend local (megatron-core)", "reference (was 6.5%)",
                           no_mfu(local), source="bench_gpu.json"))
    ratio = None
    if tst and base:
        ratio = tst.get("vs_gptmodel_per_round", tst.get("vs_gptmodel_medians"))
    rows.append(target(19, f"TST phase-1 step / baseline step ({tst['step'] if tst else 'tst-s6'})", "<= 1.03",
                       f"{ratio:.3f}x per round (medians {tst['vs_gptmodel_medians']:.3f}x)" if ratio else None,
                       at_most(ratio, 1.03) if ratio else MISSING, ratio, "bench_gpu.json"))
    if base and base.get("peak_memory_gib") is not None:
        rows.append(target(19, "peak memory of the baseline step, alone", "reference (was 50.1 GiB)",
                           f"{base['peak_memory_gib']:.1f} GiB", INFO, base["peak_memory_gib"], "bench_gpu.json"))

    big = load(outdir, "bench_3b.json") or {}
    b3 = row_named(big.get("steps", []), "gptmodel")
    if b3 and b3.get("mfu") is not None:
        how = f"mb {b3['micro_batch_size']}x{b3['micro_batches']}" + (f", {' '.join(b3['model_flags'])}"
                                                                      if b3.get("model_flags") else ", no recompute")
        rows.append(target(19, f"MFU, 3B preset ({how})", ">= 45%",
                           f"{pct(b3['mfu'])} ({b3['median_ms']:.0f} ms, peak {b3.get('process_peak_gib') or 0:.1f} GiB)",
                           at_least(b3["mfu"], 0.45), b3["mfu"], "bench_3b.json"))
    else:
        oom = big.get("out_of_memory")
        rows.append(target(19, "MFU, 3B preset", ">= 45%", f"out of memory: {oom['error']}" if oom else no_mfu(b3),
                           FAIL if oom else MISSING, source="bench_3b.json"))

    peer = load(outdir, "bench_peer.json") or {}
    if peer.get("time_ratio"):
        tokens = peer["tokens_per_s"]
        memory = f"; peak memory {peer['memory_ratio']:.2f}x" if "memory_ratio" in peer else ""
        value = tokens["ours"] / tokens["peer"]
        a = peer["args"]
        shape = (f"{a['num_layers']} layers x {a['hidden_size']}, V={a['vocab_size']}, mb {a['micro_batch_size']}, "
                 f"seq {a['seq_length']}, {'bf16' if a['bf16'] else 'fp32'}")
        rows.append(target(19, f"tokens/s, ours / transformers Llama (sdpa) ({shape})", ">= 1.0",
                           f"{value:.3f}x ({tokens['ours']:,.0f} vs {tokens['peer']:,.0f}){memory}",
                           at_least(value, 1.0), value, "bench_peer.json"))
    else:
        rows.append(target(19, "tokens/s, ours / transformers Llama (sdpa)", ">= 1.0", source="bench_peer.json"))

    fused = [row.get("fused_adamw") for row in steps + big.get("steps", []) if "fused_adamw" in row]
    rows.append(target(19, "fused AdamW in every benchmark step", "True",
                       f"{sum(map(bool, fused))} of {len(fused)} steps" if fused else None,
                       (PASS if all(fused) else FAIL) if fused else MISSING, all(fused) if fused else None,
                       "bench_gpu.json"))
    tests = test_results(outdir, "tests-fast.log") or {}
    resume = {k: v for k, v in tests.items() if "test_adamw_stays_fused_after_save_and_resume" in k}
    rows.append(target(19, "fused AdamW after a save and resume (pytest -m gpu)", "passed",
                       ", ".join(f"{k.split('[')[-1].rstrip(']')}: {v}" for k, v in resume.items()) or None,
                       tests_status(resume.values()),
                       source="tests-fast.log"))

    profile = head.get("profile") or {}
    rows.append(target(19, "top kernels of one baseline and one TST step", "captured",
                       f"{', '.join(sorted(profile))}: in headline.log and bench_gpu.json" if profile else None,
                       INFO if profile else MISSING, source="bench_gpu.json"))
    layouts = head.get("layouts") or []
    if len(layouts) > 1:
        rows.append(target(19, f"micro-batch layout {layouts[1]['layout']} / {layouts[0]['layout']}", "reported",
                           f"{layouts[1]['vs_first']:.3f}x ({layouts[0]['median_ms']:.1f} vs {layouts[1]['median_ms']:.1f} ms)",
                           INFO, layouts[1]["vs_first"], "bench_gpu.json"))
    return rows


def loss_targets(outdir: str) -> list[dict]:
    rows = []
    head = load(outdir, "bench_gpu.json") or {}
    losses = {(row["s"], row["method"]): row for row in head.get("losses", [])}
    where = f"V={head['args']['vocab']}, N={head['args']['loss_positions']}" if head.get("args") else ""
    compiled = head.get("loss_kernel_compile")
    rows.append(target(20, "the loss kernels ran compiled (Triton), not the eager fallback", "compiled", compiled,
                       INFO if compiled and compiled.startswith("eager") else
                       (PASS if compiled == "compiled" else FAIL) if compiled else MISSING, source="bench_gpu.json"))
    single = losses.get((16, "single-s16"))
    rows.append(target(20, f"single-kernel MCE s=16 / megatron-core fused CE ({where})", "<= 1.0 (was 1.38x)",
                       f"{single['vs_megatron_fused']:.3f}x ({single['median_ms']:.2f} ms, {single['peak_mib']:.0f} MiB)"
                       if single and single.get("peak_mib") is not None else
                       (f"{single['vs_megatron_fused']:.3f}x" if single else None),
                       at_most(single["vs_megatron_fused"], 1.0) if single else MISSING,
                       single["vs_megatron_fused"] if single else None, "bench_gpu.json"))
    for key, name, goal in (((16, "mce-s16"), "today's fused MCE (phase-1 kernel) s=16 / fused CE", "reference (1.38x)"),
                            ((1, "single-s1"), "single kernel s=1 (next-token loss on CUDA) / fused CE",
                             "<= 1.0: else megatron-core's CE is the faster baseline")):
        row = losses.get(key)
        if row:
            status = INFO if key[1].startswith("mce") else at_most(row["vs_megatron_fused"], 1.0)
            rows.append(target(20, name, goal, f"{row['vs_megatron_fused']:.3f}x ({row['median_ms']:.2f} ms)", status,
                               row["vs_megatron_fused"], "bench_gpu.json"))
        else:
            rows.append(target(20, name, goal, source="bench_gpu.json"))

    for file, label in (("bench_linear.json", ""), ("bench_linear_main_grad.json", ", main_grad")):
        cases = load(outdir, file) or []
        case = next((c for c in cases if c.get("bag") == 16), cases[-1] if cases else None)
        fused, megatron = "linear-fused-compiled", "linear-megatron-fused"
        if case and fused in case["time_ms"] and megatron in case["time_ms"]:
            shape = f"V={case['vocab']}, N={case['positions']}, s={case['bag']}{label}"
            mem = case.get("peak_mib") or {}
            if fused in mem and megatron in mem:
                f_mib, m_mib = mem[fused]["alloc"], mem[megatron]["alloc"]
                ok = f_mib < 0.8 * 1024 and f_mib <= 0.1 * m_mib
                rows.append(target(20, f"fused output layer + MCE, peak ({shape})", "< 0.8 GiB and <= 0.1x GEMM + fused CE",
                                   f"{f_mib / 1024:.2f} GiB vs {m_mib / 1024:.2f} GiB: {f_mib / m_mib:.3f}x",
                                   PASS if ok else FAIL, f_mib / m_mib, file))
            else:
                rows.append(target(20, f"fused output layer + MCE, peak ({shape})", "< 0.8 GiB and <= 0.1x GEMM + fused CE",
                                   "no memory figures in this run", MISSING, None, file))
            time_ratio = case["time_ms"][fused] / case["time_ms"][megatron]
            rows.append(target(20, f"fused output layer + MCE, time / (GEMM + fused CE) ({shape})", "<= 1.1x",
                               f"{time_ratio:.3f}x ({case['time_ms'][fused]:.1f} vs {case['time_ms'][megatron]:.1f} ms)",
                               at_most(time_ratio, 1.1), time_ratio, file))
        elif not label:
            rows.append(target(20, "fused output layer + MCE: peak and time against GEMM + fused CE",
                               "< 0.8 GiB, <= 0.1x memory, <= 1.1x time", source=file))

    fusion = (load(outdir, "bench_fusion.json") or {}).get("loss_fusion", [])
    for step in sorted({row["step"] for row in fusion}, reverse=True):
        mine = {(row["micro_batch_size"], row["output_layer_loss_fusion"]): row for row in fusion if row["step"] == step}
        sizes = sorted({size for size, _ in mine})
        small, large = sizes[0], sizes[-1]
        off, on = mine.get((small, False)), mine.get((large, True))
        doubled = f"{step}: micro-batch {large} with --output-layer-loss-fusion in the memory of {small} without"
        if not (off and on and off.get("peak_memory_gib") is not None
                and (on.get("peak_memory_gib") is not None or on.get("out_of_memory"))):
            rows.append(target(20, doubled, "peak(on, x2) <= peak(off)", "no memory figures in this run", MISSING,
                               None, "bench_fusion.json"))
        elif on.get("out_of_memory"):
            rows.append(target(20, doubled, "peak(on, x2) <= peak(off)", "out of memory", FAIL, None, "bench_fusion.json"))
        else:
            rows.append(target(20, doubled, "peak(on, x2) <= peak(off)",
                               f"{on['peak_memory_gib']:.2f} vs {off['peak_memory_gib']:.2f} GiB",
                               at_most(on["peak_memory_gib"], off["peak_memory_gib"]),
                               on["peak_memory_gib"] / off["peak_memory_gib"], "bench_fusion.json"))
        for size in sizes:
            a, b = mine.get((size, False)), mine.get((size, True))
            if a and b and "median_ms" in a and "median_ms" in b:
                mem = (f", peak {b['peak_memory_gib']:.2f} vs {a['peak_memory_gib']:.2f} GiB"
                       if a.get("peak_memory_gib") is not None and b.get("peak_memory_gib") is not None else "")
                rows.append(target(20, f"{step} mb {size}: step time with / without --output-layer-loss-fusion",
                                   "data for its CUDA default", f"{b['median_ms'] / a['median_ms']:.3f}x "
                                   f"({b['median_ms']:.1f} vs {a['median_ms']:.1f} ms){mem}", INFO,
                                   b["median_ms"] / a["median_ms"], "bench_fusion.json"))
    if not fusion:
        rows.append(target(20, "270M micro-batch doubled in the same memory (--output-layer-loss-fusion)",
                           "peak(on, x2) <= peak(off)", source="bench_fusion.json"))
    return rows


def test_targets(outdir: str) -> list[dict]:
    rows = []
    for log, files in (("tests-fast.log", "test_gpu_fast_step, test_gpu_loss_kernels"),
                       ("tests-rest.log", "test_gpu without the launcher, test_te"),
                       ("tests-launcher.log", "test_gpu's launcher with a SIGTERM resume")):
        results = test_results(outdir, log)
        if results is None:
            rows.append(target("19/20", f"pytest -m gpu ({files})", "no failure", source=log))
            continue
        counts = {outcome: sum(1 for v in results.values() if v == outcome) for outcome in set(results.values())}
        bad = [k for k, v in results.items() if v in ("FAILED", "ERROR")]
        text = ", ".join(f"{n} {o.lower()}" for o, n in sorted(counts.items())) or "no test finished"
        if bad:
            text += "; failed: " + ", ".join(k.split("::")[-1] for k in bad)
        rows.append(target("19/20", f"pytest -m gpu ({files})", "no failure", text, tests_status(results.values()),
                           len(bad), log))
    return rows


def read_steps(outdir: str) -> list[dict]:
    path = os.path.join(outdir, "steps.tsv")
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        lines = [line.rstrip("\n").split("\t") for line in handle][1:]
    return [dict(step=p[0], status=p[1], seconds=int(p[2]), limit_s=int(p[3])) for p in lines if len(p) == 4]


def summarize(outdir: str) -> dict:
    environment = ""
    if os.path.exists(os.path.join(outdir, "environment.txt")):
        with open(os.path.join(outdir, "environment.txt")) as handle:
            environment = handle.read().strip()
    return dict(environment=environment, steps=read_steps(outdir),
                targets=step_targets(outdir) + loss_targets(outdir) + test_targets(outdir))


def markdown(summary: dict) -> str:
    lines = []
    if "dry run" in summary["environment"]:
        lines += ["**Dry run (CPU, tiny shapes): these are not GPU figures; never record them.**", ""]
    lines += ["Environment:", "", "```", summary["environment"], "```", "",
             "| issue | target | goal | measured | status |", "|---|---|---|---|---|"]
    for row in summary["targets"]:
        lines.append(f"| {row['issue']} | {row['target']} | {row['goal']} | {row['measured']} | {row['status']} |")
    lines += ["", "| step | status | seconds | limit s |", "|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['limit_s']} |" for s in summary["steps"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir")
    parser.add_argument("--quiet", action="store_true", help="write summary.md/.json only")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.outdir):
        print(f"error: {args.outdir} is not a directory; pass the OUTDIR of a tools/gpu_check.sh run", file=sys.stderr)
        return 1
    summary = summarize(args.outdir)
    text = markdown(summary)
    with open(os.path.join(args.outdir, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    with open(os.path.join(args.outdir, "summary.md"), "w") as handle:
        handle.write(text)
    if not args.quiet:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The study's gap-vs-size reading: final next-token validation loss of TST minus the baseline's
(equal steps, equal FLOPs) against non-embedding parameters, as a table and a log-x plot.

    python examples/repro/gap_vs_size.py STUDY_DIR SIZE:BASELINE_RUN:TST_RUN...

Writes STUDY_DIR/reports/gap_vs_size.md (also printed) and .png (matplotlib). Negative gap: TST ahead.
"""

import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("tst_report", os.path.join(ROOT, "tools", "tst_report.py"))
tst_report = sys.modules.setdefault("tst_report", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(tst_report)


def non_embedding_parameters(run_dir: str) -> int:
    """Transformer-block parameters from the run's checkpointed model shape (no tables, no final norm)."""
    configs = sorted(os.path.join(root, name, "run_config.json")
                     for root in (run_dir, os.path.join(run_dir, "recovery"))
                     if os.path.isdir(root) for name in os.listdir(root) if name.startswith("iter_"))
    model = json.load(open(configs[-1]))["model"]
    hidden, heads, groups = model["hidden_size"], model["num_attention_heads"], model["num_query_groups"]
    head_dim = model.get("kv_channels") or hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * groups * head_dim
    return model["num_layers"] * (attention + 2 * hidden + 3 * hidden * model["ffn_hidden_size"])


def main(argv) -> int:
    study, triples = argv[0], [item.split(":") for item in argv[1:]]
    rows = []
    for size, base_dir, tst_dir in triples:
        base, tst = tst_report.load_run(base_dir), tst_report.load_run(tst_dir)
        rows.append((size, non_embedding_parameters(base_dir), base.final[1], tst.final[1]))
    out = os.path.join(study, "reports")
    os.makedirs(out, exist_ok=True)
    lines = ["| size | non-embedding params | baseline | TST s=4 r=0.3 | gap (TST - baseline) |",
             "|---|---|---|---|---|"]
    lines += [f"| {size} | {params / 1e6:.2f}M | {b:.4f} | {t:.4f} | {t - b:+.4f} |" for size, params, b, t in rows]
    markdown = "\n".join(lines) + "\n"
    open(os.path.join(out, "gap_vs_size.md"), "w").write(markdown)
    print(markdown, end="")
    try:
        import matplotlib
    except ImportError:
        return 0
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([r[1] for r in rows], [r[3] - r[2] for r in rows], "-o")
    for size, params, b, t in rows:
        axis.annotate(size, (params, t - b), textcoords="offset points", xytext=(4, 4))
    axis.axhline(0, color="grey", linewidth=1)
    axis.set_xscale("log")
    axis.set_xlabel("non-embedding parameters")
    axis.set_ylabel("final val. loss: TST - baseline (nats)")
    axis.set_title("TST gap at equal steps vs model size (below 0: TST ahead)")
    figure.tight_layout()
    figure.savefig(os.path.join(out, "gap_vs_size.png"), dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

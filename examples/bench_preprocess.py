"""Benchmark: tools/preprocess_data.py against Megatron-LM's tools/preprocess_data.py, same machine,
input and tokenizer, 1 and 2 workers; median wall time of --repeats runs each, runs interleaved.

Megatron-LM's tool is not part of the megatron-core wheel: give --megatron-lm a checkout of
NVIDIA/Megatron-LM at tag core_v0.16.1 whose ``megatron/core`` is the installed megatron-core (and
--megatron-lm-pythonpath for the extra packages its imports need). Its outputs are compared with
ours byte for byte. Without --megatron-lm only our tool is measured.

  python examples/bench_preprocess.py --input corpus.jsonl --tokenizer-model tok.model \\
      --megatron-lm /tmp/mlm --megatron-lm-pythonpath /tmp/mlm/deps
"""

from __future__ import annotations

import argparse
import filecmp
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(command, env) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def count_tokens(prefix: str) -> int:
    """Tokens in a Megatron dataset: .bin size over the item size named in the .idx header."""
    with open(prefix + ".idx", "rb") as handle:
        code = handle.read(18)[17]  # 9-byte magic, 8-byte version, then the dtype code
    itemsize = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 8, 8: 2}[code]
    return os.path.getsize(prefix + ".bin") // itemsize


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True)
    parser.add_argument("--tokenizer-model", required=True)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--megatron-lm", default=None)
    parser.add_argument("--megatron-lm-pythonpath", default="")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench_preprocess_")
    common = ["--input", args.input, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
              args.tokenizer_model, "--append-eod", "--json-keys", "text"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    mlm_env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (args.megatron_lm, args.megatron_lm_pythonpath) if p)}
    tools = {"megatron_tst": lambda prefix, w: [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
                                               *common, "--output-prefix", prefix, "--workers", str(w), "--overwrite"]}
    if args.megatron_lm:
        tools["Megatron-LM"] = lambda prefix, w: [sys.executable, os.path.join(args.megatron_lm, "tools",
                                                  "preprocess_data.py"), *common, "--output-prefix", prefix,
                                                  "--workers", str(w)]
    times = {(tool, w): [] for tool in tools for w in args.workers}
    for repeat in range(args.repeats):
        for w in args.workers:
            for tool, command in tools.items():
                prefix = os.path.join(work, f"{tool}_{w}")
                for suffix in (".bin", ".idx"):
                    if os.path.exists(f"{prefix}_text_document{suffix}"):
                        os.remove(f"{prefix}_text_document{suffix}")
                times[(tool, w)].append(timed(command(prefix, w), mlm_env if tool == "Megatron-LM" else env))
    tokens = count_tokens(os.path.join(work, f"megatron_tst_{args.workers[0]}_text_document"))
    print(f"input {args.input}: {os.path.getsize(args.input):,} bytes, {tokens:,} tokens; "
          f"median of {args.repeats} runs")
    for w in args.workers:
        line = f"  {w} worker(s):"
        for tool in tools:
            median = statistics.median(times[(tool, w)])
            line += f"  {tool} {median:6.2f} s ({tokens / median:,.0f} tokens/s)"
        if args.megatron_lm:
            ratio = statistics.median(times[("Megatron-LM", w)]) / statistics.median(times[("megatron_tst", w)])
            same = all(filecmp.cmp(os.path.join(work, f"megatron_tst_{w}_text_document{s}"),
                                   os.path.join(work, f"Megatron-LM_{w}_text_document{s}"), shallow=False)
                       for s in (".bin", ".idx"))
            line += f"  speed-up {ratio:.2f}x, outputs byte-identical: {same}"
        print(line)


if __name__ == "__main__":
    main()

"""Benchmark: tools/preprocess_data.py against Megatron-LM's tools/preprocess_data.py on the same
machine, input and SentencePiece model, with 1 and 2 workers; median wall time of --repeats runs
each (the whole command: interpreter start, imports and tokenizer loading included), runs interleaved.

With --marginal each tool also runs on the input written twice over, and the difference of the two
times gives the marginal rate: tokens per second once started, what a corpus far larger than the
input would see.

Megatron-LM's tool is not part of the megatron-core wheel: give --megatron-lm a checkout of
NVIDIA/Megatron-LM at tag core_v0.16.1 whose ``megatron/core`` is the installed megatron-core (and
--megatron-lm-pythonpath for the extra packages its imports need). Its outputs are compared with
ours byte for byte. Without --megatron-lm only our tool is measured.

  python examples/bench_preprocess.py --input corpus.jsonl --tokenizer-model tok.model \\
      --megatron-lm /tmp/mlm --megatron-lm-pythonpath /tmp/mlm/deps --marginal
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron-core's DType codes


def timed(command, env) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return elapsed


def count_tokens(prefix: str) -> int:
    """Tokens in a Megatron dataset: .bin size over the item size named in the .idx header."""
    with open(prefix + ".idx", "rb") as handle:
        code = handle.read(18)[17]  # 9-byte magic, 8-byte version, then the dtype code
    return os.path.getsize(prefix + ".bin") // ITEMSIZE[code]


def same_files(a: str, b: str) -> bool:
    return all(filecmp.cmp(a + suffix, b + suffix, shallow=False) for suffix in (".bin", ".idx"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True)
    parser.add_argument("--tokenizer-model", required=True)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--marginal", action="store_true", help="also run on the input twice over")
    parser.add_argument("--megatron-lm", default=None)
    parser.add_argument("--megatron-lm-pythonpath", default="")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench_preprocess_")
    inputs = {"1x": os.path.abspath(args.input)}
    if args.marginal:
        inputs["2x"] = os.path.join(work, "input_2x.jsonl")
        with open(inputs["2x"], "wb") as out:
            for _ in range(2):
                with open(args.input, "rb") as handle:
                    shutil.copyfileobj(handle, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    mlm_env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (args.megatron_lm, args.megatron_lm_pythonpath) if p)}
    scripts = {"megatron_tst": os.path.join(ROOT, "tools", "preprocess_data.py")}
    if args.megatron_lm:
        scripts["Megatron-LM"] = os.path.join(args.megatron_lm, "tools", "preprocess_data.py")

    def command(tool, path, prefix, workers):
        return [sys.executable, scripts[tool], "--input", path, "--tokenizer-type", "SentencePieceTokenizer",
                "--tokenizer-model", args.tokenizer_model, "--append-eod", "--json-keys", "text",
                "--output-prefix", prefix, "--workers", str(workers), "--log-interval", "1000000"]

    times = {}
    try:
        for _ in range(args.repeats):
            for w in args.workers:
                for tool in scripts:
                    for size, path in inputs.items():
                        prefix = os.path.join(work, f"{tool}_{w}_{size}")
                        for suffix in (".bin", ".idx"):
                            if os.path.exists(f"{prefix}_text_document{suffix}"):
                                os.remove(f"{prefix}_text_document{suffix}")
                        run_env = mlm_env if tool == "Megatron-LM" else env
                        times.setdefault((tool, w, size), []).append(timed(command(tool, path, prefix, w), run_env))
        first = os.path.join(work, f"megatron_tst_{args.workers[0]}_1x_text_document")
        tokens = count_tokens(first)
        print(f"input {args.input}: {os.path.getsize(args.input):,} bytes, {tokens:,} tokens; "
              f"median of {args.repeats} runs, wall time of the whole command")
        for w in args.workers:
            line = f"  {w} worker(s):"
            median = {tool: statistics.median(times[(tool, w, "1x")]) for tool in scripts}
            for tool in scripts:
                line += f"  {tool} {median[tool]:6.2f} s ({tokens / median[tool]:,.0f} tokens/s)"
            if args.marginal:
                for tool in scripts:
                    extra = statistics.median(times[(tool, w, "2x")]) - median[tool]
                    line += f"  {tool} marginal {tokens / extra:,.0f} tokens/s"
            if args.megatron_lm:
                line += f"  speed-up {median['Megatron-LM'] / median['megatron_tst']:.2f}x"
                if args.marginal:
                    ratio = ((statistics.median(times[("Megatron-LM", w, "2x")]) - median["Megatron-LM"])
                             / (statistics.median(times[("megatron_tst", w, "2x")]) - median["megatron_tst"]))
                    line += f" (marginal {ratio:.2f}x)"
                same = all(same_files(os.path.join(work, f"megatron_tst_{w}_{size}_text_document"),
                                      os.path.join(work, f"Megatron-LM_{w}_{size}_text_document")) for size in inputs)
                line += f", outputs byte-identical: {same}"
            print(line)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

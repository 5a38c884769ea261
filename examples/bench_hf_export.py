"""Time and peak memory of the Hugging Face export on a 270M-shape checkpoint (CPU).

    OMP_NUM_THREADS=2 python examples/bench_hf_export.py --workdir /tmp/bench_hf [--dtype bf16|fp32]

1. Builds the 270M preset (random init, fp32, local spec) in one process and saves it with
   ``megatron_tst.checkpointing.save`` (the training entry's writer; weights only, no optimizer).
2. Runs ``tools/convert_checkpoint.py to-hf`` on it in a fresh process and reports its wall time and
   peak resident memory (the child's RSS high-water mark), next to the size of the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_checkpoint(save: str, tokenizer_dir: str):
    import megatron_tst  # noqa: F401
    from tokenizers import Tokenizer, models, pre_tokenizers

    from megatron_tst import checkpointing, parallel
    from megatron_tst.models import build_gpt_model, padded_vocab_size, preset, transformer_config

    arch = preset("270M")
    vocab = {f"t{i}": i for i in range(arch.vocab_size - 1)}
    vocab["<|endoftext|>"] = arch.vocab_size - 1
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    os.makedirs(tokenizer_dir, exist_ok=True)
    tokenizer.save(os.path.join(tokenizer_dir, "tokenizer.json"))
    parallel.initialize()
    model = build_gpt_model(arch, transformer_config(arch, transformer_impl="local"), tst=False)
    run_config = dict(model=dataclasses.asdict(arch), tst=None, parallel=checkpointing.model_parallel_layout(),
                      padded_vocab_size=padded_vocab_size(arch.vocab_size),
                      tokenizer=dict(type="HuggingFaceTokenizer", model=os.path.join(tokenizer_dir, "tokenizer.json")))
    checkpointing.save(save, 1, [model], None, None, {}, run_config)
    parameters = sum(p.numel() for p in model.parameters())
    parallel.shutdown()
    return parameters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/bench_hf_export")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="fp32")
    args = parser.parse_args()
    save, output = os.path.join(args.workdir, "ckpt"), os.path.join(args.workdir, f"hf-{args.dtype}")
    if not os.path.isdir(save):
        parameters = make_checkpoint(save, os.path.join(args.workdir, "tokenizer"))
        print(f"made a 270M-shape checkpoint: {parameters:,} parameters under {save}")
    command = [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "to-hf", "--input", save,
               "--output", output, "--dtype", args.dtype, "--overwrite"]
    started = time.time()
    subprocess.run(command, check=True)
    elapsed = time.time() - started
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2  # KiB on Linux
    weights = sum(os.path.getsize(os.path.join(output, f)) for f in os.listdir(output) if f.endswith(".safetensors"))
    print(json.dumps({"command": " ".join(command), "seconds": round(elapsed, 1), "peak_rss_gib": round(peak_gib, 2),
                      "weights_gib": round(weights / 1024 ** 3, 2), "dtype": args.dtype}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

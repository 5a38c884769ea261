#!/usr/bin/env python
"""Checkpoint conversions.

  tst-to-ntp   a TST phase-1 checkpoint (at the switch iteration) -> the start of next-token recovery
               (see megatron_tst/conversion.py; the two-phase launcher runs this for you)
  to-hf        a checkpoint (any TP/PP/EP layout) -> a Hugging Face folder (Llama, Qwen3, Qwen3-MoE)
  from-hf      a Hugging Face folder -> a weights-only checkpoint for --load (see megatron_tst/hf_conversion.py)

  python tools/convert_checkpoint.py to-hf --input runs/270m/recovery --output hf/270m
  python tools/convert_checkpoint.py from-hf --input hf/llama --output runs/llama-init --tensor-model-parallel-size 2
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megatron_tst  # noqa: E402,F401  (first: CPU platform layer)
from megatron_tst.checkpointing import CheckpointError  # noqa: E402
from megatron_tst.conversion import tst_to_ntp  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("tst-to-ntp", help="phase-1 checkpoint -> recovery start")
    convert.add_argument("--input", required=True, help="the phase-1 job's --save directory")
    convert.add_argument("--output", required=True, help="the recovery job's --save directory")
    convert.add_argument("--reset-optimizer", action="store_true", help="recovery starts with fresh Adam state")
    convert.add_argument("--reinit-embeddings", action="store_true",
                         help="recovery re-initialises the input embedding and output head")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    export = commands.add_parser("to-hf", help="checkpoint -> Hugging Face save_pretrained folder")
    export.add_argument("--input", required=True, help="a --save directory (its newest checkpoint) or an iter_* folder")
    export.add_argument("--output", required=True, help="the Hugging Face folder to write")
    export.add_argument("--model-type", default="auto", help="auto, llama, qwen3 or qwen3_moe (auto: from the shape)")
    export.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), default=None,
                        help="weights' dtype (default: the checkpoint's)")
    export.add_argument("--tokenizer-model", default=None, help="tokenizer (default: the one the run recorded)")
    export.add_argument("--tokenizer-type", default=None, help="SentencePieceTokenizer or HuggingFaceTokenizer")
    export.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer's vocab.json (with --merge-file; "
                        "default: the ones the run recorded)")
    export.add_argument("--merge-file", default=None, help="GPT2BPETokenizer's merges.txt")
    export.add_argument("--allow-superposition", action="store_true",
                        help="export a TST phase-1 checkpoint even though it is not a next-token model yet")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    imported = commands.add_parser("from-hf", help="Hugging Face folder -> weights-only checkpoint for --load")
    imported.add_argument("--input", required=True, help="a save_pretrained folder (llama, qwen3, qwen3_moe)")
    imported.add_argument("--output", required=True, help="the --save directory to write (use it as --load)")
    imported.add_argument("--tensor-model-parallel-size", type=int, default=1)
    imported.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    imported.add_argument("--expert-model-parallel-size", type=int, default=1)
    imported.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    if args.command in ("to-hf", "from-hf"):
        return _hf(args)
    try:
        written = tst_to_ntp(args.input, args.output, reset_optimizer=args.reset_optimizer,
                             reinit_embeddings=args.reinit_embeddings, overwrite=args.overwrite)
    except (CheckpointError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {written}")
    return 0


def _hf(args) -> int:
    from megatron_tst.hf_conversion import ConversionError, from_hf, to_hf

    try:
        if args.command == "to-hf":
            written = to_hf(args.input, args.output, model_type=args.model_type, dtype=args.dtype,
                            overwrite=args.overwrite, allow_superposition=args.allow_superposition,
                            tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
                            vocab_file=args.vocab_file, merge_file=args.merge_file)
        else:
            written = from_hf(args.input, args.output, args.tensor_model_parallel_size,
                              args.pipeline_model_parallel_size, args.expert_model_parallel_size,
                              overwrite=args.overwrite)
    except (ConversionError, CheckpointError, FileExistsError, FileNotFoundError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

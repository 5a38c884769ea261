#!/usr/bin/env python
"""Train a SentencePiece tokenizer on jsonl documents (the same inputs preprocess_data.py reads).

Writes ``<output-prefix>.model`` and ``.vocab``. Defaults keep text lossless (identity
normalisation, whitespace kept, byte fallback for anything unseen), so decoding the ids of a
document gives the document back (except U+2581, the character SentencePiece itself writes for a space).

  python tools/train_tokenizer.py --input corpus.jsonl --output-prefix tok --vocab-size 8000
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import signal
import sys


def texts(patterns, key, limit_bytes, seen):
    """The documents' texts, up to limit_bytes; seen counts documents and bytes."""
    for pattern in patterns:
        for name in sorted(glob.glob(pattern)):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(name, "rt", encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    try:
                        text = json.loads(line).get(key)
                    except (json.JSONDecodeError, AttributeError):
                        continue
                    if isinstance(text, str) and text.strip():
                        yield text
                        seen["documents"] += 1
                        seen["bytes"] += len(text.encode("utf-8", errors="replace"))
                        if limit_bytes and seen["bytes"] >= limit_bytes:
                            return


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="jsonl or jsonl.gz files or globs")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--no-byte-fallback", action="store_true")
    parser.add_argument("--max-bytes", type=int, default=200_000_000, help="train on at most this much text")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count() or 1)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    import sentencepiece

    if not any(glob.glob(p) for p in args.input):
        print(f"error: --input {' '.join(args.input)} matches no file", file=sys.stderr)
        return 1
    model = args.output_prefix + ".model"
    if os.path.exists(model) and not args.overwrite:
        print(f"error: {model} already exists; pass --overwrite to replace it", file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    partial = f"{args.output_prefix}.tmp-{os.getpid()}"
    seen = {"documents": 0, "bytes": 0}
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # so that `finally` cleans up
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=texts(args.input, args.json_key, args.max_bytes, seen),
            model_prefix=partial, vocab_size=args.vocab_size, model_type=args.model_type,
            byte_fallback=not args.no_byte_fallback, character_coverage=0.9995,
            normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
            allow_whitespace_only_pieces=True, max_sentence_length=1 << 20, num_threads=args.threads,
            train_extremely_large_corpus=False, minloglevel=2,
        )
        for suffix in (".model", ".vocab"):
            os.replace(partial + suffix, args.output_prefix + suffix)
    except RuntimeError as error:
        if not seen["documents"]:
            print(f"error: no {args.json_key!r} text in {' '.join(args.input)}; give jsonl with that key "
                  "(--json-key names another)", file=sys.stderr)
        else:
            print(f"error: SentencePiece training failed: {str(error).splitlines()[0]} "
                  "(a smaller --vocab-size often fixes a small corpus)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no tokenizer written", file=sys.stderr)
        return 130
    finally:
        for suffix in (".model", ".vocab"):
            if os.path.exists(partial + suffix):
                os.remove(partial + suffix)
    processor = sentencepiece.SentencePieceProcessor(model_file=model)
    print(f"wrote {model} and {args.output_prefix}.vocab ({len(processor):,} pieces, {args.model_type}; "
          f"trained on {seen['documents']:,} documents, {seen['bytes']:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

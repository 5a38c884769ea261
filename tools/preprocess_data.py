#!/usr/bin/env python
"""jsonl -> Megatron indexed dataset (``<prefix>_<key>_document.bin/.idx``), as Megatron-LM's tool.

Each JSON line is one document of one sequence (its tokens, then EOD with --append-eod), in input
order, written with megatron-core's index format and Megatron-LM's token ids; for valid input the
files are byte-identical to Megatron-LM's tools/preprocess_data.py. Lines it cannot use are skipped
and counted (malformed JSON, a missing or non-string key, non-UTF-8 bytes, empty text), the first
few with their line numbers; ``--on-error fail`` stops at the first instead. Output is written under
temporary names and renamed only when complete; existing output is kept unless --overwrite.

  python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
      --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod --workers 2
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import multiprocessing
import os
import struct
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

CHUNK_LINES = 1024
SHOW_BAD_LINES = 5


class InputError(Exception):
    pass


def input_files(patterns: list[str]) -> list[str]:
    files = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern))
        if not matched:
            raise InputError(f"--input {pattern} matches no file")
        files.extend(matched)
    return files


def read_chunks(files):
    """(file, first line number, [raw line bytes]) in input order."""
    for name in files:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(name, "rb") as handle:
            chunk, first = [], 1
            for number, line in enumerate(handle, start=1):
                if not chunk:
                    first = number
                chunk.append(line)
                if len(chunk) == CHUNK_LINES:
                    yield name, first, chunk
                    chunk = []
            if chunk:
                yield name, first, chunk


class Encoder:
    """Runs in each worker: JSON decoding, checks and batched tokenisation of one chunk."""

    def __init__(self, args):
        self.args = args

    def initialize(self):
        from megatron_tst.data.tokenizers import load_tokenizer

        # the machine's cores shared among the workers (SentencePiece batches are threaded)
        threads = max(1, (os.cpu_count() or 1) // self.args.workers)
        Encoder.tokenizer = load_tokenizer(self.args.tokenizer_type, self.args.tokenizer_model, threads=threads)

    def encode(self, item):
        name, first, lines = item
        texts = {key: [] for key in self.args.json_keys}
        bad = []  # (file, line, reason)
        nbytes = 0
        for offset, raw in enumerate(lines):
            nbytes += len(raw)
            reason = None
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                reason = "non-UTF-8 bytes"
            except json.JSONDecodeError:
                reason = "malformed JSON"
            else:
                if not isinstance(record, dict):
                    reason = "malformed JSON"
                else:
                    for key in self.args.json_keys:
                        value = record.get(key)
                        if value is None:
                            reason = f"missing key {key!r}"
                        elif not isinstance(value, str):
                            reason = f"key {key!r} is not a string"
                        elif not value.strip():
                            reason = "empty text"
                        if reason:
                            break
            if reason:
                bad.append((name, first + offset, reason))
                continue
            for key in self.args.json_keys:
                texts[key].append(record[key])
        eod = Encoder.tokenizer.eod
        out = {}
        for key, values in texts.items():
            ids = Encoder.tokenizer.tokenize_batch(values) if values else []
            lengths = []
            flat = []
            for doc in ids:
                if self.args.append_eod:
                    doc.append(eod)
                lengths.append(len(doc))
                flat.extend(doc)
            out[key] = (np.asarray(flat, dtype=self.args.dtype), lengths)
        return out, bad, nbytes


def output_paths(prefix: str, key: str) -> tuple[str, str]:
    return f"{prefix}_{key}_document.bin", f"{prefix}_{key}_document.idx"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="jsonl or jsonl.gz files or globs")
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokenizer-type", required=True, choices=("SentencePieceTokenizer", "HuggingFaceTokenizer"))
    parser.add_argument("--tokenizer-model", required=True)
    parser.add_argument("--append-eod", action="store_true")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--log-interval", type=int, default=10000, help="documents between progress lines")
    parser.add_argument("--on-error", choices=("skip", "fail"), default="skip")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (InputError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def optimal_dtype(vocab_size: int):
    """megatron-core's DType.optimal_dtype."""
    return np.uint16 if vocab_size < 65500 else np.int32


_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
                np.float32: 7, np.uint16: 8}  # megatron-core's DType codes
_INDEX_HEADER = b"MMIDIDX\x00\x00"


def write_index(path: str, dtype, sequence_lengths: np.ndarray) -> None:
    """megatron-core's .idx layout (one sequence per document), written with numpy: importing
    megatron-core costs each process seconds, and its writer loops in Python over sequences.
    tests/test_tools.py checks the bytes against megatron-core's IndexedDatasetBuilder."""
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    with open(path, "wb") as handle:
        handle.write(_INDEX_HEADER)
        handle.write(struct.pack("<Q", 1))
        handle.write(struct.pack("<B", _DTYPE_CODES[dtype]))
        handle.write(struct.pack("<Q", len(lengths)))
        handle.write(struct.pack("<Q", len(lengths) + 1))
        handle.write(lengths.tobytes(order="C"))
        handle.write(pointers.tobytes(order="C"))
        handle.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes(order="C"))


def run(args) -> int:
    from megatron_tst.data.tokenizers import load_tokenizer

    files = input_files(args.input)
    tokenizer = load_tokenizer(args.tokenizer_type, args.tokenizer_model)
    args.dtype = optimal_dtype(tokenizer.vocab_size)
    if args.workers < 1:
        raise InputError(f"--workers must be >= 1, got {args.workers}")
    outputs = {key: output_paths(args.output_prefix, key) for key in args.json_keys}
    existing = [path for pair in outputs.values() for path in pair if os.path.exists(path)]
    if existing and not args.overwrite:
        raise InputError(f"{existing[0]} already exists; pass --overwrite to replace it")
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    temp = {key: (f"{bin_path}.tmp-{os.getpid()}", f"{idx_path}.tmp-{os.getpid()}")
            for key, (bin_path, idx_path) in outputs.items()}
    bins = {key: open(paths[0], "wb") for key, paths in temp.items()}
    lengths = {key: [] for key in args.json_keys}
    skipped, shown = Counter(), []
    documents = tokens = nbytes = 0
    started = last_log = time.time()
    encoder = Encoder(args)
    try:
        if args.workers == 1:
            encoder.initialize()
            results = map(encoder.encode, read_chunks(files))
            pool = None
        else:
            pool = multiprocessing.Pool(args.workers, initializer=encoder.initialize)
            results = pool.imap(encoder.encode, read_chunks(files), chunksize=1)
        for out, bad, chunk_bytes in results:
            nbytes += chunk_bytes
            for name, line, reason in bad:
                if args.on_error == "fail":
                    raise InputError(f"{name}:{line}: {reason} (rerun with --on-error skip to skip such lines)")
                skipped[reason] += 1
                if len(shown) < SHOW_BAD_LINES:
                    shown.append(f"{name}:{line} ({reason})")
            for key, (flat, doc_lengths) in out.items():
                bins[key].write(flat.tobytes(order="C"))
                lengths[key].extend(doc_lengths)
                if key == args.json_keys[0]:
                    documents += len(doc_lengths)
                tokens += len(flat)
            if time.time() - last_log > 1 or (args.log_interval and documents % args.log_interval < len(out)):
                elapsed = time.time() - started
                print(f"\rprocessed {documents:,} documents ({documents / elapsed:,.0f} docs/s, "
                      f"{tokens / elapsed:,.0f} tokens/s, {nbytes / elapsed / 2**20:.1f} MB/s)",
                      end="", file=sys.stderr, flush=True)
                last_log = time.time()
        if pool is not None:
            pool.close()
            pool.join()
        for key in args.json_keys:
            bins[key].close()
            write_index(temp[key][1], args.dtype, np.asarray(lengths[key], dtype=np.int32))
        for key in args.json_keys:  # complete: now give the files their names
            os.replace(temp[key][0], outputs[key][0])
            os.replace(temp[key][1], outputs[key][1])
    except BaseException:
        if "pool" in locals() and pool is not None:
            pool.terminate()
        for key in args.json_keys:
            bins[key].close()
            for path in temp[key]:
                if os.path.exists(path):
                    os.remove(path)
        raise
    elapsed = time.time() - started
    out_bytes = sum(os.path.getsize(path) for pair in outputs.values() for path in pair)
    print(f"\rdone in {elapsed:.1f} s: {documents:,} documents, {tokens:,} tokens "
          f"({tokens / elapsed:,.0f} tokens/s), skipped {sum(skipped.values()):,} lines"
          + (f" ({', '.join(f'{n} {r}' for r, n in sorted(skipped.items()))})" if skipped else "")
          + f", wrote {out_bytes:,} bytes:", file=sys.stderr)
    for line in shown:
        print(f"  skipped {line}", file=sys.stderr)
    for bin_path, idx_path in outputs.values():
        print(f"  {bin_path}\n  {idx_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""jsonl -> Megatron indexed dataset (``<prefix>_<key>_document.bin/.idx``), as Megatron-LM's tool.

Each JSON line is one document of one sequence (its tokens, then EOD with --append-eod), in input
order, written in megatron-core's indexed format with the ids megatron-core's tokenizer gives; for
valid input the files are byte-identical to Megatron-LM's tools/preprocess_data.py. Lines it cannot
use are skipped and counted (a blank line, malformed JSON, a missing or non-string key, non-UTF-8
bytes, empty text, text with no tokens), the first few with their line numbers; ``--on-error fail``
stops at the first instead. Output is written under temporary names and renamed only when complete;
existing output is kept unless --overwrite.

Workers: --workers N processes tokenize chunks of lines, the machine's cores shared among them
(SentencePiece batches run on cores/N threads each); --workers 1 tokenizes in this process, one
chunk per core at a time on threads (the tokenizers release the GIL). Either way every core works.

  python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
      --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod --workers 2
"""

from __future__ import annotations

import argparse
import glob
import gzip
import itertools
import json
import multiprocessing
import os
import signal
import struct
import sys
import time
import zlib
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megatron_tst  # noqa: E402,F401  (first, before anything imports megatron.core)
import numpy as np  # noqa: E402

CHUNK_LINES = 4096  # a chunk (one task for a worker) ends at this many lines or bytes
CHUNK_BYTES = 1 << 20
SHOW_BAD_LINES = 5


class InputError(Exception):
    pass


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def input_files(patterns: list[str]) -> list[str]:
    files = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern))
        if not matched:
            raise InputError(f"--input {pattern} matches no file; give jsonl (or .jsonl.gz) files or a glob")
        for name in matched:
            if os.path.isdir(name):
                raise InputError(f"--input {name} is a folder; give its files, e.g. '{os.path.join(name, '*.jsonl')}'")
        files.extend(matched)
    return files


def read_chunks(files):
    """(file, first line number, [raw line bytes], input bytes read so far) in input order; the
    position counts compressed bytes for .gz files (what the progress bar measures against)."""
    done = 0
    for name in files:
        with open(name, "rb") as raw:
            handle = gzip.GzipFile(fileobj=raw, mode="rb") if name.endswith(".gz") else raw
            chunk, size, first, offset = [], 0, 1, 0
            try:
                for number, line in enumerate(handle, start=1):
                    if not chunk:
                        first = number
                    chunk.append(line)
                    size += len(line)
                    if len(chunk) >= CHUNK_LINES or size >= CHUNK_BYTES:
                        offset = raw.tell() if handle is not raw else offset + size
                        yield name, first, chunk, done + offset
                        chunk, size = [], 0
            except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
                raise InputError(f"{name}: cannot read it ({error}); is it a damaged or truncated .gz file?") from None
            if chunk:
                yield name, first, chunk, done + os.path.getsize(name)
        done += os.path.getsize(name)


def check_record(raw: bytes, keys) -> tuple[dict | None, str | None]:
    """The decoded record, or None and why the line cannot be used."""
    if not raw.strip():
        return None, "blank line"
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "non-UTF-8 bytes"
    except json.JSONDecodeError:
        return None, "malformed JSON"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    for key in keys:
        value = record.get(key)
        if value is None:
            return None, f"missing key {key!r}"
        if not isinstance(value, str):
            return None, f"key {key!r} is not a string"
        if not value.strip():
            return None, "empty text"
        if b"\\ud" in raw or b"\\uD" in raw:  # JSON escapes can spell lone surrogates, which no tokenizer takes
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return None, "invalid Unicode escape"
    return record, None


class Encoder:
    """Runs in each worker: JSON decoding, checks and batched tokenisation of one chunk."""

    def __init__(self, args):
        self.args = args

    def initialize(self):
        """In each worker: the parent handles Ctrl-C and SIGTERM and ends the workers. A forked worker
        has the parent's tokenizer already; other start methods load it again."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if getattr(Encoder, "tokenizer", None) is None:
            Encoder.tokenizer = load_for(self.args)

    def encode(self, item):
        name, first, lines, position = item
        keys = self.args.json_keys
        records, numbers, bad = [], [], []  # bad: (file, line, reason)
        nbytes = 0
        for offset, raw in enumerate(lines):
            nbytes += len(raw)
            record, reason = check_record(raw, keys)
            if reason:
                bad.append((name, first + offset, reason))
            else:
                records.append(record)
                numbers.append(first + offset)
        tokenizer = Encoder.tokenizer
        ids = {key: tokenizer.tokenize_batch([record[key] for record in records]) if records else [] for key in keys}
        empty = {index for key in keys for index, doc in enumerate(ids[key]) if not doc}
        if empty:  # text that gives no tokens at all (say, only characters the tokenizer drops)
            bad.extend((name, numbers[index], "no tokens") for index in sorted(empty))
            ids = {key: [doc for index, doc in enumerate(docs) if index not in empty] for key, docs in ids.items()}
            bad.sort(key=lambda entry: entry[1])
        out = {}
        for key, docs in ids.items():
            if self.args.append_eod:
                for doc in docs:
                    doc.append(tokenizer.eod)
            lengths = np.fromiter(map(len, docs), dtype=np.int32, count=len(docs))
            flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=self.args.dtype, count=int(lengths.sum()))
            out[key] = (flat, lengths)
        return out, bad, nbytes, position


def load_for(args):
    """The tokenizer, with the machine's cores shared among the workers (threads for SentencePiece
    batches and HuggingFace's thread pool)."""
    from megatron_tst.data.tokenizers import load_tokenizer

    # one worker runs chunks on one thread per core itself (see threaded_map); workers share the cores
    threads = 1 if args.workers == 1 else max(1, available_cores() // args.workers)
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
    return load_tokenizer(args.tokenizer_type, args.tokenizer_model, vocab_size=args.vocab_size, threads=threads,
                          vocab_file=args.vocab_file, merge_file=args.merge_file,
                          tiktoken_pattern=args.tiktoken_pattern,
                          tiktoken_num_special_tokens=args.tiktoken_num_special_tokens,
                          special_tokens=args.tokenizer_special_tokens)


def output_paths(prefix: str, key: str) -> tuple[str, str]:
    return f"{prefix}_{key}_document.bin", f"{prefix}_{key}_document.idx"


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


def threaded_map(function, items, threads: int):
    """function over items on threads (the tokenizers release the GIL), in order, a few items ahead."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    executor = ThreadPoolExecutor(threads)
    pending = deque()
    try:
        for item in items:
            pending.append(executor.submit(function, item))
            if len(pending) > 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


class Progress:
    """A progress bar on a terminal; a line every --log-interval documents otherwise."""

    def __init__(self, total_bytes: int, log_interval: int):
        self.total, self.interval = max(1, total_bytes), log_interval
        self.tty = sys.stderr.isatty()
        self.started = self.last = time.time()
        self.logged = 0

    def update(self, documents: int, tokens: int, nbytes: int, position: int) -> None:
        now = time.time()
        if self.tty:
            if now - self.last < 0.2:
                return
        elif not self.interval or documents // self.interval == self.logged // self.interval:
            return
        self.last, self.logged = now, documents
        elapsed = max(now - self.started, 1e-9)
        fraction = min(1.0, position / self.total)
        rates = (f"{documents / elapsed:,.0f} docs/s, {tokens / elapsed:,.0f} tokens/s, "
                 f"{nbytes / elapsed / 2**20:.1f} MB/s")
        if self.tty:
            eta = elapsed * (1 - fraction) / fraction if fraction > 0 else 0
            bar = "#" * int(fraction * 24)
            print(f"\r[{bar:24s}] {fraction:4.0%} processed {documents:,} documents ({rates}), "
                  f"ETA {eta:,.0f} s ", end="", file=sys.stderr, flush=True)
        else:
            print(f"processed {documents:,} documents, {fraction:.0%} of the input ({rates})",
                  file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.tty:
            print(file=sys.stderr)


class Interrupted(KeyboardInterrupt):
    signum = signal.SIGINT


def _interrupted(signum, frame):
    error = Interrupted(f"signal {signum}")
    error.signum = signum
    raise error


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input and output")
    group.add_argument("--input", nargs="+", required=True, help="jsonl or jsonl.gz files or globs, read in order")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize (default: text)")
    group.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    group.add_argument("--overwrite", action="store_true", help="replace existing output")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True,
                       choices=("SentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer",
                                "GPTSentencePieceTokenizer", "Llama2Tokenizer", "NullTokenizer", "TikTokenizer"))
    group.add_argument("--tokenizer-model",
                       help="a SentencePiece .model; for HuggingFaceTokenizer a folder or a tokenizer.json")
    group.add_argument("--vocab-file", help="GPT2BPETokenizer: GPT-2's vocab.json")
    group.add_argument("--merge-file", help="GPT2BPETokenizer: GPT-2's merges.txt")
    group.add_argument("--vocab-size", type=int, help="NullTokenizer (text of space-separated ids below N): N, "
                       "its EOD N; TikTokenizer: its vocabulary size")
    group.add_argument("--tiktoken-pattern", choices=("v1", "v2"), help="TikTokenizer's split pattern")
    group.add_argument("--tiktoken-num-special-tokens", type=int, help="TikTokenizer (default 1000)")
    group.add_argument("--tokenizer-special-tokens", nargs="+", help="TikTokenizer's special tokens")
    group.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1; all cores "
                       "are used either way)")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="documents between progress lines when stderr is not a terminal")
    group.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                       help="skip and count unusable lines (default), or stop at the first")
    group = parser.add_argument_group("Megatron-LM flags with no use here")
    group.add_argument("--partitions", type=int, default=1, help="accepted; --workers does the parallel work")
    group.add_argument("--keep-sequential-samples", action="store_true", help="accepted; order is always kept")
    group.add_argument("--split-sentences", action="store_true", help="not supported")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (InputError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:
        print("interrupted: no output written", file=sys.stderr)
        return 128 + int(getattr(error, "signum", signal.SIGINT))


def run(args) -> int:
    if args.split_sentences:
        raise InputError("--split-sentences is not supported: every JSON line is one document of one sequence, "
                         "as Megatron-LM's tool without it; drop the flag")
    if args.workers < 1:
        raise InputError(f"--workers must be >= 1, got {args.workers}")
    if args.partitions != 1:
        print(f"note: --partitions {args.partitions} is not needed here; --workers {args.workers} does the work",
              file=sys.stderr)
    files = input_files(args.input)
    outputs = {key: output_paths(args.output_prefix, key) for key in args.json_keys}
    existing = [path for pair in outputs.values() for path in pair if os.path.exists(path)]
    if existing and not args.overwrite:
        raise InputError(f"{existing[0]} already exists; pass --overwrite to replace it")
    Encoder.tokenizer = tokenizer = load_for(args)  # forked workers inherit it
    if args.append_eod and tokenizer.eod is None:
        raise InputError(f"{args.tokenizer_model} has no end-of-document token for --append-eod; use a tokenizer "
                         "with one (SentencePiece: eos_id; HuggingFace: eos_token) or drop --append-eod")
    args.dtype = optimal_dtype(tokenizer.vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    temp = {key: (f"{bin_path}.tmp-{os.getpid()}", f"{idx_path}.tmp-{os.getpid()}")
            for key, (bin_path, idx_path) in outputs.items()}
    bins, lengths = {}, {key: [] for key in args.json_keys}
    skipped, shown = Counter(), []
    documents = tokens = nbytes = 0
    progress = Progress(sum(os.path.getsize(name) for name in files), args.log_interval)
    encoder, pool = Encoder(args), None
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        for key, paths in temp.items():
            bins[key] = open(paths[0], "wb")
        if args.workers == 1:  # in this process, a chunk per core at a time
            results = threaded_map(encoder.encode, read_chunks(files), available_cores())
        else:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            pool = context.Pool(args.workers, initializer=encoder.initialize)
            results = pool.imap(encoder.encode, read_chunks(files), chunksize=1)
        signal.signal(signal.SIGTERM, _interrupted)  # after the fork: the workers keep the default
        for out, bad, chunk_bytes, position in results:
            nbytes += chunk_bytes
            for name, line, reason in bad:
                if args.on_error == "fail":
                    raise InputError(f"{name}:{line}: {reason} (rerun with --on-error skip to skip such lines)")
                skipped[reason] += 1
                if len(shown) < SHOW_BAD_LINES:
                    shown.append(f"{name}:{line} ({reason})")
            for key, (flat, doc_lengths) in out.items():
                bins[key].write(memoryview(flat))
                lengths[key].append(doc_lengths)
                tokens += len(flat)
            documents += len(out[args.json_keys[0]][1])
            progress.update(documents, tokens, nbytes, position)
        if pool is not None:
            pool.close()
            pool.join()
        for key in args.json_keys:
            bins[key].close()
            all_lengths = np.concatenate(lengths[key]) if lengths[key] else np.zeros(0, np.int32)
            write_index(temp[key][1], args.dtype, all_lengths)
        for key in args.json_keys:  # complete: now give the files their names, the .idx last
            os.replace(temp[key][0], outputs[key][0])
            os.replace(temp[key][1], outputs[key][1])
    except BaseException:
        if pool is not None:
            pool.terminate()
        for key in args.json_keys:
            if key in bins:
                bins[key].close()
            for path in temp[key]:
                if os.path.exists(path):
                    os.remove(path)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        progress.finish()
    elapsed = time.time() - progress.started
    out_bytes = sum(os.path.getsize(path) for pair in outputs.values() for path in pair)
    print(f"done in {elapsed:.1f} s: {documents:,} documents, {tokens:,} tokens "
          f"({tokens / max(elapsed, 1e-9):,.0f} tokens/s), skipped {sum(skipped.values()):,} lines"
          + (f" ({', '.join(f'{n} {r}' for r, n in sorted(skipped.items()))})" if skipped else "")
          + f", wrote {out_bytes:,} bytes:", file=sys.stderr)
    for line in shown:
        print(f"  skipped {line}", file=sys.stderr)
    for bin_path, idx_path in outputs.values():
        print(f"  {bin_path}\n  {idx_path}", file=sys.stderr)
    if documents == 0:
        print("warning: no documents; the output is an empty dataset", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

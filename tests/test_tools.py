"""Data tools: corpus from this machine, SentencePiece training, preprocess_data into Megatron's format."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from megatron_tst.data.tokenizers import Tokenizer, _PlainSentencePiece, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")


def tool(name, *argv, check=True):
    result = subprocess.run([sys.executable, os.path.join(TOOLS, name), *map(str, argv)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    """Real text (the standard library) and a SentencePiece model trained on it."""
    folder = tmp_path_factory.mktemp("tools")
    corpus = folder / "stdlib.jsonl"
    result = tool("make_corpus.py", "--sources", "stdlib", "--output", corpus, "--max-bytes", 1_500_000)
    assert "stdlib" in result.stdout and "documents" in result.stdout
    tool("train_tokenizer.py", "--input", corpus, "--output-prefix", folder / "tok", "--vocab-size", 2000,
         "--threads", 2)
    return folder, corpus, str(folder / "tok.model")


def read_documents(path):
    with open(path) as handle:
        return [json.loads(line)["text"] for line in handle]


def test_make_corpus_writes_real_documents(corpus_and_tokenizer):
    _, corpus, _ = corpus_and_tokenizer
    documents = [json.loads(line) for line in open(corpus)]
    assert len(documents) > 20 and all(d["source"] == "stdlib" for d in documents)
    assert any("def " in d["text"] for d in documents)
    assert sum(len(d["text"].encode()) for d in documents) >= 1_500_000
    again = tool("make_corpus.py", "--sources", "stdlib", "--output", corpus, check=False)
    assert again.returncode == 1 and "already exists; pass --overwrite" in again.stderr


def test_preprocess_round_trip_and_megatron_layout(corpus_and_tokenizer, tmp_path):
    _, corpus, model = corpus_and_tokenizer
    tool("preprocess_data.py", "--input", corpus, "--output-prefix", tmp_path / "out",
         "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model, "--append-eod", "--workers", 2)
    tokenizer = load_tokenizer("SentencePieceTokenizer", model)
    assert tokenizer.vocab_size == 2000 and tokenizer.eod == 2  # megatron-core's defaults: EOD is </s>
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    documents = read_documents(corpus)
    assert len(dataset) == len(documents) and dataset.index.dtype == np.uint16
    for index, text in enumerate(documents):
        ids = dataset[index]
        assert ids[-1] == tokenizer.eod
        assert tokenizer.detokenize(ids[:-1]) == text  # lossless tokenizer: the document comes back


def test_output_is_byte_identical_to_megatron_cores_builder(corpus_and_tokenizer, tmp_path):
    """The same documents written one by one with megatron-core's IndexedDatasetBuilder (what
    Megatron-LM's tool does) give the same bytes, with 1 and with 2 workers."""
    _, corpus, model = corpus_and_tokenizer
    tokenizer = load_tokenizer("SentencePieceTokenizer", model)
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=DType.optimal_dtype(tokenizer.vocab_size))
    for text in read_documents(corpus):
        ids = tokenizer.tokenize(text) + [tokenizer.eod]
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(str(tmp_path / "ref.idx"))
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        tool("preprocess_data.py", "--input", corpus, "--output-prefix", prefix, "--tokenizer-type",
             "SentencePieceTokenizer", "--tokenizer-model", model, "--append-eod", "--workers", workers)
        for suffix in ("bin", "idx"):
            assert open(f"{prefix}_text_document.{suffix}", "rb").read() == open(tmp_path / f"ref.{suffix}", "rb").read()


def test_plain_sentencepiece_shortcut_equals_megatron_cores_tokenizer(corpus_and_tokenizer):
    _, corpus, model = corpus_and_tokenizer
    fast = load_tokenizer("SentencePieceTokenizer", model, threads=2)
    megatron = Tokenizer("SentencePieceTokenizer", model)  # megatron-core's build_tokenizer
    assert isinstance(fast, _PlainSentencePiece)  # the shortcut is in use for this model
    assert (fast.vocab_size, fast.eod) == (megatron.vocab_size, megatron.eod)
    texts = read_documents(corpus)[:50] + ["", " leading and  double  spaces ", "tabs\tand\nnewlines\n"]
    assert fast.tokenize_batch(texts) == [megatron.tokenize(t) for t in texts]


def test_bad_lines_are_skipped_counted_and_named(corpus_and_tokenizer, tmp_path):
    _, _, model = corpus_and_tokenizer
    path = tmp_path / "bad.jsonl.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(b'{"text": "good one"}\n')
        handle.write(b'{"text": "broken\n')                 # line 2: malformed JSON
        handle.write(b'{"other": "no text key"}\n')         # line 3: missing key
        handle.write(b'{"text": "caf\xe9 latin-1"}\n')      # line 4: non-UTF-8
        handle.write(b'{"text": "   "}\n')                  # line 5: empty text
        handle.write(b'{"text": "good two"}\n')
    result = tool("preprocess_data.py", "--input", path, "--output-prefix", tmp_path / "bad", "--tokenizer-type",
                  "SentencePieceTokenizer", "--tokenizer-model", model, "--append-eod")
    assert "2 documents" in result.stderr and "skipped 4 lines" in result.stderr
    for reason in ("1 malformed JSON", "1 missing key 'text'", "1 non-UTF-8 bytes", "1 empty text"):
        assert reason in result.stderr
    assert f"{path}:2 (malformed JSON)" in result.stderr and f"{path}:4 (non-UTF-8 bytes)" in result.stderr
    assert len(IndexedDataset(str(tmp_path / "bad_text_document"))) == 2

    failed = tool("preprocess_data.py", "--input", path, "--output-prefix", tmp_path / "strict", "--tokenizer-type",
                  "SentencePieceTokenizer", "--tokenizer-model", model, "--on-error", "fail", check=False)
    assert failed.returncode == 1 and f"{path}:2: malformed JSON" in failed.stderr
    assert not [name for name in os.listdir(tmp_path) if name.startswith("strict")]  # nothing left behind

    again = tool("preprocess_data.py", "--input", path, "--output-prefix", tmp_path / "bad", "--tokenizer-type",
                 "SentencePieceTokenizer", "--tokenizer-model", model, check=False)
    assert again.returncode == 1 and "already exists; pass --overwrite" in again.stderr


def test_an_interrupted_run_leaves_nothing_that_looks_complete(corpus_and_tokenizer, tmp_path):
    _, corpus, model = corpus_and_tokenizer
    big = tmp_path / "big.jsonl"
    with open(big, "w") as out:
        for _ in range(40):
            out.write(open(corpus).read())
    process = subprocess.Popen([sys.executable, os.path.join(TOOLS, "preprocess_data.py"), "--input", str(big),
                                "--output-prefix", str(tmp_path / "cut"), "--tokenizer-type", "SentencePieceTokenizer",
                                "--tokenizer-model", model, "--workers", "2"],
                               stderr=subprocess.PIPE, text=True)
    seen = ""
    while "processed" not in seen:  # wait until it is under way
        chunk = process.stderr.read(16)
        assert chunk, f"finished before it could be interrupted: {seen}"
        seen += chunk
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    assert process.returncode != 0
    assert not any(name.endswith((".bin", ".idx")) for name in os.listdir(tmp_path))


def test_huggingface_tokenizer_folder_round_trip(corpus_and_tokenizer, tmp_path):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    _, corpus, _ = corpus_and_tokenizer
    texts = read_documents(corpus)[:40]
    folder = tmp_path / "hf"
    folder.mkdir()
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tool("preprocess_data.py", "--input", small, "--output-prefix", tmp_path / "hf_out", "--tokenizer-type",
         "HuggingFaceTokenizer", "--tokenizer-model", folder, "--append-eod", "--workers", 2)
    loaded = load_tokenizer("HuggingFaceTokenizer", str(folder))
    assert loaded.eod == tokenizer.token_to_id("<|endoftext|>")
    dataset = IndexedDataset(str(tmp_path / "hf_out_text_document"))
    assert len(dataset) == len(texts)
    for index, text in enumerate(texts):
        assert dataset[index][-1] == loaded.eod and loaded.detokenize(dataset[index][:-1]) == text


@pytest.mark.parametrize("source,path", [("python-doc", "/usr/share/doc/python3.11/html"),
                                         ("gcide", "/usr/share/dictd/gcide.dict.dz")])
def test_debian_sources_when_installed(tmp_path, source, path):
    if not os.path.exists(path):
        pytest.skip(f"{source} is not installed here")
    out = tmp_path / f"{source}.jsonl"
    tool("make_corpus.py", "--sources", source, "--output", out, "--max-bytes", 300_000)
    documents = [json.loads(line) for line in open(out)]
    assert len(documents) > 3 and all(d["source"] == source and d["text"].strip() for d in documents)
    assert not any("<div" in d["text"] or "<span" in d["text"] for d in documents)  # text, not HTML


def test_missing_source_names_the_package_to_install(tmp_path):
    if os.path.exists("/usr/src") and any(name.startswith("linux-source-6.1") for name in os.listdir("/usr/src")):
        pytest.skip("linux-source-6.1 is installed here")
    result = tool("make_corpus.py", "--sources", "linux", "--output", tmp_path / "x.jsonl", check=False)
    assert result.returncode == 1 and "apt-get install linux-source-6.1" in result.stderr

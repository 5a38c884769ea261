"""Data tools: corpus from this machine, SentencePiece training, preprocess_data into Megatron's format."""

import gzip
import importlib.util
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from megatron_tst.data.tokenizers import Tokenizer, _SentencePiece, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
_spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(TOOLS, "preprocess_data.py"))
preprocess_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(preprocess_data)


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


def test_make_corpus_packages_source_mixes_packages(tmp_path):
    """The installed packages' sources (what a bare GPU box holds): a byte budget's prefix spans many
    packages, the same on every run; each document is the file's text."""
    import sysconfig

    out, again = tmp_path / "packages.jsonl", tmp_path / "again.jsonl"
    tool("make_corpus.py", "--sources", "packages", "--output", out, "--max-bytes", 1_000_000)
    tool("make_corpus.py", "--sources", "packages", "--output", again, "--max-bytes", 1_000_000)
    documents = [json.loads(line) for line in open(out)]
    assert open(out).read() == open(again).read()
    assert all(d["source"] == "packages" and d["id"].endswith(".py") for d in documents)
    assert len({d["id"].split("/")[0] for d in documents}) >= 5
    site = sysconfig.get_paths()["purelib"]
    first = documents[0]
    assert open(os.path.join(site, first["id"]), encoding="utf-8").read() == first["text"]


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


TRICKY_TEXTS = ["", " leading and  double  spaces ", "tabs\tand\nnewlines\n", "   ", "x ", " \u2581literal\u2581 marks",
                "\ufb01 ligature, \uff26ullwidth, caf\u00e9 vs cafe\u0301", "digits 1234567890", "emoji \U0001f600!"]


def test_sentencepiece_shortcut_equals_megatron_cores_tokenizer(corpus_and_tokenizer):
    _, corpus, model = corpus_and_tokenizer
    fast = load_tokenizer("SentencePieceTokenizer", model, threads=2)
    megatron = Tokenizer("SentencePieceTokenizer", model)  # megatron-core's build_tokenizer
    assert isinstance(fast, _SentencePiece)  # the shortcut is in use
    assert (fast.vocab_size, fast.eod) == (megatron.vocab_size, megatron.eod)
    texts = read_documents(corpus) + TRICKY_TEXTS  # every document of the corpus, not a prefix
    assert len(texts) > 64  # the 75 documents and the tricky texts: more than a 64-text batch
    assert fast.tokenize_batch(texts) == [megatron.tokenize(t) for t in texts]
    # the aliases as megatron-core's build_tokenizer (Megatron-LM's default) builds them: the same ids
    # (no BOS: only Megatron-LM's --legacy-tokenizer Llama2Tokenizer adds one), EOD and vocabulary
    for alias in ("GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        megatron = Tokenizer(alias, model)
        assert (megatron.vocab_size, megatron.eod) == (fast.vocab_size, fast.eod), alias
        assert [megatron.tokenize(t) for t in texts[-20:]] == fast.tokenize_batch(texts[-20:]), alias


def test_sentencepiece_shortcut_for_a_normalising_unigram_model(corpus_and_tokenizer, tmp_path):
    """SentencePiece's defaults (NFKC, extra whitespace removed, unigram): megatron-core's default
    wrapper still only calls encode_as_ids, so the shortcut holds for any model."""
    import sentencepiece

    _, corpus, _ = corpus_and_tokenizer
    texts = read_documents(corpus)[:60]
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_path / "nfkc"),
                                             vocab_size=400, model_type="unigram", minloglevel=2,
                                             max_sentence_length=1 << 20)
    model = str(tmp_path / "nfkc.model")
    fast, megatron = load_tokenizer("SentencePieceTokenizer", model, threads=2), Tokenizer("SentencePieceTokenizer", model)
    assert isinstance(fast, _SentencePiece)
    assert (fast.vocab_size, fast.eod) == (megatron.vocab_size, megatron.eod)
    texts = texts[:20] + TRICKY_TEXTS
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


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_leaves_nothing_that_looks_complete(corpus_and_tokenizer, tmp_path, signum):
    _, corpus, model = corpus_and_tokenizer
    big = tmp_path / "big.jsonl"
    with open(big, "w") as out:
        for _ in range(40):
            out.write(open(corpus).read())
    process = subprocess.Popen([sys.executable, os.path.join(TOOLS, "preprocess_data.py"), "--input", str(big),
                                "--output-prefix", str(tmp_path / "cut"), "--tokenizer-type", "SentencePieceTokenizer",
                                "--tokenizer-model", model, "--workers", "2", "--log-interval", "20"],
                               stderr=subprocess.PIPE, text=True)
    seen = ""
    while "processed" not in seen:  # wait until it is under way
        chunk = process.stderr.read(16)
        assert chunk, f"finished before it could be interrupted: {seen}"
        seen += chunk
    process.send_signal(signum)
    _, rest = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, seen + rest
    assert "interrupted: no output written" in rest and "Traceback" not in seen + rest
    assert not [name for name in os.listdir(tmp_path) if name.startswith("cut")]  # not even temporary files


@pytest.fixture(scope="module")
def hf_tokenizer(corpus_and_tokenizer):
    """A byte-level BPE tokenizer.json (with a tokenizer_config.json naming its EOS) trained on the corpus."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    folder, corpus, _ = corpus_and_tokenizer
    texts = read_documents(corpus)[:40]
    hf = folder / "hf"
    hf.mkdir()
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    small = folder / "small.jsonl"
    small.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return hf, small, texts, tokenizer.token_to_id("<|endoftext|>")


@pytest.mark.parametrize("form", ["folder", "tokenizer.json"])
def test_huggingface_tokenizer_round_trip(hf_tokenizer, tmp_path, form):
    """A folder goes through transformers as Megatron-LM does; a tokenizer.json needs only tokenizers."""
    hf, small, texts, eos = hf_tokenizer
    if form == "folder":
        pytest.importorskip("transformers")
    path = hf if form == "folder" else hf / "tokenizer.json"
    tool("preprocess_data.py", "--input", small, "--output-prefix", tmp_path / "hf_out", "--tokenizer-type",
         "HuggingFaceTokenizer", "--tokenizer-model", path, "--append-eod", "--workers", 2)
    loaded = load_tokenizer("HuggingFaceTokenizer", str(path))
    assert loaded.eod == eos and loaded.vocab_size == 700
    dataset = IndexedDataset(str(tmp_path / "hf_out_text_document"))
    assert len(dataset) == len(texts)
    for index, text in enumerate(texts):
        assert dataset[index][-1] == eos and loaded.detokenize(dataset[index][:-1]) == text


def test_huggingface_batches_equal_megatron_cores_tokenizer(hf_tokenizer):
    """The batched Rust path gives megatron-core's ids (its tokenize: pieces, then ids), and the
    tokenizer.json path gives the same as the folder."""
    pytest.importorskip("transformers")
    hf, _, texts, _ = hf_tokenizer
    megatron = Tokenizer("HuggingFaceTokenizer", str(hf))
    assert megatron._fast is not None  # the batched path is in use
    texts = texts[:20] + [t for t in TRICKY_TEXTS if t] + ["<|endoftext|> inside text"]
    expected = [megatron.tokenize(t) for t in texts]
    assert megatron.tokenize_batch(texts) == expected
    assert load_tokenizer("HuggingFaceTokenizer", str(hf / "tokenizer.json")).tokenize_batch(texts) == expected


@pytest.mark.parametrize("form,package", [("folder", "pip install transformers tokenizers"),
                                          ("tokenizer.json", "pip install tokenizers")])
def test_huggingface_without_its_package_names_what_to_install(hf_tokenizer, tmp_path, form, package):
    hf, small, _, _ = hf_tokenizer
    path = hf if form == "folder" else hf / "tokenizer.json"
    blocked = ("import runpy, sys; sys.modules['tokenizers'] = sys.modules['transformers'] = None; "
               f"sys.argv = ['preprocess_data.py'] + sys.argv[1:]; runpy.run_path({os.path.join(TOOLS, 'preprocess_data.py')!r}, "
               "run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", blocked, "--input", str(small), "--output-prefix",
                             str(tmp_path / "x"), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                             str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and package in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def run_in_process(capsys, *argv):
    """tools/preprocess_data.py's main() here (one worker): fast, for the checks and error paths."""
    code = preprocess_data.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_more_bad_lines_and_several_inputs_in_order(corpus_and_tokenizer, tmp_path, capsys):
    _, _, model = corpus_and_tokenizer
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(
        b'{"text": "first"}\n'
        b'\n'                                   # line 2: blank
        b'["a", "list"]\n'                      # line 3: not an object
        b'{"text": 7}\n'                        # line 4: not a string
        b'{"text": "lone \\ud800 surrogate"}\n'  # line 5: cannot be UTF-8
        b'{"text": "second", "other": 1}\n')
    with gzip.open(tmp_path / "in" / "b.jsonl.gz", "wb") as handle:
        handle.write(b'{"text": "third"}\n{"text": "fourth"}')  # no final newline
    common = ["--input", tmp_path / "in" / "*.jsonl*", "--output-prefix", tmp_path / "out",
              "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model, "--append-eod"]
    code, err = run_in_process(capsys, *common)
    assert code == 0, err
    for reason in ("1 blank line", "1 not a JSON object", "1 key 'text' is not a string", "1 invalid Unicode escape"):
        assert reason in err
    assert "a.jsonl:5 (invalid Unicode escape)" in err and "4 documents" in err
    tokenizer = load_tokenizer("SentencePieceTokenizer", model)
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    assert [tokenizer.detokenize(dataset[i][:-1]) for i in range(len(dataset))] == ["first", "second", "third", "fourth"]

    code, err = run_in_process(capsys, *common)
    assert code == 1 and "already exists; pass --overwrite" in err
    code, err = run_in_process(capsys, *common, "--overwrite")
    assert code == 0 and "4 documents" in err

    multi = tmp_path / "multi.jsonl"  # several keys: a line is used only when every key is
    multi.write_text('{"text": "body one", "title": "one"}\n{"text": "body two"}\n{"text": "body 3", "title": "3"}\n')
    code, err = run_in_process(capsys, "--input", multi, "--output-prefix", tmp_path / "m", "--json-keys", "text",
                               "title", "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model)
    assert code == 0 and "1 missing key 'title'" in err and "multi.jsonl:2" in err
    for key, expected in (("text", ["body one", "body 3"]), ("title", ["one", "3"])):
        dataset = IndexedDataset(str(tmp_path / f"m_{key}_document"))
        assert [tokenizer.detokenize(dataset[i]) for i in range(len(dataset))] == expected


def test_bad_setups_fail_with_one_line_naming_the_fix(corpus_and_tokenizer, tmp_path, capsys):
    _, corpus, model = corpus_and_tokenizer
    common = ["--output-prefix", tmp_path / "out", "--tokenizer-type", "SentencePieceTokenizer"]
    (tmp_path / "folder").mkdir()
    packed = gzip.compress("".join(json.dumps({"text": str(i * i)}) + "\n" for i in range(5000)).encode())
    (tmp_path / "broken.jsonl.gz").write_bytes(packed[: len(packed) // 2])  # cut short
    cases = [
        (["--input", tmp_path / "nothing*.jsonl", "--tokenizer-model", model], "matches no file"),
        (["--input", tmp_path / "folder", "--tokenizer-model", model], "is a folder; give its files"),
        (["--input", corpus, "--tokenizer-model", tmp_path / "missing.model"], "train one with tools/train_tokenizer.py"),
        (["--input", corpus, "--tokenizer-model", corpus], "is not a SentencePiece model"),
        (["--input", corpus, "--tokenizer-model", model, "--split-sentences"], "--split-sentences is not supported"),
        (["--input", corpus, "--tokenizer-model", model, "--workers", 0], "--workers must be >= 1"),
        (["--input", tmp_path / "broken.jsonl.gz", "--tokenizer-model", model], "damaged or truncated .gz"),
    ]
    for argv, message in cases:
        code, err = run_in_process(capsys, *common, *argv)
        assert code == 1 and message in err, (argv, err)
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not [name for name in os.listdir(tmp_path) if name.startswith("out")]


def test_append_eod_needs_an_eod_token(corpus_and_tokenizer, tmp_path, capsys):
    import sentencepiece

    _, corpus, _ = corpus_and_tokenizer
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(read_documents(corpus)[:30]), eos_id=-1,
                                             model_prefix=str(tmp_path / "noeos"), vocab_size=300, minloglevel=2,
                                             max_sentence_length=1 << 20)
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": t}) + "\n" for t in read_documents(corpus)[:5]))
    argv = ["--input", small, "--output-prefix", tmp_path / "out", "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", tmp_path / "noeos.model"]
    code, err = run_in_process(capsys, *argv, "--append-eod")
    assert code == 1 and "has no end-of-document token" in err and "drop --append-eod" in err
    code, err = run_in_process(capsys, *argv)  # without EOD it is fine
    assert code == 0, err


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
    result = tool("make_corpus.py", "--sources", "linux", "--linux-tarball", tmp_path / "linux-source-6.1.tar.xz",
                  "--output", tmp_path / "x.jsonl", check=False)
    assert result.returncode == 1 and "apt-get install linux-source-6.1" in result.stderr
    assert not os.path.exists(tmp_path / "x.jsonl")


def test_linux_source_is_read_from_the_tarball(tmp_path):
    """Kernel sources come straight out of the (streamed, never extracted) tarball: .c/.h/.rst/.txt
    files that are UTF-8, in archive order, up to --max-bytes."""
    import io
    import tarfile

    tarball = tmp_path / "linux-source-6.1.tar.xz"
    files = {"linux/kernel/a.c": b"int main(void) { return 0; }\n", "linux/kernel/b.o": b"\x7fELF\x00\x01",
             "linux/include/c.h": b"#define X 1\n", "linux/bad.c": b"caf\xe9\n",
             "linux/Documentation/d.rst": b"Title\n=====\n" * 50}
    with tarfile.open(tarball, "w:xz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    out = tmp_path / "linux.jsonl"
    result = tool("make_corpus.py", "--sources", "linux", "--linux-tarball", tarball, "--output", out)
    documents = [json.loads(line) for line in open(out)]
    assert [d["id"] for d in documents] == ["linux/kernel/a.c", "linux/include/c.h", "linux/Documentation/d.rst"]
    assert documents[0] == {"text": files["linux/kernel/a.c"].decode(), "source": "linux", "id": "linux/kernel/a.c"}
    assert "linux" in result.stdout and "3 documents" in result.stdout
    tool("make_corpus.py", "--sources", "linux", "--linux-tarball", tarball, "--output", out, "--overwrite",
         "--max-bytes", 20)
    assert len(open(out).readlines()) == 1  # the budget stops it after the first file


def test_train_tokenizer_unigram_is_lossless_too(corpus_and_tokenizer, tmp_path):
    _, corpus, _ = corpus_and_tokenizer
    result = tool("train_tokenizer.py", "--input", corpus, "--output-prefix", tmp_path / "uni", "--vocab-size", 600,
                  "--model-type", "unigram", "--max-bytes", 400_000)
    assert "600 pieces, unigram" in result.stdout and os.path.exists(tmp_path / "uni.vocab")
    tokenizer = load_tokenizer("SentencePieceTokenizer", str(tmp_path / "uni.model"))
    for text in read_documents(corpus)[:10] + [t for t in TRICKY_TEXTS if "\u2581" not in t]:  # U+2581 means space
        assert tokenizer.detokenize(tokenizer.tokenize(text)) == text
    again = tool("train_tokenizer.py", "--input", corpus, "--output-prefix", tmp_path / "uni", check=False)
    assert again.returncode == 1 and "already exists; pass --overwrite" in again.stderr

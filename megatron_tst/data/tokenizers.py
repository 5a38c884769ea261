"""Tokenizers as Megatron-LM's tools build them, for preprocessing and for training.

Megatron-LM core_v0.16.1's ``tools/preprocess_data.py`` builds its tokenizer with megatron-core's
``build_tokenizer`` and default flags; so do we, so the ids, EOD and vocabulary size (hence the .bin
dtype) are the same. Two shortcuts give the same ids faster and without importing megatron-core
(seconds per process):

- SentencePiece: with default flags (not legacy, ``ignore_extra_whitespaces``) megatron-core's
  wrapper is exactly SentencePiece's ``encode_as_ids``, EOD its ``eos_id()`` and the vocabulary size
  its piece count, for every model; we call SentencePiece directly, batched and threaded.
- HuggingFace fast tokenizers: megatron-core tokenizes text to pieces and maps them to ids; we ask
  the same Rust tokenizer for the ids of a whole batch.

``tests/test_tools.py`` checks both against megatron-core's own tokenizers.

``GPT2BPETokenizer`` (--vocab-file, --merge-file) is Megatron-LM's own, as its training builds it
(core_v0.16.1's ``megatron/training/tokenizer``: GPT-2's byte-level BPE over the two files, vocabulary
size the vocab.json's entries, EOD ``<|endoftext|>``); we run the same BPE in the ``tokenizers``
package, offline (megatron-core's ``build_tokenizer`` would fetch GPT-2's config from the model hub).

``NullTokenizer`` (--vocab-size N) is megatron-core's, Megatron-LM's convention: text of space-separated
ids, vocabulary N+1, EOD N.

``TikTokenizer`` (--tokenizer-model a tiktoken vocabulary .json, --tiktoken-pattern v1|v2,
--tiktoken-num-special-tokens, --tokenizer-special-tokens, --vocab-size) is megatron-core's, as Megatron-LM's
``pretrain_gpt.py`` and ``preprocess_data.py`` build it: the special tokens take ids 0..n-1 (EOD ``</s>``) and
may appear in text, the ranks follow; it needs the ``tiktoken`` package.

``HuggingFaceTokenizer`` takes a folder (loaded with transformers' ``AutoTokenizer``, as Megatron-LM
does) or a ``tokenizer.json`` file (loaded with the ``tokenizers`` package alone; its EOD is the
``eos_token`` of a ``tokenizer_config.json`` beside it, else a usual end-of-text token).
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from types import SimpleNamespace

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer", "NullTokenizer", "TikTokenizer")
# the rest of Megatron-LM's --tokenizer-type choices, and why this GPT pretraining refuses them
REFUSED_TYPES = {
    "BertWordPieceLowerCase": "a BERT WordPiece tokenizer (Megatron-LM's BERT/T5 models), not a GPT one",
    "BertWordPieceCase": "a BERT WordPiece tokenizer (Megatron-LM's BERT/T5 models), not a GPT one",
    "MultimodalTokenizer": "a multimodal (image + text) tokenizer; this trainer pretrains text-only GPT models",
    "NullMultimodalTokenizer": "a multimodal (image + text) tokenizer; this trainer pretrains text-only GPT models",
    "SFTTokenizer": "a chat fine-tuning tokenizer; this trainer pretrains on plain documents",
}
TIKTOKEN_PATTERNS = ("v1", "v2")
# megatron-core's build_tokenizer treats these exactly as SentencePieceTokenizer
SENTENCEPIECE_ALIASES = ("GPTSentencePieceTokenizer", "Llama2Tokenizer")
# the types --vocab-size sizes (Megatron-LM's; for NullTokenizer it is the ids before the EOD)
VOCAB_SIZE_TYPES = ("NullTokenizer", "TikTokenizer")
# EOD candidates for a bare tokenizer.json without a tokenizer_config.json, in order
END_OF_TEXT_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")


class _SentencePiece:
    """megatron-core's default SentencePiece wrapper, calling SentencePiece directly."""

    def __init__(self, model: str, threads: int = 1):
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model)
        except (RuntimeError, OSError) as error:
            raise ValueError(f"{model} is not a SentencePiece model ({str(error).splitlines()[0]}); "
                             "give the .model file tools/train_tokenizer.py wrote") from None
        self.threads = threads
        self.vocab_size = self._sp.get_piece_size()
        eos = self._sp.eos_id()
        self.eod = eos if eos >= 0 else None

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode_as_ids(text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=self.threads)

    def detokenize(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


_PlainSentencePiece = _SentencePiece  # earlier name


class _RustBacked:
    """Encoding through a ``tokenizers.Tokenizer`` held as ``self._tokenizer``, special tokens never added."""

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=False)]


class _TokenizerJson(_RustBacked):
    """A bare ``tokenizer.json`` through the ``tokenizers`` package (no transformers needed)."""

    def __init__(self, path: str, threads: int = 1):
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError:
            raise ValueError("HuggingFaceTokenizer with a tokenizer.json needs the tokenizers package: "
                             "pip install tokenizers") from None
        try:
            self._tokenizer = RustTokenizer.from_file(path)
        except Exception as error:  # the Rust side raises its own exception type
            raise ValueError(f"{path} is not a HuggingFace tokenizer.json ({str(error).splitlines()[0]})") from None
        self.threads = threads
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        eos = self._eos_token(path)
        self.eod = self._tokenizer.token_to_id(eos) if eos else None

    def _eos_token(self, path: str) -> str | None:
        config = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
        if os.path.exists(config):
            with open(config, encoding="utf-8") as handle:
                eos = json.load(handle).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if eos and self._tokenizer.token_to_id(eos) is not None:
                return eos
        for token in END_OF_TEXT_TOKENS:
            if self._tokenizer.token_to_id(token) is not None:
                return token
        return None

    def detokenize(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


class _GPT2BPE(_RustBacked):
    """Megatron-LM's GPT2BPETokenizer (GPT-2's byte-level BPE, no special tokens in text) in ``tokenizers``."""

    def __init__(self, vocab_file: str, merge_file: str, threads: int = 1):
        try:
            from tokenizers import Tokenizer as RustTokenizer, decoders, pre_tokenizers
            from tokenizers.models import BPE
        except ImportError:
            raise ValueError("GPT2BPETokenizer needs the tokenizers package: pip install tokenizers") from None
        try:
            with open(vocab_file, encoding="utf-8") as handle:
                encoder = json.load(handle)
            self._tokenizer = RustTokenizer(BPE.from_file(vocab_file, merge_file))
        except Exception as error:  # json's or the Rust side's own exception types
            raise ValueError(f"--vocab-file {vocab_file} / --merge-file {merge_file} are not a GPT-2 BPE pair "
                             f"({str(error).splitlines()[0]})") from None
        if "<|endoftext|>" not in encoder:
            raise ValueError(f"--vocab-file {vocab_file} has no <|endoftext|> token (GPT2BPETokenizer's EOD)")
        self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex split
        self._tokenizer.decoder = decoders.ByteLevel()
        self.threads = threads
        self.vocab_size = len(encoder)
        self.eod = encoder["<|endoftext|>"]

    def detokenize(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


class _Null:
    """megatron-core's NullTokenizer (as Megatron-LM's _NullTokenizer): vocabulary N+1, EOD N."""

    def __init__(self, vocab_size: int):
        import megatron_tst  # noqa: F401  (CPU platform layer before megatron.core)
        from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

        self._tokenizer = NullTokenizer(vocab_size)
        self.vocab_size, self.eod = self._tokenizer.vocab_size, self._tokenizer.eod

    def tokenize(self, text: str) -> list[int]:
        try:
            ids = self._tokenizer.text_to_ids(text)
        except ValueError:
            raise ValueError(f"NullTokenizer reads ids separated by single spaces, not {text[:40]!r}") from None
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"NullTokenizer with --vocab-size {self.eod} reads ids 0..{self.eod}, not "
                             f"{max(ids) if max(ids) >= self.vocab_size else min(ids)}")
        return ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenize(text) for text in texts]

    def detokenize(self, ids) -> str:
        return self._tokenizer.ids_to_text([int(i) for i in ids])


class Tokenizer:
    """vocab_size, eod, tokenize, tokenize_batch, detokenize over megatron-core's tokenizer."""

    def __init__(self, tokenizer_type: str, tokenizer_model: str | None, vocab_size: int | None = None, **flags):
        if tokenizer_type == "HuggingFaceTokenizer":
            try:
                import tokenizers  # noqa: F401
                import transformers  # noqa: F401
            except ImportError:
                raise ValueError("HuggingFaceTokenizer with a folder loads it with transformers, as Megatron-LM "
                                 "does: pip install transformers tokenizers (a tokenizer.json file needs only "
                                 "tokenizers)") from None
        import megatron_tst  # noqa: F401  (CPU platform layer before megatron.core)

        with warnings.catch_warnings():  # megatron-core warns on import about Transformer Engine and Apex
            warnings.simplefilter("ignore")
            from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer

            args = SimpleNamespace(  # Megatron-LM's defaults for the tokenizer flags
                tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model, vocab_size=vocab_size,
                tokenizer_metadata=None, tokenizer_special_tokens=None, tokenizer_sentencepiece_legacy=False,
                vocab_file=None, merge_file=None, tokenizer_hf_use_fast=False, trust_remote_code=False,
                tokenizer_hf_include_special_tokens=False, tiktoken_pattern=None, tiktoken_num_special_tokens=1000,
            )
            vars(args).update(flags)
            try:
                self._tokenizer = build_tokenizer(args)
            except AssertionError as error:  # megatron-core checks its settings with asserts
                raise ValueError(f"{tokenizer_type} {tokenizer_model}: megatron-core refuses these settings "
                                 f"({' '.join(str(error).split()) or 'an assertion failed'})") from None
        self.vocab_size = self._tokenizer.vocab_size
        self.eod = self._tokenizer.eod
        self._fast = None
        if tokenizer_type == "HuggingFaceTokenizer":
            hf = self._tokenizer._tokenizer.tokenizer  # the transformers tokenizer megatron-core wraps
            backend = getattr(hf, "backend_tokenizer", None) if getattr(hf, "is_fast", False) else None
            if backend is not None and not getattr(hf, "split_special_tokens", False):
                self._fast = backend

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer.tokenize(text))

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        if self._fast is not None:  # megatron-core's tokenize (pieces, then ids), for a whole batch
            return [encoding.ids for encoding in self._fast.encode_batch(texts, add_special_tokens=False)]
        return [self.tokenize(text) for text in texts]

    def detokenize(self, ids) -> str:
        return self._tokenizer.detokenize([int(i) for i in ids])


def load_tokenizer(tokenizer_type: str, tokenizer_model: str | None, vocab_size: int | None = None,
                   threads: int = 1, vocab_file: str | None = None, merge_file: str | None = None,
                   tiktoken_pattern: str | None = None, tiktoken_num_special_tokens: int | None = None,
                   special_tokens: list | None = None):
    """The tokenizer Megatron-LM's tools would build; ``threads`` for batched SentencePiece."""
    if tokenizer_type in SENTENCEPIECE_ALIASES:
        tokenizer_type = "SentencePieceTokenizer"
    if tokenizer_type in REFUSED_TYPES:
        raise ValueError(f"--tokenizer-type {tokenizer_type} is not supported: {REFUSED_TYPES[tokenizer_type]}")
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not one of "
                         f"{', '.join(TOKENIZER_TYPES + SENTENCEPIECE_ALIASES)}")
    if (vocab_file or merge_file) and tokenizer_type != "GPT2BPETokenizer":
        raise ValueError("--vocab-file/--merge-file go with --tokenizer-type GPT2BPETokenizer; give it, or drop them")
    if tokenizer_type == "GPT2BPETokenizer":
        for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not path:
                raise ValueError(f"GPT2BPETokenizer needs {flag} (GPT-2's vocab.json and merges.txt)")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{flag} {path} not found")
        return _GPT2BPE(vocab_file, merge_file, threads)
    if tokenizer_type == "NullTokenizer":
        if not vocab_size:
            raise ValueError("NullTokenizer needs --vocab-size N (ids 0..N-1, its EOD N, as Megatron-LM)")
        return _Null(vocab_size)
    if not tokenizer_model:
        raise ValueError(f"{tokenizer_type} needs --tokenizer-model")
    if not os.path.exists(tokenizer_model):
        hint = ("train one with tools/train_tokenizer.py or give the path of yours"
                if tokenizer_type == "SentencePieceTokenizer" else
                "give a local folder with tokenizer files, or a tokenizer.json file")
        raise FileNotFoundError(f"tokenizer {tokenizer_model} not found; {hint}")
    if tokenizer_type == "SentencePieceTokenizer":
        if os.path.isdir(tokenizer_model):
            raise ValueError(f"SentencePieceTokenizer needs the .model file, and {tokenizer_model} is a folder")
        return _SentencePiece(tokenizer_model, threads)
    if tokenizer_type == "TikTokenizer":
        return _tiktoken(tokenizer_model, vocab_size, tiktoken_pattern, tiktoken_num_special_tokens, special_tokens)
    if tokenizer_type == "HuggingFaceTokenizer" and os.path.isfile(tokenizer_model):
        if not tokenizer_model.endswith(".json"):
            raise ValueError(f"HuggingFaceTokenizer takes a folder or a tokenizer.json file, not {tokenizer_model} "
                             "(for a SentencePiece .model use --tokenizer-type SentencePieceTokenizer)")
        return _TokenizerJson(tokenizer_model, threads)
    return Tokenizer(tokenizer_type, tokenizer_model, vocab_size)


def _tiktoken(path: str, vocab_size: int | None, pattern: str | None, num_special: int | None,
              special_tokens: list | None) -> Tokenizer:
    """megatron-core's TikTokenizer, its settings checked first so that a mistake reads as one line."""
    if importlib.util.find_spec("tiktoken") is None:
        raise ValueError("TikTokenizer needs the tiktoken package: pip install tiktoken")
    if pattern not in TIKTOKEN_PATTERNS:
        raise ValueError(f"TikTokenizer needs --tiktoken-pattern v1 or v2 (as Megatron-LM), not {pattern}")
    num_special = 1000 if num_special is None else num_special  # Megatron-LM's defaults
    vocab_size = vocab_size or 2 ** 17
    try:
        with open(path, encoding="utf-8") as handle:
            ranks = len(json.load(handle))
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"{path} is not a tiktoken vocabulary .json ({str(error).splitlines()[0]})") from None
    if vocab_size - num_special > ranks:
        raise ValueError(f"TikTokenizer: --vocab-size {vocab_size} minus {num_special} special tokens needs "
                         f"{vocab_size - num_special} ranks but {path} has {ranks}; give --vocab-size "
                         f"{ranks + num_special} (or fewer) or --tiktoken-num-special-tokens")
    return Tokenizer("TikTokenizer", path, vocab_size, tiktoken_pattern=pattern,
                     tiktoken_num_special_tokens=num_special, tokenizer_special_tokens=special_tokens or None)

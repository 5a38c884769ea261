"""Tokenizers: megatron-core's own (``megatron.core.tokenizers``), as Megatron-LM's tools build them.

Megatron-LM core_v0.16.1's ``tools/preprocess_data.py`` builds its tokenizer with megatron-core's
``build_tokenizer`` and default flags; so do we, so the ids (and EOD, vocabulary size, hence the
.bin dtype) are the same. One shortcut: for a SentencePiece model that keeps whitespace (as
tools/train_tokenizer.py writes them), megatron-core's default wrapper is exactly SentencePiece's
``encode`` with EOD = ``</s>`` and the piece count as vocabulary size; there we use SentencePiece
directly (batched, threaded, and without importing megatron-core, which costs seconds per process).
``tests/test_tools.py`` checks the shortcut against megatron-core's tokenizer.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer")


class _PlainSentencePiece:
    """megatron-core's non-legacy SentencePiece wrapper for whitespace-preserving models."""

    def __init__(self, processor, threads: int):
        self._sp, self.threads = processor, threads
        self.vocab_size = processor.get_piece_size()
        self.eod = processor.eos_id()

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode_as_ids(text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=self.threads)

    def detokenize(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


class Tokenizer:
    """vocab_size, eod, tokenize, tokenize_batch, detokenize over a megatron-core tokenizer."""

    def __init__(self, tokenizer_type: str, tokenizer_model: str | None, vocab_size: int | None = None):
        if tokenizer_type == "HuggingFaceTokenizer":
            try:
                import transformers  # noqa: F401
            except ImportError:
                raise ValueError("HuggingFaceTokenizer needs transformers: pip install -e '.[hf]'") from None
        import megatron_tst  # noqa: F401  (CPU platform layer before megatron.core)
        from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer

        args = SimpleNamespace(  # Megatron-LM's defaults for the tokenizer flags
            tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model, vocab_size=vocab_size,
            tokenizer_metadata=None, tokenizer_special_tokens=None, tokenizer_sentencepiece_legacy=False,
            vocab_file=None, merge_file=None, tokenizer_hf_use_fast=False, trust_remote_code=False,
            tokenizer_hf_include_special_tokens=False, tiktoken_pattern=None, tiktoken_num_special_tokens=1000,
        )
        self._tokenizer = build_tokenizer(args)
        self.vocab_size = self._tokenizer.vocab_size
        self.eod = self._tokenizer.eod

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer.tokenize(text))

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenize(text) for text in texts]

    def detokenize(self, ids) -> str:
        return self._tokenizer.detokenize([int(i) for i in ids])


def load_tokenizer(tokenizer_type: str, tokenizer_model: str | None, vocab_size: int | None = None,
                   threads: int = 1):
    """The tokenizer Megatron-LM's tools would build; ``threads`` for batched SentencePiece."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not one of {', '.join(TOKENIZER_TYPES)}")
    if tokenizer_type != "NullTokenizer":
        if not tokenizer_model:
            raise ValueError(f"{tokenizer_type} needs --tokenizer-model")
        if not os.path.exists(tokenizer_model):
            raise FileNotFoundError(f"tokenizer {tokenizer_model} not found; train one with "
                                    "tools/train_tokenizer.py or give the path of yours")
    if tokenizer_type == "SentencePieceTokenizer":
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
        # megatron-core rewrites text for models that collapse repeated spaces; not the plain case
        if processor.encode_as_pieces("x  y") != processor.encode_as_pieces("x y"):
            return _PlainSentencePiece(processor, threads)
    return Tokenizer(tokenizer_type, tokenizer_model, vocab_size)

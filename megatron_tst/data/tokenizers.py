"""Tokenizers: megatron-core's own (``megatron.core.tokenizers``), as Megatron-LM's tools build them.

Megatron-LM core_v0.16.1's ``tools/preprocess_data.py`` builds its tokenizer with megatron-core's
``build_tokenizer`` and default flags; so do we, so the ids (and EOD, vocabulary size, hence the
.bin dtype) are the same. ``tokenize_batch`` adds one thing: where megatron-core's SentencePiece
wrapper is a plain ``encode`` of the text (non-legacy, whitespace-preserving models, as
tools/train_tokenizer.py writes), a batch goes to SentencePiece in one call; otherwise texts go one
by one through megatron-core's ``tokenize``.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer")


class Tokenizer:
    """vocab_size, eod, tokenize, tokenize_batch, detokenize over a megatron-core tokenizer."""

    def __init__(self, tokenizer_type: str, tokenizer_model: str | None, vocab_size: int | None = None):
        if tokenizer_type not in TOKENIZER_TYPES:
            raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not one of {', '.join(TOKENIZER_TYPES)}")
        if tokenizer_type != "NullTokenizer":
            if not tokenizer_model:
                raise ValueError(f"{tokenizer_type} needs --tokenizer-model")
            if not os.path.exists(tokenizer_model):
                raise FileNotFoundError(f"tokenizer {tokenizer_model} not found; train one with "
                                        "tools/train_tokenizer.py or give the path of yours")
        if tokenizer_type == "HuggingFaceTokenizer":
            try:
                import transformers  # noqa: F401
            except ImportError:
                raise ValueError("HuggingFaceTokenizer needs transformers: pip install -e '.[hf]'") from None
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
        library = getattr(self._tokenizer, "_tokenizer", None)
        plain = (tokenizer_type == "SentencePieceTokenizer" and library is not None
                 and not library.legacy and not library.removed_extra_spaces)
        self._sentencepiece = library.tokenizer if plain else None

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer.tokenize(text))

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        if self._sentencepiece is not None:
            return self._sentencepiece.encode(texts)
        return [self.tokenize(text) for text in texts]

    def detokenize(self, ids) -> str:
        return self._tokenizer.detokenize([int(i) for i in ids])


def load_tokenizer(tokenizer_type: str, tokenizer_model: str | None, vocab_size: int | None = None) -> Tokenizer:
    return Tokenizer(tokenizer_type, tokenizer_model, vocab_size)

"""Tokenizer files that ``transformers.AutoTokenizer`` loads, from the tokenizer a run trained with.

- A SentencePiece ``.model`` becomes a ``tokenizers`` tokenizer built from the model's own pieces,
  scores and normaliser settings (dummy prefix, whitespace handling, byte fallback), so its ids are
  SentencePiece's ``encode_as_ids`` (what Megatron's SentencePieceTokenizer gives, no BOS added).
  The .model is parsed with a few lines of protobuf wire decoding: the ``protobuf`` package that
  transformers' own converter needs is not a dependency here.
- GPT2BPETokenizer's vocab.json and merges.txt: the byte-level BPE training ran (``data.tokenizers``)
  wrapped as transformers' GPT2TokenizerFast (``<|endoftext|>`` its bos/eos/unk, no prefix space, no
  BOS added: Megatron-LM's ids).
- A HuggingFace folder is loaded with AutoTokenizer and saved again; a bare ``tokenizer.json`` is
  wrapped as a fast tokenizer with its end-of-text token as eos.
"""

from __future__ import annotations

import os

UNIGRAM, BPE_MODEL = 1, 2
_PIECE_TYPES = {1: "normal", 2: "unknown", 3: "control", 4: "user_defined", 5: "unused", 6: "byte"}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _fields(data: bytes):
    """(field number, wire type, value) of a protobuf message; value is int or bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def read_sentencepiece_model(path: str) -> dict:
    """Pieces (piece, score, type), model type and normaliser flags of a SentencePiece ModelProto."""
    import struct

    with open(path, "rb") as handle:
        data = handle.read()
    spec = dict(pieces=[], model_type=UNIGRAM, byte_fallback=False, unk_piece="<unk>", unk_id=0,
                add_dummy_prefix=True, remove_extra_whitespaces=True, precompiled_charsmap=b"")
    for number, _, value in _fields(data):
        if number == 1:  # SentencePiece {piece=1, score=2, type=3}
            piece, score, kind = "", 0.0, 1
            for sub, _, sub_value in _fields(value):
                if sub == 1:
                    piece = sub_value.decode("utf-8")
                elif sub == 2:
                    score = struct.unpack("<f", sub_value)[0]
                elif sub == 3:
                    kind = sub_value
            spec["pieces"].append((piece, score, _PIECE_TYPES.get(kind, "normal")))
        elif number == 2:  # TrainerSpec
            for sub, _, sub_value in _fields(value):
                if sub == 3:
                    spec["model_type"] = sub_value
                elif sub == 35:
                    spec["byte_fallback"] = bool(sub_value)
                elif sub == 40:
                    spec["unk_id"] = sub_value
                elif sub == 45:
                    spec["unk_piece"] = sub_value.decode("utf-8")
        elif number == 3:  # NormalizerSpec
            for sub, _, sub_value in _fields(value):
                if sub == 2:
                    spec["precompiled_charsmap"] = sub_value
                elif sub == 3:
                    spec["add_dummy_prefix"] = bool(sub_value)
                elif sub == 4:
                    spec["remove_extra_whitespaces"] = bool(sub_value)
    if not spec["pieces"]:
        raise ValueError(f"{path} is not a SentencePiece model (no pieces)")
    return spec


def sentencepiece_to_tokenizers(path: str):
    """A ``tokenizers.Tokenizer`` giving SentencePiece's ids for ``path``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE, Unigram
    from transformers.tokenization_utils_base import generate_merges

    spec = read_sentencepiece_model(path)
    pieces = spec["pieces"]
    if spec["model_type"] == BPE_MODEL:
        vocab = {piece: index for index, (piece, _, _) in enumerate(pieces)}
        # SentencePiece BPE merges in score order; control/byte pieces never take part in merges
        mergeable = {piece: score for piece, score, kind in pieces if kind in ("normal", "user_defined")}
        merges = generate_merges(vocab, mergeable)
        model = BPE(vocab, merges, unk_token=spec["unk_piece"], fuse_unk=True, byte_fallback=spec["byte_fallback"])
    elif spec["model_type"] == UNIGRAM:
        # SentencePiece never matches control/unused pieces in text; tokenizers' Unigram would, so
        # they get a score below any segmentation of the same characters
        floor = min(score for _, score, kind in pieces if kind == "normal") - 10
        scores = [(piece, score if kind not in ("control", "unused") else floor * (len(piece) + 1) - 1000)
                  for piece, score, kind in pieces]
        model = Unigram(scores, unk_id=spec["unk_id"], byte_fallback=spec["byte_fallback"])
    else:
        raise ValueError(f"{path}: SentencePiece model type {spec['model_type']} (word/char) is not supported; "
                         "use a BPE or unigram model")
    tokenizer = Tokenizer(model)
    steps = []
    if spec["precompiled_charsmap"]:
        steps.append(normalizers.Precompiled(spec["precompiled_charsmap"]))
    if spec["remove_extra_whitespaces"]:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec["add_dummy_prefix"]:
        steps.append(normalizers.Prepend(" "))
    steps.append(normalizers.Replace(" ", "\u2581"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decode_steps = [decoders.Replace("\u2581", " ")]
    if spec["byte_fallback"]:
        decode_steps.append(decoders.ByteFallback())
    decode_steps.append(decoders.Fuse())
    if spec["add_dummy_prefix"]:
        decode_steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decode_steps)
    # control pieces (<s>, </s>) are special tokens, never produced from text, as in SentencePiece
    tokenizer.add_special_tokens([AddedToken(piece, normalized=False, special=True)
                                  for piece, _, kind in pieces if kind == "control"])
    return tokenizer, pieces


def save_tokenizer(tokenizer_type: str, tokenizer_model: str | None, output: str, vocab_size: int,
                   vocab_file: str | None = None, merge_file: str | None = None) -> dict:
    """Write AutoTokenizer-loadable files into ``output``; returns {"bos_token_id", "eos_token_id"}.

    Raises ValueError/FileNotFoundError with a one-line message on a missing or unusable tokenizer.
    """
    from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast

    from megatron_tst.data.tokenizers import SENTENCEPIECE_ALIASES, load_tokenizer

    if tokenizer_type in SENTENCEPIECE_ALIASES:
        tokenizer_type = "SentencePieceTokenizer"
    # what training used: its eod is the eos
    ours = load_tokenizer(tokenizer_type, tokenizer_model, vocab_file=vocab_file, merge_file=merge_file)
    if tokenizer_type == "GPT2BPETokenizer":
        tokenizer = GPT2TokenizerFast(tokenizer_object=ours._tokenizer, add_prefix_space=False,
                                      clean_up_tokenization_spaces=False)
        tokenizer_model = vocab_file  # named in the size check below
    elif tokenizer_type == "SentencePieceTokenizer":
        backend, pieces = sentencepiece_to_tokenizers(tokenizer_model)
        by_id = {index: piece for index, (piece, _, _) in enumerate(pieces)}
        kinds = {kind: piece for piece, _, kind in reversed(pieces)}
        bos = next((i for i, (p, _, k) in enumerate(pieces) if k == "control" and p in ("<s>", "<bos>")), None)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, eos_token=by_id.get(ours.eod) if ours.eod is not None else None,
            bos_token=by_id.get(bos) if bos is not None else None, unk_token=kinds.get("unknown"),
            clean_up_tokenization_spaces=False, split_special_tokens=True)  # "<s>" in text is text, as in SentencePiece
        tokenizer.add_bos_token = False  # Megatron trained on documents without BOS
    elif os.path.isfile(tokenizer_model):  # a bare tokenizer.json
        eos = ours._tokenizer.id_to_token(ours.eod) if ours.eod is not None else None
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=tokenizer_model, eos_token=eos,
                                            clean_up_tokenization_spaces=False)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_model)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer {tokenizer_model} has {len(tokenizer)} tokens but the model only "
                         f"{vocab_size}; pass the tokenizer the run trained with (--tokenizer-model)")
    tokenizer.save_pretrained(output)
    eos_id = ours.eod if ours.eod is not None else tokenizer.eos_token_id
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos_id}

"""Tokenizers for preprocessing, selected with Megatron-LM's `--tokenizer-type` names.

Every tokenizer here exposes the same small surface the preprocessor needs:
`vocab_size`, `eod` (appended by `--append-eod`), `bos` (None if absent) and
`encode_batch(texts) -> list[list[int]]`. Batch encoding matters: `tokenizers` encodes a batch
in Rust in one call, which is where most of the preprocessing speed comes from.

No special tokens are added while encoding (no BOS from a post-processor): the window packer
adds the anchor itself, per the chosen attention variant.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

from megatron_anchor.data.indexed import DatasetError

TOKENIZER_TYPES = (
    "HuggingFaceTokenizer",
    "SentencePieceTokenizer",
    "GPT2BPETokenizer",
    "NullTokenizer",
    "ByteTokenizer",
)

# Names under which tokenizer files spell their end-of-document / begin-of-sequence tokens.
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>")
BOS_CANDIDATES = ("<|bos|>", "<|begin_of_text|>", "<s>", "<bos>", "<|im_start|>")


@dataclass
class TokenizerConfig:
    """Which tokenizer to build (Megatron-LM's `--tokenizer-type` and its file flags)."""

    tokenizer_type: str
    tokenizer_model: Optional[str] = None  # HF: tokenizer.json or its directory; SP: .model
    vocab_file: Optional[str] = None  # GPT2BPETokenizer: vocab.json
    merge_file: Optional[str] = None  # GPT2BPETokenizer: merges.txt
    vocab_size: Optional[int] = None  # NullTokenizer: number of ids (EOD is the extra id)
    eod_token: Optional[str] = None  # HF: name of the end-of-document token


class HuggingFaceTokenizer:
    """A `tokenizer.json` (or a directory holding one) loaded with the `tokenizers` library."""

    def __init__(self, path: str, eod_token: Optional[str] = None):
        from tokenizers import Tokenizer

        json_path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(json_path):
            raise DatasetError(f"tokenizer file not found: {json_path}")
        self._tok = Tokenizer.from_file(json_path)
        config = _read_tokenizer_config(os.path.dirname(json_path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod = self._special_id(eod_token or config.get("eos_token"), EOD_CANDIDATES, "EOD")
        self.bos = self._special_id(config.get("bos_token"), BOS_CANDIDATES, None)
        # encode_batch_fast skips the offset bookkeeping we never use (tokenizers >= 0.20).
        self._encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)

    def _special_id(self, preferred, candidates, role):
        if isinstance(preferred, dict):  # tokenizer_config.json may hold an AddedToken dict
            preferred = preferred.get("content")
        for name in ([preferred] if preferred else []) + list(candidates):
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        if role is None:
            return None
        raise DatasetError(
            f"the tokenizer has no {role} token among {', '.join(candidates)}; "
            "name it with --eod-token"
        )

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self._encode(list(texts), add_special_tokens=False)]


def _read_tokenizer_config(directory: str) -> dict:
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class GPT2BPETokenizer(HuggingFaceTokenizer):
    """GPT-2 style byte-level BPE from `vocab.json` + `merges.txt`."""

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import ByteLevelBPETokenizer

        for path in (vocab_file, merge_file):
            if not path or not os.path.isfile(path):
                raise DatasetError(f"GPT2BPETokenizer needs --vocab-file and --merge-file; "
                                   f"not found: {path}")
        self._tok = ByteLevelBPETokenizer.from_file(vocab_file, merge_file)._tokenizer
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod = self._special_id(None, EOD_CANDIDATES, "EOD")
        self.bos = self._special_id(None, BOS_CANDIDATES, None)
        self._encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)


class SentencePieceTokenizer:
    """A SentencePiece model (`--tokenizer-model`); EOD is its `</s>` (eos) id."""

    def __init__(self, model_file: str):
        import sentencepiece

        if not model_file or not os.path.isfile(model_file):
            raise DatasetError(f"SentencePiece model not found: {model_file}")
        self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self._sp.get_piece_size()
        self.eod = self._sp.eos_id()
        self.bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self._sp.encode(list(texts))


class NullTokenizer:
    """Megatron's NullTokenizer: the text already is whitespace-separated token ids.

    As in Megatron-LM, ids must be below `--vocab-size` and EOD is the extra id `vocab_size`.
    """

    def __init__(self, vocab_size: int):
        if not vocab_size:
            raise DatasetError("NullTokenizer needs --vocab-size")
        self.vocab_size = vocab_size + 1
        self.eod = vocab_size
        self.bos = None

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self._ids(text) for text in texts]

    def _ids(self, text: str) -> List[int]:
        try:
            ids = [int(x) for x in text.split()]
        except ValueError:
            raise ValueError("NullTokenizer text must be whitespace-separated integers") from None
        if any(i < 0 or i >= self.eod for i in ids):
            raise ValueError(f"NullTokenizer ids must lie in 0..{self.eod - 1}")
        return ids


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then EOD=256, BOS=257, PAD=258 (for tests and demos)."""

    vocab_size = 259
    eod, bos, pad = 256, 257, 258

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [list(text.encode("utf-8")) for text in texts]


def anchor_token_id(tokenizer) -> int:
    """The shared anchor token of the `anchor` layout: the tokenizer's BOS, else its EOS
    (end-of-document) token, for tokenizers without a BOS."""
    return int(tokenizer.bos if tokenizer.bos is not None else tokenizer.eod)


def build_tokenizer(args: TokenizerConfig) -> object:
    """The tokenizer named by `args.tokenizer_type` (a `TokenizerConfig`, or any object with
    its fields)."""
    kind = args.tokenizer_type
    if kind == "HuggingFaceTokenizer":
        if not args.tokenizer_model:
            raise DatasetError("HuggingFaceTokenizer needs --tokenizer-model (a tokenizer.json "
                               "file or a directory containing one)")
        return HuggingFaceTokenizer(args.tokenizer_model, getattr(args, "eod_token", None))
    if kind == "SentencePieceTokenizer":
        return SentencePieceTokenizer(args.tokenizer_model)
    if kind == "GPT2BPETokenizer":
        return GPT2BPETokenizer(args.vocab_file, args.merge_file)
    if kind == "NullTokenizer":
        return NullTokenizer(args.vocab_size)
    if kind == "ByteTokenizer":
        return ByteTokenizer()
    raise DatasetError(f"unknown --tokenizer-type {kind!r}; choose one of {', '.join(TOKENIZER_TYPES)}")

"""Train a byte-level BPE tokenizer (`tokenizer.json`) on a JSONL corpus with `tokenizers`.

For the small, fast CPU demo models: the vocabulary is sized to the model, and the special
tokens are the ones the rest of the project looks up by name:

* ``<|endoftext|>`` (id 0): end of document, appended by `preprocess_data.py --append-eod`;
* ``<|bos|>`` (id 1): beginning of sequence, used as the AnchorAttention anchor token;
* ``<|pad|>`` (id 2): padding.

Training is deterministic: documents are fed in file order and `tokenizers`' BPE trainer
breaks count ties by the pair itself. The result loads with
`--tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer.json`.

`train_tokenizer(TokenizerTrainingConfig) -> summary` is the library entry; the flags and the
printed summary are `megatron_anchor.cli.train_tokenizer`.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional

from megatron_anchor import files
from megatron_anchor.data.indexed import DatasetError

SPECIAL_TOKENS = ["<|endoftext|>", "<|bos|>", "<|pad|>"]


@dataclass
class TokenizerTrainingConfig:
    """The corpus, the vocabulary size and where to write `tokenizer.json`."""

    input_files: List[str]  # JSONL, plain or .gz
    output: str  # path of the tokenizer.json to write
    vocab_size: int = 8192
    json_key: str = "text"
    min_frequency: int = 2  # minimum pair count for a merge
    max_documents: Optional[int] = None  # train on the first N documents only
    show_progress: bool = False


def validate(config: TokenizerTrainingConfig) -> TokenizerTrainingConfig:
    missing = [p for p in config.input_files if not os.path.isfile(p)]
    if not config.input_files or missing:
        raise DatasetError(f"--input: no such file: {missing[0] if missing else '(none given)'}")
    minimum = len(SPECIAL_TOKENS) + 256 + 1
    if config.vocab_size < minimum:
        raise DatasetError(f"--vocab-size must be at least {minimum} (the 256 bytes, the "
                           f"{len(SPECIAL_TOKENS)} special tokens and one merge), got "
                           f"{config.vocab_size}")
    if config.max_documents is not None and config.max_documents < 1:
        raise DatasetError(f"--max-documents must be >= 1, got {config.max_documents}")
    return config


def iter_texts(paths: List[str], json_key: str) -> Iterator[str]:
    """Texts of `json_key` in every line; malformed lines are errors naming file:line."""
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            line_no = 0
            try:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[json_key]
                    except (json.JSONDecodeError, KeyError, TypeError) as err:
                        raise DatasetError(f"{path}:{line_no}: cannot read {json_key!r} "
                                           f"({err!r})") from None
                    if isinstance(text, str):
                        yield text
            except UnicodeDecodeError as err:
                raise DatasetError(f"{path}:{line_no + 1}: invalid UTF-8 at byte "
                                   f"{err.start}") from None


def build_bpe_tokenizer():
    """An untrained GPT-2-style byte-level BPE pipeline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(config: TokenizerTrainingConfig) -> dict:
    """Train and write `config.output`; returns the vocabulary size and special-token ids."""
    from tokenizers import pre_tokenizers, trainers

    validate(config)
    output = config.output
    tokenizer = build_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        # All 256 bytes, so any text (any language, any binary junk) stays encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=config.show_progress,
    )
    texts = iter_texts(config.input_files, config.json_key)
    if config.max_documents is not None:
        texts = (t for i, t in zip(range(config.max_documents), texts))
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS) + 256:
        raise DatasetError(f"{', '.join(config.input_files)}: no text to train on")
    with files.atomic_path(output) as tmp:
        tokenizer.save(tmp, pretty=True)
    return {"output": output, "vocab_size": tokenizer.get_vocab_size(),
            "special_tokens": {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}}

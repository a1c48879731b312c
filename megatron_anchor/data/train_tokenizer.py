"""Train a byte-level BPE tokenizer (`tokenizer.json`) on a JSONL corpus with `tokenizers`.

For the small, fast CPU demo models: the vocabulary is sized to the model, and the special
tokens are the ones the rest of the project looks up by name:

* ``<|endoftext|>`` (id 0): end of document, appended by `preprocess_data.py --append-eod`;
* ``<|bos|>`` (id 1): beginning of sequence, used as the AnchorAttention anchor token;
* ``<|pad|>`` (id 2): padding.

Training is deterministic: documents are fed in file order and `tokenizers`' BPE trainer
breaks count ties by the pair itself. The result loads with
`--tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer.json`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from typing import Iterator, List

from megatron_anchor.data.indexed import DatasetError

SPECIAL_TOKENS = ["<|endoftext|>", "<|bos|>", "<|pad|>"]


def iter_texts(paths: List[str], json_key: str) -> Iterator[str]:
    """Texts of `json_key` in every line; malformed lines are errors naming file:line."""
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[json_key]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise DatasetError(f"{path}:{line_no}: cannot read {json_key!r} ({err!r})") from None
                if isinstance(text, str):
                    yield text


def build_bpe_tokenizer():
    """An untrained GPT-2-style byte-level BPE pipeline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(paths: List[str], output: str, vocab_size: int = 8192, json_key: str = "text",
                    min_frequency: int = 2, max_documents: int | None = None,
                    show_progress: bool = False) -> dict:
    from tokenizers import pre_tokenizers, trainers

    tokenizer = build_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        # All 256 bytes, so any text (any language, any binary junk) stays encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    texts = iter_texts(paths, json_key)
    if max_documents is not None:
        texts = (t for i, t in zip(range(max_documents), texts))
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS) + 256:
        raise DatasetError(f"{', '.join(paths)}: no text to train on")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + f".tmp-{os.getpid()}"
    tokenizer.save(tmp, pretty=True)
    os.replace(tmp, output)
    return {"output": output, "vocab_size": tokenizer.get_vocab_size(),
            "special_tokens": {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_tokenizer.py",
        description="Train a byte-level BPE tokenizer.json on JSONL text, with special tokens "
                    + ", ".join(SPECIAL_TOKENS) + " (EOD, BOS/anchor, pad).",
    )
    parser.add_argument("--input", required=True, nargs="+", help="JSONL file(s), plain or .gz")
    parser.add_argument("--json-key", default="text", help="key holding the text")
    parser.add_argument("--vocab-size", type=int, default=8192, help="target vocabulary size")
    parser.add_argument("--min-frequency", type=int, default=2,
                        help="minimum pair count for a merge")
    parser.add_argument("--max-documents", type=int, default=None,
                        help="train on the first N documents only")
    parser.add_argument("--output", required=True, help="path of the tokenizer.json to write")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        summary = train_tokenizer(args.input, args.output, args.vocab_size, args.json_key,
                                  args.min_frequency, args.max_documents)
    except (DatasetError, OSError) as err:
        raise SystemExit(f"train_tokenizer: error: {err}") from None
    print(json.dumps(summary, indent=2) if args.json else
          f"wrote {summary['output']} (vocab {summary['vocab_size']}, special tokens "
          + ", ".join(f"{k}={v}" for k, v in summary["special_tokens"].items()) + ")")
    return summary


if __name__ == "__main__":
    main()

"""`megatron-anchor-train-tokenizer`: a byte-level BPE `tokenizer.json` trained on JSONL text.

    python tools/train_tokenizer.py --input corpus.jsonl --vocab-size 8192 --output tokenizer.json

The library is `megatron_anchor.data.train_tokenizer`; this module is the flags, the summary
(text or `--json`) and the exit status (0 written, 2 bad arguments or unreadable input).
"""

from __future__ import annotations

import argparse
import json
from typing import List, Optional

from megatron_anchor.tooling import ToolParser, fail, run_tool

PROG = "megatron-anchor-train-tokenizer"


def build_parser() -> argparse.ArgumentParser:
    from megatron_anchor.data.train_tokenizer import SPECIAL_TOKENS

    parser = ToolParser(
        prog=PROG,
        description="Train a byte-level BPE tokenizer.json on JSONL text, with special tokens "
                    + ", ".join(f"{t} (id {i})" for i, t in enumerate(SPECIAL_TOKENS))
                    + " (EOD, BOS/anchor, pad). Deterministic; load the result with "
                      "--tokenizer-type HuggingFaceTokenizer --tokenizer-model FILE.",
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


def config_from_args(args: argparse.Namespace):
    from megatron_anchor.data.train_tokenizer import TokenizerTrainingConfig, validate

    return validate(TokenizerTrainingConfig(
        input_files=list(args.input), output=args.output, vocab_size=args.vocab_size,
        json_key=args.json_key, min_frequency=args.min_frequency,
        max_documents=args.max_documents))


def _main(argv: Optional[List[str]]) -> int:
    from megatron_anchor.data.train_tokenizer import train_tokenizer

    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    try:
        summary = train_tokenizer(config)
    except OSError as err:  # unreadable input or unwritable output: the user's to fix
        return fail(PROG, f"{err.filename or args.output}: {err.strerror or err}")
    print(json.dumps(summary, indent=2) if args.json else
          f"wrote {summary['output']} (vocab {summary['vocab_size']}, special tokens "
          + ", ".join(f"{k}={v}" for k, v in summary["special_tokens"].items()) + ")")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_tool(PROG, _main, argv)

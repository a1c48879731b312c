"""`megatron-anchor-merge`: merge indexed-dataset shards and their domain tag stores into one.

    python tools/merge_datasets.py --input shards/ --output-prefix data/merged_text_document

The library is `megatron_anchor.data.merge`; this module is the flags (Megatron-LM's
`tools/merge_datasets.py` names), the summary (text or `--json`) and the exit status
(0 merged, 2 bad arguments or shards that cannot be merged).
"""

from __future__ import annotations

import argparse
import json
from typing import List, Optional

from megatron_anchor.tooling import ToolParser, run_tool

PROG = "megatron-anchor-merge"


def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(
        prog=PROG,
        description="Merge Megatron indexed datasets (.bin/.idx) and their domain tag stores "
                    "(.dom) into one dataset, shard order preserved. The domain names are "
                    "unioned in first-appearance order, so merging shards gives the same bytes "
                    "as preprocessing their inputs in one run.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="directory holding the shards (every PREFIX.idx with a "
                                        "PREFIX.bin, merged in sorted order)")
    source.add_argument("--datasets", nargs="+", help="shard prefixes, merged in this order")
    parser.add_argument("--output-prefix", required=True, help="prefix of the merged dataset")
    parser.add_argument("--default-domain", default=None,
                        help="domain for shards that have no tag store (otherwise mixing tagged "
                             "and untagged shards is an error)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def config_from_args(args: argparse.Namespace):
    from megatron_anchor.data.merge import MergeConfig, shard_prefixes

    return MergeConfig(prefixes=args.datasets or shard_prefixes(args.input),
                       output_prefix=args.output_prefix, default_domain=args.default_domain)


def _main(argv: Optional[List[str]]) -> int:
    from megatron_anchor.data.merge import merge_datasets

    args = build_parser().parse_args(argv)
    summary = merge_datasets(config_from_args(args))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"merged {len(summary['shards'])} shards into {summary['output']}: "
          f"{summary['documents']:,} documents, {summary['tokens']:,} tokens")
    if summary["domains"]:
        print("documents per domain: " + ", ".join(
            f"{k}={v:,}" for k, v in summary["domains"].items()))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_tool(PROG, _main, argv)

"""`megatron-anchor-sample-corpus`: a multi-domain JSONL corpus from text already on this machine.

    python tools/build_sample_corpus.py --output corpus.jsonl

The library is `megatron_anchor.data.sample_corpus`; this module is the flags, the summary
(text or `--json`) and the exit status (0 written, 2 bad arguments or fewer than three domains
found on this machine).
"""

from __future__ import annotations

import argparse
import json
from typing import List, Optional

from megatron_anchor.tooling import ToolParser, run_tool

PROG = "megatron-anchor-sample-corpus"


def build_parser() -> argparse.ArgumentParser:
    from megatron_anchor.data.sample_corpus import MIN_DOMAINS, SOURCES

    parser = ToolParser(
        prog=PROG,
        description="Build a multi-domain JSONL corpus from text already on this machine "
                    "(Python stdlib sources, Python docs, licences, man pages). Records are "
                    '{"text": ..., "meta": {"source": DOMAIN, "path": ...}}; preprocess with '
                    f"--domain-key meta.source. Missing sources are skipped; at least "
                    f"{MIN_DOMAINS} domains must remain. Deterministic for a machine and --seed.",
    )
    parser.add_argument("--output", required=True, help="output JSONL (.gz for gzip)")
    parser.add_argument("--max-documents", type=int, default=5000,
                        help="at most this many documents per domain")
    parser.add_argument("--max-bytes", type=int, default=4 << 20,
                        help="stop adding documents to a domain after this many bytes of text")
    parser.add_argument("--max-document-bytes", type=int, default=1 << 20,
                        help="cut longer documents at a line break below this size")
    parser.add_argument("--domains", nargs="+", default=list(SOURCES), choices=list(SOURCES),
                        help="sources to use (each is one domain)")
    parser.add_argument("--seed", type=int, default=1234, help="selection and order seed")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def config_from_args(args: argparse.Namespace):
    from megatron_anchor.data.sample_corpus import SampleCorpusConfig, validate

    return validate(SampleCorpusConfig(
        seed=args.seed, max_documents=args.max_documents, max_bytes=args.max_bytes,
        max_document_bytes=args.max_document_bytes, domains=list(args.domains)))


def _main(argv: Optional[List[str]]) -> int:
    from megatron_anchor.data.sample_corpus import build_corpus, corpus_summary, write_jsonl

    args = build_parser().parse_args(argv)
    records = build_corpus(config_from_args(args))
    write_jsonl(records, args.output)
    summary = corpus_summary(records)
    if args.json:
        print(json.dumps({"output": args.output, "domains": summary}, indent=2))
        return 0
    print(f"wrote {len(records):,} documents to {args.output}")
    for domain, s in summary.items():
        print(f"  {domain:6s} {s['documents']:6,} docs {s['bytes'] / 2**20:7.2f} MiB  "
              f"median {s['median_bytes']:,} B  max {s['max_bytes']:,} B")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_tool(PROG, _main, argv)

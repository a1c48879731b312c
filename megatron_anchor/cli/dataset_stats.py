"""`megatron-anchor-dataset-stats`: how the documents of a dataset fill windows, per variant.

    python tools/dataset_stats.py --data-path data/corpus_text_document --seq-length 4096 \\
        --plot lengths.png --json

The library is `megatron_anchor.data.stats`; this module is the flags, the table (or
`--json`), the PNG length histogram and the exit status (0 done, 2 bad arguments or a
dataset that cannot be read).
"""

from __future__ import annotations

import argparse
import json
from typing import List, Optional

import numpy as np

from megatron_anchor import files
from megatron_anchor.tooling import ToolParser, run_tool

PROG = "megatron-anchor-dataset-stats"


def build_parser() -> argparse.ArgumentParser:
    from megatron_anchor.layout import VARIANTS

    parser = ToolParser(
        prog=PROG,
        description="Document-length and window-packing statistics of an indexed dataset: "
                    "length histogram, documents per window, padding, and the ideal attention "
                    "FLOP ratio sum(L_i^2)/S^2 per attention variant (full = 1).",
    )
    parser.add_argument("--data-path", nargs="+", required=True,
                        help="dataset prefix, or a Megatron blend 'w1 prefix1 w2 prefix2'")
    parser.add_argument("--seq-length", type=int, required=True, help="window length S")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="attention variants to pack the windows for")
    parser.add_argument("--split", default="100,0,0",
                        help="Megatron split; statistics are over the train part")
    parser.add_argument("--anchor-token-id", type=int, default=0,
                        help="anchor id for the anchor variant (does not change the statistics)")
    parser.add_argument("--context-parallel-size", type=int, default=1, dest="cp_size",
                        help="pad segments as for this CP size")
    parser.add_argument("--max-windows", type=int, default=1000,
                        help="windows to pack per variant (0: all)")
    parser.add_argument("--seed", type=int, default=1234, help="document order seed")
    parser.add_argument("--plot", default=None, help="save the length histogram to this PNG")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")
    return parser


def config_from_args(args: argparse.Namespace):
    from megatron_anchor.data.stats import StatsConfig

    return StatsConfig(
        data_path=args.data_path, seq_length=args.seq_length, variants=list(args.variants),
        split=args.split, anchor_token_id=args.anchor_token_id, cp_size=args.cp_size,
        max_windows=args.max_windows or None, seed=args.seed)


def save_histogram(stats: dict, lengths: np.ndarray, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.logspace(0, np.log10(max(int(lengths.max()), 2)) + 0.05, 40)
    ax.hist(lengths, bins=bins, color="#4477aa")
    ax.set_xscale("log")
    ax.axvline(stats["seq_length"], color="#cc3311", linestyle="--",
               label=f"window {stats['seq_length']:,}")
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("documents")
    ax.set_title(f"{stats['documents']:,} documents, {stats['tokens']:,} tokens")
    ax.legend()
    fig.tight_layout()
    with files.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def format_statistics(stats: dict) -> str:
    d = stats["document_length"]
    lines = [f"documents: {stats['documents']:,}  tokens: {stats['tokens']:,}",
             f"document length: mean {d['mean']:,.0f}  p50 {d['p50']:,.0f}  p90 {d['p90']:,.0f}  "
             f"p99 {d['p99']:,.0f}  max {d['max']:,.0f}  (>= window: {stats['longer_than_window']:,})",
             "documents per domain: " + ", ".join(
                 f"{k}={v:,}" for k, v in stats["documents_per_domain"].items()),
             "length histogram:"]
    for row in stats["length_histogram"]:
        if row["documents"]:
            lines.append(f"  {row['min']:>9,}-{row['max']:<9,} {row['documents']:>8,}")
    lines.append(f"{'variant':16s} {'windows':>8s} {'docs/window':>12s} {'padding':>8s} "
                 f"{'attn FLOPs':>11s}")
    for variant, v in stats["variants"].items():
        lines.append(f"{variant:16s} {v['windows']:>8,} "
                     f"{v['documents_per_window'].get('mean', 0):>12.2f} "
                     f"{v['padding_fraction']:>8.2%} {v['attention_flop_ratio']:>11.4f}")
    return "\n".join(lines)


def _main(argv: Optional[List[str]]) -> int:
    from megatron_anchor.data.stats import dataset_statistics

    args = build_parser().parse_args(argv)
    result = dataset_statistics(config_from_args(args))
    if args.plot:
        save_histogram(result.stats, result.lengths, args.plot)
    print(json.dumps(result.stats, indent=2) if args.json else format_statistics(result.stats))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_tool(PROG, _main, argv)

"""Dataset statistics for long-context packing: how documents fill windows, per variant.

For a dataset (prefix, or a Megatron `--data-path` blend) and a window length S:

* document-length histogram (power-of-two bins) and percentiles, documents per domain;
* documents per window and padding fraction, from the real packer;
* ideal attention FLOP ratio per variant: mean over windows of sum_i L_i^2 / S^2 over the
  THD segments the kernel sees (all-padding segments excluded); `full` is 1 by definition,
  the document-masked variants show the saving of AnchorAttention (DESIGN section 1);
* a PNG histogram (matplotlib, Agg backend) and `--json` output.
"""

from __future__ import annotations

import argparse
import json
from typing import List, Optional

import numpy as np

from megatron_anchor.data.indexed import DatasetError
from megatron_anchor.data.windows import WindowConfig, WindowDataset



def length_histogram(lengths: np.ndarray) -> List[dict]:
    """Counts per power-of-two bin [2^k, 2^(k+1))."""
    if len(lengths) == 0:
        return []
    top = int(np.ceil(np.log2(max(int(lengths.max()), 1) + 1)))
    edges = [0] + [2 ** k for k in range(1, top + 1)]
    counts, _ = np.histogram(lengths, bins=edges)
    return [{"min": int(lo), "max": int(hi) - 1, "documents": int(n)}
            for lo, hi, n in zip(edges[:-1], edges[1:], counts)]


def window_statistics(dataset: WindowDataset, max_windows: Optional[int]) -> dict:
    """Documents per window, padding fraction and FLOP ratio over the first windows."""
    from megatron_anchor.layout import KIND_PAD as layout_pad

    n = len(dataset) if max_windows is None else min(len(dataset), max_windows)
    S = dataset.config.seq_length
    docs_per_window, pad_fraction, flop_ratio = [], [], []
    for i in range(n):
        batch = dataset[i]
        kinds = batch.token_kinds.numpy()
        bounds = batch.cu_seqlens.tolist()
        segment_sq = sum((b - a) ** 2 for a, b in zip(bounds[:-1], bounds[1:])
                         if not np.all(kinds[a:b] == layout_pad))
        docs_per_window.append(sum(1 for _, placed in batch.consumed if placed > 0))
        pad_fraction.append(float(np.mean(kinds == layout_pad)))
        flop_ratio.append(segment_sq / S ** 2)
    return {
        "windows": n,
        "documents_per_window": _describe(docs_per_window),
        "padding_fraction": float(np.mean(pad_fraction)) if n else 0.0,
        "attention_flop_ratio": float(np.mean(flop_ratio)) if n else 0.0,
    }


def _describe(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {}
    return {"mean": float(values.mean()), "min": float(values.min()),
            "p50": float(np.percentile(values, 50)), "max": float(values.max())}


def dataset_statistics(data_path, seq_length: int, variants: List[str], split: str,
                       anchor_token_id: int, cp_size: int, max_windows: Optional[int],
                       seed: int) -> dict:
    result = {"seq_length": seq_length, "variants": {}}
    for variant in variants:
        config = WindowConfig(seq_length=seq_length, variant=variant, split=split, seed=seed,
                              anchor_token_id=anchor_token_id, cp_size=cp_size)
        dataset = WindowDataset(data_path, config)
        if "documents" not in result:
            result.update(_document_statistics(dataset, seq_length))
        result["variants"][variant] = window_statistics(dataset, max_windows)
    return result


def _document_statistics(dataset: WindowDataset, seq_length: int) -> dict:
    lengths, domains = [], []
    for s, docs in enumerate(dataset._documents):
        lengths.append(dataset._lengths[s][docs])
        domains.extend(dataset.domain_names[i] for i in dataset._doc_domains[s][docs])
    lengths = np.concatenate(lengths)
    per_domain = {name: domains.count(name) for name in dataset.domain_names}
    return {
        "documents": int(len(lengths)),
        "tokens": int(lengths.sum()),
        "document_length": {**_describe(lengths), "p90": float(np.percentile(lengths, 90)),
                            "p99": float(np.percentile(lengths, 99))},
        "longer_than_window": int((lengths >= seq_length).sum()),
        "documents_per_domain": per_domain,
        "length_histogram": length_histogram(lengths),
        "_lengths": lengths,
    }


def save_histogram(stats: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    lengths = stats["_lengths"]
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
    fig.savefig(path, dpi=100)
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
        lines.append(f"{variant:16s} {v['windows']:>8,} {v['documents_per_window'].get('mean', 0):>12.2f} "
                     f"{v['padding_fraction']:>8.2%} {v['attention_flop_ratio']:>11.4f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from megatron_anchor.layout import VARIANTS

    parser = argparse.ArgumentParser(
        prog="dataset_stats.py",
        description="Document-length and window-packing statistics of an indexed dataset: "
                    "length histogram, documents per window, padding, and the ideal attention "
                    "FLOP ratio sum(L_i^2)/S^2 per attention variant (full = 1).",
    )
    parser.add_argument("--data-path", nargs="+", required=True,
                        help="dataset prefix, or a Megatron blend 'w1 prefix1 w2 prefix2'")
    parser.add_argument("--seq-length", type=int, required=True, help="window length S")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--split", default="100,0,0",
                        help="Megatron split; statistics are over the train part")
    parser.add_argument("--anchor-token-id", type=int, default=0,
                        help="anchor id for the anchor variant (does not change the statistics)")
    parser.add_argument("--context-parallel-size", type=int, default=1, dest="cp_size",
                        help="pad segments as for this CP size")
    parser.add_argument("--max-windows", type=int, default=1000,
                        help="windows to pack per variant (0: all)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--plot", default=None, help="save the length histogram to this PNG")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        stats = dataset_statistics(args.data_path, args.seq_length, args.variants, args.split,
                                   args.anchor_token_id, args.cp_size, args.max_windows or None,
                                   args.seed)
    except DatasetError as err:
        raise SystemExit(f"dataset_stats: error: {err}") from None
    if args.plot:
        save_histogram(stats, args.plot)
    stats.pop("_lengths")
    print(json.dumps(stats, indent=2) if args.json else format_statistics(stats))
    return stats


if __name__ == "__main__":
    main()

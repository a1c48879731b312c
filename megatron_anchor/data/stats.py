"""Dataset statistics for long-context packing: how documents fill windows, per variant.

For a dataset (prefix, or a Megatron `--data-path` blend) and a window length S:

* document-length histogram (power-of-two bins) and percentiles, documents per domain;
* documents per window and padding fraction, from the real packer;
* ideal attention FLOP ratio per variant: mean over windows of sum_i L_i^2 / S^2 over the
  THD segments the kernel sees (all-padding segments excluded); `full` is 1 by definition,
  the document-masked variants show the saving of AnchorAttention (docs/design.md §1);

`dataset_statistics(StatsConfig) -> DatasetStatistics` is the library entry; the flags, the
table, the PNG histogram and `--json` are `megatron_anchor.cli.dataset_stats`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np

from megatron_anchor.data.indexed import DatasetError
from megatron_anchor.data.windows import WindowConfig, WindowDataset
from megatron_anchor.layout import VARIANTS, WindowLayout


@dataclass
class StatsConfig:
    """The dataset, the window length and how the windows are packed."""

    data_path: Union[str, Sequence[str]]  # a prefix, or a Megatron blend "w1 p1 w2 p2"
    seq_length: int
    variants: Optional[List[str]] = None  # None: every variant
    split: str = "100,0,0"  # statistics are over the train part
    anchor_token_id: int = 0  # does not change the statistics
    cp_size: int = 1  # pad segments as for this CP size
    max_windows: Optional[int] = 1000  # windows packed per variant; None: all
    seed: int = 1234


@dataclass
class DatasetStatistics:
    """The statistics (JSON-ready) and the document lengths behind the histogram."""

    stats: dict
    lengths: np.ndarray


def window_layouts(config: StatsConfig) -> List[WindowLayout]:
    """One window layout per variant asked for (every variant by default); the layout
    checks the window length and CP size."""
    if config.variants is not None and not config.variants:
        raise DatasetError("--variants: give at least one variant")
    if config.max_windows is not None and config.max_windows < 1:
        raise DatasetError(f"--max-windows must be >= 1 (0 on the command line: all), got "
                           f"{config.max_windows}")
    return [WindowLayout(seq_length=config.seq_length, variant=variant,
                         anchor_token_id=config.anchor_token_id, cp_size=config.cp_size)
            for variant in (config.variants or VARIANTS)]


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
    S = dataset.layout.seq_length
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


def dataset_statistics(config: StatsConfig) -> DatasetStatistics:
    """Document statistics once, window statistics per variant."""
    result = {"seq_length": config.seq_length, "variants": {}}
    lengths = None
    for window in window_layouts(config):
        dataset = WindowDataset(config.data_path, WindowConfig(layout=window, split=config.split,
                                                               seed=config.seed))
        if lengths is None:
            documents, lengths = _document_statistics(dataset, config.seq_length)
            result.update(documents)
        result["variants"][str(window.variant)] = window_statistics(dataset, config.max_windows)
    return DatasetStatistics(stats=result, lengths=lengths)


def _document_statistics(dataset: WindowDataset, seq_length: int):
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
    }, lengths

"""The window a parity run checks: the same packed batch in every layout.

One window of `seq_length` slots, packed once with padding for the least common multiple of
the layouts' CP sizes (so every layout sees the identical THD batch), from a dataset or from
synthetic documents with a chosen length distribution.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from megatron_anchor.data.windows import WindowConfig, WindowDataset
from megatron_anchor.errors import UserError
from megatron_anchor.layout import WindowLayout, pack_documents


class ParityError(UserError):
    """A parity run that cannot be set up as asked (the message names the flag)."""


def parse_length_distribution(text: str) -> Callable[[np.random.Generator, int], int]:
    """`--doc-length-dist` -> a function (rng, i) -> the i-th document's length (>= 1)."""
    kind, _, params = text.partition(":")
    try:
        values = [float(v) for v in params.split(",")] if params else []
    except ValueError:
        values = None
    shapes = {"lognormal": 2, "uniform": 2, "fixed": 1}
    if values is None or (kind in shapes and len(values) != shapes[kind]) or \
            (kind == "list" and not values) or kind not in (*shapes, "list"):
        raise ParityError(f"bad --doc-length-dist {text!r}: use lognormal:MEAN,SIGMA, "
                         "uniform:A,B, fixed:N or list:N1,N2,...")
    if any(v <= 0 for v in values[:1]) or (kind == "list" and min(values) < 1):
        raise ParityError(f"bad --doc-length-dist {text!r}: lengths must be >= 1")
    if kind == "lognormal":
        mean, sigma = values
        mu = math.log(mean) - sigma ** 2 / 2  # so that the mean length is `mean`
        return lambda rng, i: max(1, int(round(rng.lognormal(mu, sigma))))
    if kind == "uniform":
        low, high = int(values[0]), int(values[1])
        return lambda rng, i: int(rng.integers(low, high + 1))
    if kind == "fixed":
        return lambda rng, i: int(values[0])
    lengths = [int(v) for v in values]
    return lambda rng, i: lengths[i % len(lengths)]


def synthetic_documents(length_dist: str, seq_length: int, vocab_size: int, seed: int,
                        reserved: int = 2) -> list[list[int]]:
    """Random-token documents, enough to fill a window; ids below `reserved` are kept for
    padding and the anchor so they never appear inside a document."""
    rng = np.random.default_rng(seed)
    draw = parse_length_distribution(length_dist)
    documents, total = [], 0
    while total <= seq_length:
        length = draw(rng, len(documents))
        documents.append(rng.integers(reserved, vocab_size, size=length + 1).tolist()[:length])
        total += length + 1
    return documents


def make_batch(args, variant, cp_multiple: int):
    """The window (a PackedBatch) for `variant`, padded for every layout's CP; identical on
    every rank."""

    if args.data_path:
        return _window_from_dataset(args, variant, cp_multiple)
    documents = synthetic_documents(args.doc_length_dist, args.seq_length,
                                    args.model.vocab_size, args.seed)
    return pack_documents(documents, args.seq_length, variant,
                          anchor_token_id=args.anchor_token_id, cp_size=cp_multiple,
                          pad_token_id=args.pad_token_id)


def _window_from_dataset(args, variant, cp_multiple: int):
    window = WindowLayout(seq_length=args.seq_length, variant=variant,
                          anchor_token_id=args.anchor_token_id, pad_token_id=args.pad_token_id,
                          cp_size=cp_multiple)
    config = WindowConfig(layout=window, seed=args.seed)
    batch = WindowDataset(args.data_path, config)[args.window_index]
    top = int(batch.tokens.max())
    if top >= args.model.vocab_size:
        raise ParityError(f"token id {top} in --data-path is outside the model's vocabulary "
                          f"({args.model.vocab_size}): is it the checkpoint's data?")
    return batch

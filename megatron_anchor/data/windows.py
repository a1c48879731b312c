"""Document-aware window packing: a map-style torch Dataset of `PackedBatch` windows.

`WindowDataset` reads one or more indexed-dataset prefixes (Megatron `--data-path` style,
``"w1 prefix1 w2 prefix2"`` or plain prefixes), takes the documents of one split
(`--split 969,30,1`, by document, as Megatron does), optionally thins short documents per
source and domain (UpSampledMix), orders the documents into a seeded stream, and packs the
stream window after window with `megatron_anchor.layout.pack_documents` (the layout is never
re-implemented here: slot accounting comes from calling the packer itself).

The plan is computed up front as numpy arrays (and cached on disk if asked):

* the stream: entries ``(source, document, length)`` in packing order, one per document
  (interleaved-chunk ablations permute positions inside a window, never the stream);
* the sample index: for window w (in packing order), the stream position and token offset
  where it starts;
* the shuffle index: sample i is window ``order[i]`` (``blocks[w]``: the epoch, or blend
  block, of window w). As in Megatron's GPTDataset
  (`shuffle_index`), the packed windows are served in a seeded random order on top of the
  per-epoch document shuffle, so consecutive training steps do not walk through one long
  document window after window. The windows are shuffled *within each epoch* (the windows
  that start in that epoch's part of the stream; Megatron shuffles all full epochs together),
  and an epoch that the run only partly needs is still packed to its end and shuffled whole,
  so the served samples are a random draw from it and sample i does not depend on how many
  samples are asked for (a longer --train-iters keeps the earlier steps' data).

So `dataset[i]` only reads the documents of one window (O(window)), random access works, and
resuming at sample i needs nothing but i. Within an epoch every document of the split appears
exactly once (cut documents continue in the next window), unless `drop_last` is asked for;
the samples of epoch e are served before any sample of epoch e+1.

Epochs: without weights all sources form one pool, shuffled per epoch, and the default length
is exactly one epoch. With weights, each source is shuffled and cycled on its own, and the
stream takes the next document from the source furthest below its token share (the weights
are token shares); each source's epoch still holds each of its documents exactly once. A
blend has no common epoch, so its windows are shuffled in blocks of one "blend epoch": as many
windows as one pass over the split's tokens.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_anchor import files
from megatron_anchor.data.indexed import (
    DatasetError, file_sha256, idx_path, merge_domain_names, open_dataset,
)
from megatron_anchor.layout import WindowLayout

SPLIT_NAMES = ("train", "valid", "test")
INDEX_FORMAT_VERSION = 3  # 2: the shuffle index is cached; 3: stream entries lost `start`


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------

@dataclass
class WindowConfig:
    # The window: length, attention variant, anchor/pad ids, CP padding, interleaving
    # (validated when it is built).
    layout: WindowLayout
    seed: int = 1234
    split: str = "969,30,1"
    split_name: str = "train"
    # Windows to build; None: one epoch (weighted blends: total tokens / seq_length windows).
    num_samples: Optional[int] = None
    shuffle: bool = True  # shuffle the documents of each epoch
    # Shuffle the packed windows within each epoch (Megatron's shuffle_index); None: as
    # `shuffle`. False serves windows in packing order (ablation / diagnostics).
    shuffle_samples: Optional[bool] = None
    # UpSampledMix: keep this fraction of the documents shorter than the threshold, chosen
    # per (source, domain) so the source mix is kept. 1.0 keeps everything.
    short_doc_keep_fraction: float = 1.0
    short_doc_threshold: int = 4096
    # Domain tags: token ids placed after the anchor of each document, per domain name.
    domain_tag_ids: Optional[Dict[str, List[int]]] = None
    drop_last: bool = False  # drop a final window that is not full
    index_cache_dir: Optional[str] = None


def parse_data_path(data_path) -> Tuple[List[str], Optional[List[float]]]:
    """Megatron `--data-path`: "prefix" / "p1 p2" / "w1 p1 w2 p2" (string or list)."""
    from megatron.core.datasets.utils import get_blend_from_list

    items = data_path.split() if isinstance(data_path, str) else list(data_path)
    if not items:
        raise DatasetError("empty --data-path")
    try:
        prefixes, weights = get_blend_from_list(items)
    except (ValueError, AssertionError) as err:
        raise DatasetError(f"bad --data-path {' '.join(items)!r}: {err}") from None
    if weights is not None and (min(weights) < 0 or sum(weights) <= 0):
        raise DatasetError(f"--data-path weights must be >= 0 and not all zero: {weights}")
    return list(prefixes), weights


def split_range(split: str, split_name: str, num_documents: int) -> Tuple[int, int]:
    """Document range of one split, with Megatron-Core's parsing and rounding."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    if split_name not in SPLIT_NAMES:
        raise DatasetError(f"split name must be one of {SPLIT_NAMES}, got {split_name!r}")
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    bounds = matrix[SPLIT_NAMES.index(split_name)]
    if bounds is None:
        return 0, 0
    return int(round(bounds[0] * num_documents)), int(round(bounds[1] * num_documents))


# ----------------------------------------------------------------------------------------
# Plans that do not need the packer (pure functions, unit tested)
# ----------------------------------------------------------------------------------------

def upsample_keep_mask(lengths: np.ndarray, domain_ids: np.ndarray, fraction: float,
                       threshold: int, rng: np.random.Generator) -> np.ndarray:
    """UpSampledMix: per domain, keep round(fraction * n_short) of the short documents
    (chosen at random) and every document of `threshold` tokens or more."""
    if not 0.0 <= fraction <= 1.0:
        raise DatasetError(f"short-document keep fraction must be in [0, 1], got {fraction}")
    keep = np.ones(len(lengths), dtype=bool)
    if fraction == 1.0:
        return keep
    for domain in np.unique(domain_ids):
        short = np.flatnonzero((domain_ids == domain) & (lengths < threshold))
        n_keep = int(round(fraction * len(short)))
        dropped = rng.permutation(short)[n_keep:]
        keep[dropped] = False
    return keep


class WeightedInterleaver:
    """Blend sources by token share: each step takes the next document of the source furthest
    below its share. Each source walks its own epochs, `order_for_epoch(source, epoch)` giving
    the document order of one epoch, so within a source's epoch every document comes once."""

    def __init__(self, source_lengths: List[np.ndarray], weights: Sequence[float],
                 order_for_epoch):
        weights = np.asarray(weights, dtype=np.float64)
        self.shares = weights / weights.sum()
        self.lengths = source_lengths
        self.order_for_epoch = order_for_epoch
        self.active = [s for s, w in enumerate(weights) if w > 0]
        self.orders = {s: order_for_epoch(s, 0) for s in self.active}
        if not any(len(self.orders[s]) for s in self.active):
            raise DatasetError("no documents in any weighted source of this split")
        self.active = [s for s in self.active if len(self.orders[s])]
        self.epochs = {s: 0 for s in self.active}
        self.cursors = {s: 0 for s in self.active}
        self.emitted = {s: 0 for s in self.active}
        self.total = 0

    def take(self, min_tokens: int) -> List[Tuple[int, int]]:
        """(source, document) pairs holding at least `min_tokens` tokens."""
        pairs, target = [], self.total + min_tokens
        while self.total < target:
            s = max(self.active, key=lambda k: self.shares[k] * (self.total + 1) - self.emitted[k])
            if self.cursors[s] == len(self.orders[s]):
                self.epochs[s] += 1
                self.orders[s], self.cursors[s] = self.order_for_epoch(s, self.epochs[s]), 0
            doc = int(self.orders[s][self.cursors[s]])
            self.cursors[s] += 1
            n = int(self.lengths[s][doc])
            self.emitted[s] += n
            self.total += n
            pairs.append((s, doc))
        return pairs


class _Stream:
    """The growing list of pieces being packed, with cumulative token counts so that
    "how many tokens are ahead" is O(1)."""

    def __init__(self, dataset: "WindowDataset"):
        self.dataset = dataset
        self.pieces: List[Tuple[int, int, int]] = []  # (source, document, length)
        self.piece_epochs: List[int] = []  # pooled stream: the epoch each piece belongs to
        self.cumulative = [0]
        self.epoch = 0
        self._zeros = np.zeros(0, dtype=np.int64)
        if dataset.weights is None:
            self.interleaver = None
            self._append(dataset._pieces(dataset._pooled_epoch(0)))
        else:
            self.interleaver = WeightedInterleaver(
                dataset._lengths, dataset._weights_for_split(), dataset._epoch_order)
            self._append(dataset._pieces(self.interleaver.take(dataset.layout.seq_length)))

    def _append(self, pieces) -> None:
        for piece in pieces:
            self.pieces.append(piece)
            self.piece_epochs.append(self.epoch)
            self.cumulative.append(self.cumulative[-1] + piece[2])

    def ensure_tokens_after(self, pos: int, offset: int, tokens: int) -> None:
        """Append epochs (or blended documents) until `tokens` lie beyond (pos, offset)."""
        while self.cumulative[-1] - self.cumulative[pos] - offset < tokens:
            if self.interleaver is None:
                self.epoch += 1
                more = self.dataset._pooled_epoch(self.epoch)
            else:
                more = self.interleaver.take(tokens)
            self._append(self.dataset._pieces(more))

    def window_from(self, pos: int, offset: int, seq_length: int):
        """Pieces from `pos` holding at least `seq_length` tokens (or all that are left):
        enough to fill a window whatever the per-document overhead of the variant."""
        end = bisect.bisect_left(self.cumulative, self.cumulative[pos] + offset + seq_length)
        return self.pieces[pos:max(end, pos + 1)]

    def zeros(self, n: int) -> np.ndarray:
        """A stand-in document of n tokens (a view into one shared buffer)."""
        if len(self._zeros) < n + 1:
            self._zeros = np.zeros(max(n + 1, 2 * len(self._zeros)), dtype=np.int64)
        return self._zeros[:n]


# ----------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------

class WindowDataset(torch.utils.data.Dataset):
    """Packed windows (`PackedBatch`) over a blend of indexed datasets.

    Use with `torch.utils.data.DataLoader(ds, batch_size=k, collate_fn=layout.collate)` or
    Megatron-Core's samplers (`MegatronPretrainingSampler(consumed_samples=...)` to resume).
    """

    def __init__(self, data_path, config: WindowConfig):
        self.config = config
        self.layout = config.layout
        self.prefixes, self.weights = parse_data_path(data_path)
        self.sources = [open_dataset(p) for p in self.prefixes]
        self.domain_names, self._doc_domains = self._domain_tables()
        self._tag_ids = self._tag_table()
        self._lengths = [src.document_lengths() for src in self.sources]
        self._documents = self._split_documents()
        self._load_or_build_index()

    # -- documents and domains ------------------------------------------------------------

    def _domain_tables(self):
        """Global domain names (union over sources) and per-source document -> domain id; a
        source without a tag store is one domain named after its file."""
        return merge_domain_names([source.domain_table(os.path.basename(prefix))
                                   for prefix, source in zip(self.prefixes, self.sources)])

    def _tag_table(self) -> Optional[List[List[int]]]:
        tags = self.config.domain_tag_ids
        if tags is None:
            return None
        missing = [n for n in self.domain_names if n not in tags]
        if missing:
            raise DatasetError(f"domain_tag_ids has no tag for domain(s) {missing}")
        return [list(map(int, tags[name])) for name in self.domain_names]

    def _split_documents(self) -> List[np.ndarray]:
        """Per source: the document indices of this split, after UpSampledMix thinning."""
        cfg = self.config
        chosen = []
        for s, source in enumerate(self.sources):
            lengths = self._lengths[s]
            begin, end = split_range(cfg.split, cfg.split_name, len(lengths))
            docs = np.arange(begin, end, dtype=np.int64)
            docs = docs[lengths[docs] > 0]
            rng = np.random.default_rng([cfg.seed, s, 0x5A3])
            keep = upsample_keep_mask(lengths[docs], self._doc_domains[s][docs],
                                      cfg.short_doc_keep_fraction, cfg.short_doc_threshold, rng)
            chosen.append(docs[keep])
        if sum(len(d) for d in chosen) == 0:
            raise DatasetError(f"split {cfg.split_name!r} ({cfg.split}) has no documents")
        return chosen

    def _weights_for_split(self) -> List[float]:
        return [w if len(d) else 0.0 for w, d in zip(self.weights, self._documents)]

    # -- the stream of documents ------------------------------------------------------------

    def _epoch_order(self, source: int, epoch: int) -> np.ndarray:
        docs = self._documents[source]
        if not self.config.shuffle:
            return docs
        return np.random.default_rng([self.config.seed, source, epoch, 1]).permutation(docs)

    def _pooled_epoch(self, epoch: int) -> List[Tuple[int, int]]:
        pairs = [(s, int(d)) for s, docs in enumerate(self._documents) for d in docs]
        if self.config.shuffle:
            order = np.random.default_rng([self.config.seed, epoch, 2]).permutation(len(pairs))
            pairs = [pairs[i] for i in order]
        return pairs

    def _pieces(self, pairs: List[Tuple[int, int]]) -> List[Tuple[int, int, int]]:
        """(source, document, length) entries: whole documents."""
        # Interleaved chunks are laid out inside each window by pack_documents (which only
        # permutes position ids), so the stream always holds whole documents.
        lengths = self._lengths
        return [(s, d, int(lengths[s][d])) for s, d in pairs]

    # -- the sample index -------------------------------------------------------------------

    def _load_or_build_index(self) -> None:
        path = self._cache_path()
        if path and os.path.isfile(path):
            with np.load(path) as cached:
                self.stream, self.starts = cached["stream"], cached["starts"]
                self.order, self.blocks = cached["order"], cached["blocks"]
            return
        self.stream, self.starts, self.order, self.blocks = self._build_index()
        if path:
            with files.atomic_path(path, suffix=".npz") as tmp:
                np.savez(tmp, stream=self.stream, starts=self.starts, order=self.order,
                         blocks=self.blocks)

    @property
    def shuffles_samples(self) -> bool:
        cfg = self.config
        return cfg.shuffle if cfg.shuffle_samples is None else bool(cfg.shuffle_samples)

    def _cache_path(self) -> Optional[str]:
        if not self.config.index_cache_dir:
            return None
        key = {"version": INDEX_FORMAT_VERSION, "config": asdict(self.config),
               "prefixes": self.prefixes, "weights": self.weights,
               "idx": [file_sha256(idx_path(p)) for p in self.prefixes]}
        key["config"].pop("index_cache_dir")
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return os.path.join(self.config.index_cache_dir, f"windows-{digest}.npz")

    def _num_windows_wanted(self) -> Optional[int]:
        """None means: exactly one epoch of the pooled stream."""
        cfg = self.config
        if cfg.num_samples is not None or self.weights is None:
            return cfg.num_samples
        return self._blend_epoch_windows()

    def _blend_epoch_windows(self) -> int:
        """Windows of one pass over the split's tokens (a blend's shuffle block)."""
        split_tokens = sum(int(self._lengths[s][d].sum()) for s, d in enumerate(self._documents))
        return max(1, math.ceil(split_tokens / self.layout.seq_length))

    def _build_index(self):
        """Pack the whole stream once with token-free stand-in documents, recording where
        each window starts. Slot use depends only on lengths and tags, never on token values
        (checked again on every real read in `__getitem__`). With the sample shuffle, the
        epoch (block) holding the last wanted sample is packed to its end."""
        wanted = self._num_windows_wanted()
        shuffle = self.shuffles_samples
        block_size = self._blend_epoch_windows() if self.weights is not None else None
        stream = _Stream(self)
        pos, offset, starts, ran_dry = 0, 0, [(0, 0)], False
        blocks: List[int] = []  # shuffle block (epoch) of each window
        while True:
            built = len(starts) - 1
            enough = wanted is not None and built >= wanted
            if enough and not shuffle:
                break
            if wanted is not None:  # keep at least a window of tokens ahead (next epochs)
                stream.ensure_tokens_after(pos, offset, self.layout.seq_length)
            if pos >= len(stream.pieces):
                break  # the epoch is fully packed
            block = built // block_size if block_size else stream.piece_epochs[pos]
            if enough and (not blocks or block != blocks[-1]):
                break  # enough windows, and the last one's epoch (block) is complete
            blocks.append(block)
            window = stream.window_from(pos, offset, self.layout.seq_length)
            docs = [stream.zeros(length - (offset if k == 0 else 0))
                    for k, (_, _, length) in enumerate(window)]
            batch = self._pack_pieces(window, docs)
            pos, offset = self._advance(stream.pieces, pos, offset, batch.consumed)
            starts.append((pos, offset))
            ran_dry = pos >= len(stream.pieces) and int(batch.document_ids[-1]) < 0
        if self.config.drop_last and len(starts) > 1 and ran_dry:
            starts.pop()  # the final window was not full
            blocks.pop()
        pieces = np.asarray(stream.pieces, dtype=np.int64).reshape(-1, 3)
        served = len(blocks) if wanted is None else min(wanted, len(blocks))
        blocks = np.asarray(blocks, dtype=np.int64)
        order = (self._shuffle_index(blocks) if shuffle
                 else np.arange(len(blocks), dtype=np.int64))
        return pieces, np.asarray(starts, dtype=np.int64), order[:served], blocks

    def _shuffle_index(self, blocks: np.ndarray) -> np.ndarray:
        """Windows in serving order: each block (epoch) in turn, its windows permuted by a
        generator seeded with (seed, block), so an order never depends on the run length."""
        order = []
        for block in np.unique(blocks):
            members = np.flatnonzero(blocks == block)
            rng = np.random.default_rng([self.config.seed, int(block), 3])
            order.append(members[rng.permutation(len(members))])
        return np.concatenate(order).astype(np.int64) if order else np.zeros(0, np.int64)

    @staticmethod
    def _advance(pieces, pos: int, offset: int, consumed) -> Tuple[int, int]:
        if not consumed or all(n == 0 for _, n in consumed):
            raise DatasetError("a window consumed no tokens: seq_length is too small for the "
                               "anchor and domain tags of one document")
        for _, n in consumed:
            length = pieces[pos][2] - offset
            if n < length:
                return pos, offset + n
            pos, offset = pos + 1, 0
        return pos, offset

    def _pack_pieces(self, window, docs):
        domain_ids = [int(self._doc_domains[s][d]) for s, d, *_ in window]
        tags = None if self._tag_ids is None else [self._tag_ids[i] for i in domain_ids]
        return self.layout.pack(docs, domain_tags=tags, domain_ids=domain_ids)

    # -- reading windows ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.order)

    @property
    def num_windows(self) -> int:
        """Windows packed (whole epochs when shuffled; `len(self)` of them are served)."""
        return len(self.starts) - 1

    def window_index(self, index: int) -> int:
        """The packed window that sample `index` serves (`order[index]`)."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range 0..{len(self) - 1}")
        return int(self.order[index])

    def window_pieces(self, index: int) -> List[Tuple[int, int, int, int]]:
        """What sample `index` holds: ``(source, document, first, stop)`` per document piece
        in packing order (tokens first..stop-1 of that document are placed)."""
        window = self.window_index(index)
        return [(s, d, first, placed_stop) for s, d, first, placed_stop, _ in self._placed(window)]

    def _placed(self, window: int):
        (pos, offset), (end_pos, end_offset) = self.starts[window], self.starts[window + 1]
        last = end_pos + (1 if end_offset > 0 else 0)
        for k in range(int(pos), int(last)):
            s, d, stop = (int(x) for x in self.stream[k])
            first = int(offset) if k == pos else 0
            placed_stop = int(end_offset) if (k == end_pos and end_offset > 0) else stop
            yield s, d, first, placed_stop, stop

    def __getitem__(self, index: int):
        window = self.window_index(index)
        placed = list(self._placed(window))
        # Pass each document's remainder, not just the placed part: a cut document's last
        # slot is trained on the token that opens the next window.
        docs = [self.sources[s].document(d, offset=first, length=stop - first)
                for s, d, first, _, stop in placed]
        batch = self._pack_pieces([(s, d) for s, d, *_ in placed], docs)
        got = [n for _, n in batch.consumed if n > 0]
        want = [placed_stop - first for _, _, first, placed_stop, _ in placed]
        if got != want:
            raise DatasetError(f"window {window}: the packer placed {got} tokens per document but "
                               f"the sample index expects {want}; the index cache is stale "
                               "(delete it) or the layout changed")
        return batch

    def state(self) -> dict:
        """What identifies this plan (for logs and checkpoints)."""
        return {"windows": len(self), "packed_windows": self.num_windows,
                "shuffled_samples": self.shuffles_samples,
                "stream_entries": int(len(self.stream)),
                "documents_per_source": [int(len(d)) for d in self._documents],
                "domains": self.domain_names}


# ----------------------------------------------------------------------------------------
# Measures of a set of windows
# ----------------------------------------------------------------------------------------

def target_counts(dataset: WindowDataset, samples: Optional[Sequence[int]] = None,
                  max_tokens: Optional[int] = None, vocab_size: int = 0) -> np.ndarray:
    """How often each token id is a trained target in these samples (default: all), reading
    samples in order until `max_tokens` targets are counted."""
    total = np.zeros(vocab_size, dtype=np.int64)
    for i in range(len(dataset)) if samples is None else samples:
        batch = dataset[i]
        targets = batch.labels[batch.loss_mask.bool()].numpy().astype(np.int64)
        if len(targets):
            n = max(len(total), int(targets.max()) + 1)
            total = np.pad(total, (0, n - len(total)))
            total += np.bincount(targets, minlength=n)
        if max_tokens is not None and total.sum() >= max_tokens:
            break
    return total


def unigram_cross_entropy(targets: np.ndarray, reference: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats per target) of target counts `targets` under the unigram model
    fitted on `reference` counts with add-one smoothing over `vocab_size` tokens: the loss of
    a model that knows only the training token frequencies. A language model's validation
    loss below it has learned more than word frequencies."""
    vocab_size = max(vocab_size, len(targets), len(reference))
    t = np.pad(targets, (0, vocab_size - len(targets))).astype(np.float64)
    r = np.pad(reference, (0, vocab_size - len(reference))).astype(np.float64)
    if t.sum() == 0:
        raise DatasetError("no trained targets to score")
    q = (r + 1.0) / (r.sum() + vocab_size)
    return float(-(t * np.log(q)).sum() / t.sum())


def validation_unigram_cross_entropy(train: WindowDataset, valid: WindowDataset,
                                     vocab_size: int, max_train_tokens: int = 1 << 23) -> float:
    """`unigram_cross_entropy` of all validation targets under the training samples' unigram
    distribution (the first samples, up to `max_train_tokens` targets: a random draw of the
    epoch, since samples are shuffled)."""
    return unigram_cross_entropy(target_counts(valid, vocab_size=vocab_size),
                                 target_counts(train, max_tokens=max_train_tokens,
                                               vocab_size=vocab_size), vocab_size)

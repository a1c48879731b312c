"""The packed-window layout: the one place that says what goes in a packed batch.

Every backend, tool and test consumes `PackedBatch`. A window of `seq_length` slots is
laid out in THD form (one flat token axis, segments delimited by `cu_seqlens`):

* ``full``: one segment spanning the window; positions 0..S-1.
* ``intra-doc``: one segment per document; positions are window offsets.
* ``intra-doc-reset``: one segment per document; positions restart at 0 per segment.
* ``anchor``: one segment per document, ``[A, (tags), doc tokens, (pad)]``; each A is a
  copy of the shared anchor token at position 0, every other slot keeps its window offset.

Why duplicated anchors are exact: a copy that starts its segment only sees itself, so its
hidden states, K and V are identical in every copy and every layer; a document token sees
its own copy plus earlier tokens of its document, which is exactly the single-anchor mask.

Loss-mask rules (docs/design.md §2.4): a slot is trained only if its target is a real next token it
could legitimately predict. Padding, tag tokens as targets, anchor copies after the first
and targets in another (invisible) document are masked.

Choice for the first anchor copy: it is trained to predict the first token of the first
document (as BOS -> first token in a single-anchor window). If that target is a tag token
it is masked like every tag target. With this choice the summed loss over the duplicated
layout equals the single-shared-anchor loss exactly.

A cut document: its last slot in the window is trained on the document's next token (the
one that opens the next window), as Megatron's GPT dataset does with its S+1 samples.

Context parallelism follows Transformer Engine's THD convention: each segment is padded
at its end to a multiple of 2*cp_size (pads live inside ``cu_seqlens``, so
``cu_seqlens == cu_seqlens_padded``), and rank r holds chunks r and 2*cp-1-r of every
segment (`cp_partition_indices`).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_anchor.errors import UserError


class LayoutError(UserError):
    """Arguments that cannot make a packed window; the message says what to change."""


class Variant(str, enum.Enum):
    """An attention variant: one row of the variants table (docs/design.md §2).

    Resolved once from its name at the edge (`get_variant`, the tools' flags) and carried
    as this object; code reads its fields, never compares names. A str subclass, so it
    prints, compares and serialises (JSON, index-cache keys) as its name.
    """

    #                 name               segment_per_document reset  anchor interleave_allowed
    FULL = ("full", False, False, False, False)
    INTRA_DOC = ("intra-doc", True, False, False, True)
    INTRA_DOC_RESET = ("intra-doc-reset", True, True, False, False)
    ANCHOR = ("anchor", True, False, True, True)

    def __new__(cls, name: str, segment_per_document: bool, reset_positions: bool,
                anchor: bool, interleave_allowed: bool):
        member = str.__new__(cls, name)
        member._value_ = name
        # One THD segment per document (documents invisible to each other).
        member.segment_per_document = segment_per_document
        # Positions restart at 0 in every segment.
        member.reset_positions = reset_positions
        # Each segment starts with a copy of the shared anchor (position 0).
        member.anchor = anchor
        # --interleave-chunks keeps its meaning (chunks of a document stay visible).
        member.interleave_allowed = interleave_allowed
        return member

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


VARIANTS = tuple(v.value for v in Variant)
DOCUMENT_MASKED_VARIANTS = tuple(v.value for v in Variant if v.segment_per_document)

# Slot kinds, kept per slot so references and tools never have to re-derive the layout.
KIND_DOC, KIND_ANCHOR, KIND_TAG, KIND_PAD = 0, 1, 2, 3


def get_variant(name) -> Variant:
    """The table entry for a variant name (a `Variant` is returned as it is)."""
    try:
        return Variant(name)
    except ValueError:
        raise LayoutError(f"unknown attention variant {name!r}: choose one of "
                          f"{', '.join(VARIANTS)}") from None


def cp_multiple(cp_size: int) -> int:
    """Every THD segment's length must divide by this under context parallelism."""
    return 2 * cp_size if cp_size > 1 else 1


def check_seq_length(seq_length: int, cp_size: int = 1) -> None:
    if cp_size < 1:
        raise LayoutError(f"context parallel size must be >= 1, got {cp_size}")
    if seq_length <= 0 or seq_length % cp_multiple(cp_size):
        raise LayoutError(
            f"--seq-length {seq_length} must be a positive multiple of 2 x "
            f"--context-parallel-size = {2 * cp_size}: context parallelism splits every "
            f"segment into 2 x CP chunks")


def _check_anchor(variant: Variant, anchor_token_id: Optional[int]) -> None:
    if variant.anchor and anchor_token_id is None:
        raise LayoutError(
            f"--attention-variant {variant} needs an anchor token id (the tokenizer's BOS, or "
            "its EOS when it has no BOS): give a tokenizer or --anchor-token-id")


def _check_interleave(variant: Variant, interleave_chunks: Optional[int]) -> None:
    if interleave_chunks and (interleave_chunks not in (2, 3) or not variant.interleave_allowed):
        allowed = " or ".join(v.value for v in Variant if v.interleave_allowed)
        raise LayoutError(
            f"--interleave-chunks {interleave_chunks}: use 2 or 3, with --attention-variant "
            f"{allowed} (got {variant.value!r}); chunks of one document must stay mutually "
            "visible")


@dataclass
class PackedBatch:
    """One packed window (or several, concatenated along the token axis by `collate`).

    Per-slot tensors are 1-D and share one length: `seq_length` for a window, or the
    local share under context parallelism (`shard_for_cp`). `cu_seqlens` and `max_seqlen`
    always describe the full (unsharded) THD sequence, as Transformer Engine expects.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    document_ids: torch.Tensor
    domain_ids: torch.Tensor
    token_kinds: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    variant: Variant
    seq_length: int
    cp_size: int = 1
    cp_rank: int = 0
    num_windows: int = 1
    consumed: list = field(default_factory=list)

    PER_SLOT = (
        "tokens", "labels", "loss_mask", "position_ids", "document_ids", "domain_ids",
        "token_kinds",
    )

    @property
    def num_segments(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    @property
    def segment_lengths(self) -> torch.Tensor:
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def to(self, device) -> "PackedBatch":
        moved = {n: getattr(self, n).to(device) for n in self.PER_SLOT}
        return dataclasses.replace(self, cu_seqlens=self.cu_seqlens.to(device), **moved)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class WindowLayout:
    """How windows are packed: the variant, the window and the CP padding, validated once
    (here) and then carried to the packer, which checks only the documents of each call."""

    seq_length: int
    variant: Variant
    anchor_token_id: Optional[int] = None
    pad_token_id: int = 0
    cp_size: int = 1
    interleave_chunks: int = 0  # 0: off; 2 or 3: the interleaved-chunks ablation

    def __post_init__(self):
        object.__setattr__(self, "variant", get_variant(self.variant))
        object.__setattr__(self, "interleave_chunks", self.interleave_chunks or 0)
        check_seq_length(self.seq_length, self.cp_size)
        _check_anchor(self.variant, self.anchor_token_id)
        _check_interleave(self.variant, self.interleave_chunks)

    def pack(self, documents: Sequence[Sequence[int]],
             domain_tags: Optional[Sequence[Sequence[int]]] = None,
             domain_ids: Optional[Sequence[int]] = None) -> PackedBatch:
        """Pack `documents` (token-id lists), in order, into one window of `seq_length` slots.

        The last document that does not fit is cut; `PackedBatch.consumed` lists, for each
        document touched, ``(document_index, tokens_placed)`` so a caller can pass the rest
        of a cut document first in the next call. Slots left when documents run out are
        padding. `domain_tags[i]` (token ids) follow document i's anchor; `domain_ids[i]`
        labels its slots (per-domain validation loss).

        `interleave_chunks` (2 or 3; the paper's ablation, found to hurt) splits each
        document into that many chunks and interleaves the chunks of the window's documents
        (chunk 0 of every document, then chunk 1, ...), keeping each document's chunk order.
        See `_interleave_positions` for why this needs no new attention mask.
        """
        _check_documents(documents, domain_tags, domain_ids)
        variant, S = self.variant, self.seq_length

        tokens = np.full(S, self.pad_token_id, dtype=np.int64)
        labels = np.full(S, self.pad_token_id, dtype=np.int64)
        loss_mask = np.zeros(S, dtype=np.float32)
        position_ids = np.arange(S, dtype=np.int64)
        document_ids = np.full(S, -1, dtype=np.int64)
        doc_domains = np.full(S, -1, dtype=np.int64)
        kinds = np.full(S, KIND_PAD, dtype=np.int8)
        boundaries = [0]
        consumed = []
        slot = 0

        for i, doc in enumerate(documents):
            remaining = S - slot
            tags = list(domain_tags[i]) if domain_tags is not None else []
            prefix_len = int(variant.anchor) + len(tags)
            if remaining < prefix_len + 1:
                break  # not even one document token fits after its anchor and tags
            take = min(len(doc), remaining - prefix_len)
            doc_arr = np.asarray(doc[: take + 1], dtype=np.int64)
            start = slot

            if variant.anchor:
                tokens[slot], kinds[slot] = self.anchor_token_id, KIND_ANCHOR
                position_ids[slot] = 0
                slot += 1
            if tags:
                tokens[slot:slot + len(tags)] = tags
                kinds[slot:slot + len(tags)] = KIND_TAG
                slot += len(tags)

            body = slice(slot, slot + take)
            tokens[body] = doc_arr[:take]
            kinds[body] = KIND_DOC
            # Next-token targets inside the document; the cut case peeks at the next token.
            n_targets = min(take, len(doc_arr) - 1)
            labels[slot:slot + n_targets] = doc_arr[1:n_targets + 1]
            loss_mask[slot:slot + n_targets] = 1.0
            slot += take

            document_ids[start:slot] = i
            if domain_ids is not None:
                doc_domains[start:slot] = domain_ids[i]
            consumed.append((i, take))

            if variant.segment_per_document:
                end = start + _round_up(slot - start, cp_multiple(self.cp_size))
                if variant.reset_positions:
                    position_ids[start:end] = np.arange(end - start)
                slot = end
                boundaries.append(end)
            if take < len(doc) or slot == S:
                break

        if not variant.segment_per_document:
            boundaries.append(S)
        elif boundaries[-1] != S:  # documents ran out, or the rest is too small: one pad segment
            if variant.reset_positions:
                position_ids[boundaries[-1]:] = np.arange(S - boundaries[-1])
            boundaries.append(S)

        _label_prefix_and_boundaries(tokens, labels, loss_mask, kinds, variant)
        if self.interleave_chunks:
            _interleave_positions(position_ids, kinds, boundaries, self.interleave_chunks)
        cu_seqlens = torch.tensor(boundaries, dtype=torch.int32)
        return PackedBatch(
            tokens=torch.from_numpy(tokens),
            labels=torch.from_numpy(labels),
            loss_mask=torch.from_numpy(loss_mask),
            position_ids=torch.from_numpy(position_ids),
            document_ids=torch.from_numpy(document_ids),
            domain_ids=torch.from_numpy(doc_domains),
            token_kinds=torch.from_numpy(kinds),
            cu_seqlens=cu_seqlens,
            max_seqlen=int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
            variant=variant,
            seq_length=S,
            cp_size=self.cp_size,
            consumed=consumed,
        )


def _check_documents(documents, domain_tags, domain_ids) -> None:
    if len(documents) == 0:
        raise LayoutError("pack_documents got an empty document list: pass at least one document")
    for i, doc in enumerate(documents):
        if len(doc) == 0:
            raise LayoutError(f"document {i} is empty: drop empty documents before packing")
    for name, per_doc in (("domain_tags", domain_tags), ("domain_ids", domain_ids)):
        if per_doc is not None and len(per_doc) != len(documents):
            raise LayoutError(
                f"{name} has {len(per_doc)} entries for {len(documents)} documents: "
                "give exactly one per document"
            )


def pack_documents(
    documents: Sequence[Sequence[int]],
    seq_length: int,
    variant,
    anchor_token_id: Optional[int] = None,
    domain_tags: Optional[Sequence[Sequence[int]]] = None,
    cp_size: int = 1,
    pad_token_id: int = 0,
    domain_ids: Optional[Sequence[int]] = None,
    interleave_chunks: int = 0,
) -> PackedBatch:
    """One window in one call: `WindowLayout(...).pack(documents, domain_tags, domain_ids)`.

    Callers that pack many windows of one layout (the window dataset) build the
    `WindowLayout` once and call its `pack`.
    """
    window = WindowLayout(seq_length, variant, anchor_token_id=anchor_token_id,
                          pad_token_id=pad_token_id, cp_size=cp_size,
                          interleave_chunks=interleave_chunks)
    return window.pack(documents, domain_tags, domain_ids)


def _label_prefix_and_boundaries(tokens, labels, loss_mask, kinds, variant: Variant):
    """Targets of anchor and tag slots, and of the last token of each finished document.

    Anchors and tags predict the next slot of their own segment, unless that is a tag
    (tags are never targets). Only the first anchor copy (slot 0) is trained. In `full`
    a finished document's last token may predict the next document's first token, which
    it can see; in the document-masked variants that target is invisible and stays masked.
    """
    nxt_kind = np.append(kinds[1:], KIND_PAD)
    nxt_token = np.append(tokens[1:], 0)
    prefix = (kinds == KIND_ANCHOR) | (kinds == KIND_TAG)
    predicts_doc = prefix & (nxt_kind == KIND_DOC)
    labels[prefix] = nxt_token[prefix]
    loss_mask[prefix] = predicts_doc[prefix].astype(np.float32)
    later_anchor = kinds == KIND_ANCHOR
    later_anchor[0] = False
    loss_mask[later_anchor] = 0.0
    if not variant.segment_per_document:
        untrained_doc_end = (kinds == KIND_DOC) & (loss_mask == 0) & (nxt_kind == KIND_DOC)
        labels[untrained_doc_end] = nxt_token[untrained_doc_end]
        loss_mask[untrained_doc_end] = 1.0


def _interleave_positions(position_ids, kinds, boundaries, num_chunks):
    """Give each document's chunks the window offsets they would have if interleaved.

    Attention within a document depends only on the causal order of its tokens and their
    positions, so an interleaved window equals one where each document stays a contiguous
    THD segment (its chunks in order, mutually visible) and only the position ids follow
    the interleaved order. Labels and masks are unchanged: targets stay within documents.
    """
    chunks = []  # per segment: list of slot arrays, in chunk order
    for start, end in zip(boundaries[:-1], boundaries[1:]):
        body = np.nonzero((kinds[start:end] == KIND_DOC) | (kinds[start:end] == KIND_TAG))[0]
        body = body + start
        pieces = min(num_chunks, len(body))
        cuts = [len(body) * k // pieces for k in range(pieces + 1)] if pieces else [0]
        chunks.append([body[cuts[k]:cuts[k + 1]] for k in range(len(cuts) - 1)])
    order = [seg[k] for k in range(num_chunks) for seg in chunks if k < len(seg)]
    if not order:
        return
    slots = np.concatenate(order)
    position_ids[slots] = np.sort(position_ids[slots])


# ----------------------------------------------------------------------------------------
# Context parallelism (Transformer Engine's THD convention)
# ----------------------------------------------------------------------------------------

def check_cp_divisibility(cu_seqlens: torch.Tensor, cp_size: int) -> None:
    """Refuse THD+CP segments TE would silently mis-compute (length % 2*cp != 0)."""
    if cp_size <= 1:
        return
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    bad = [(i, n) for i, n in enumerate(lengths) if n % (2 * cp_size)]
    if bad:
        i, n = bad[0]
        raise LayoutError(
            f"context parallel size {cp_size} needs every THD segment padded to a multiple of "
            f"{2 * cp_size}, but segment {i} has length {n} ({len(bad)} bad segment(s)); "
            f"pack with pack_documents(..., cp_size={cp_size})"
        )


def cp_chunk_ranges(length: int, cp_size: int, cp_rank: int) -> tuple:
    """In-segment [start, end) ranges a CP rank holds of a segment of `length`, in order.

    The segment is cut into 2*cp equal chunks and rank r holds chunks r and 2*cp-1-r, so
    every rank gets one early and one late chunk and causal work is balanced (Transformer
    Engine's `thd_get_partitioned_indices`). Without CP the one range is the whole segment.
    The one statement of the rule: the layout, the `local` and the `varlen` backends use it.
    """
    if cp_size == 1:
        return ((0, length),)
    chunk = length // (2 * cp_size)
    return tuple((c * chunk, (c + 1) * chunk) for c in (cp_rank, 2 * cp_size - 1 - cp_rank))


def cp_partition_indices(cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Token indices rank `cp_rank` holds: chunks r and 2*cp-1-r of every segment.

    Same convention as Transformer Engine's `thd_get_partitioned_indices`.
    """
    if not 0 <= cp_rank < cp_size:
        raise LayoutError(f"cp_rank {cp_rank} out of range for cp_size {cp_size}")
    check_cp_divisibility(cu_seqlens, cp_size)
    bounds = cu_seqlens.to(torch.int64).tolist()
    if cp_size == 1:
        return torch.arange(bounds[-1], dtype=torch.int64)
    pieces = [torch.arange(start + a, start + b)
              for start, end in zip(bounds[:-1], bounds[1:])
              for a, b in cp_chunk_ranges(end - start, cp_size, cp_rank)]
    return torch.cat(pieces)


def shard_for_cp(batch: PackedBatch, cp_size: int, cp_rank: int) -> PackedBatch:
    """Rank `cp_rank`'s share of a packed batch; cu_seqlens/max_seqlen stay global."""
    if cp_size == 1:
        return batch
    index = cp_partition_indices(batch.cu_seqlens, cp_size, cp_rank).to(batch.tokens.device)
    sharded = {n: getattr(batch, n).index_select(0, index) for n in PackedBatch.PER_SLOT}
    return dataclasses.replace(batch, cp_size=cp_size, cp_rank=cp_rank, **sharded)


def unshard_cp(local_pieces: Sequence[torch.Tensor], cu_seqlens: torch.Tensor,
               cp_size: int) -> torch.Tensor:
    """Reassemble per-rank tensors (token axis first) into the original window order."""
    total = int(cu_seqlens[-1])
    out = local_pieces[0].new_empty((total,) + tuple(local_pieces[0].shape[1:]))
    for rank, piece in enumerate(local_pieces):
        index = cp_partition_indices(cu_seqlens, cp_size, rank).to(piece.device)
        out.index_copy_(0, index, piece)
    return out


def collate(batches: Sequence[PackedBatch]) -> PackedBatch:
    """Concatenate windows into one THD micro-batch (one token axis, shifted cu_seqlens).

    Windows of one length keep it as the batch's `seq_length` (training micro-batches);
    windows of different lengths (evaluation prompts, one window each) get their total.
    """
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    for b in batches[1:]:
        if (b.variant, b.cp_size, b.cp_rank) != (first.variant, first.cp_size, first.cp_rank):
            raise LayoutError("collate needs windows of one variant and CP share")
    lengths = {b.seq_length for b in batches}
    offsets, cu = 0, [first.cu_seqlens[:1]]
    for b in batches:
        cu.append(b.cu_seqlens[1:] + offsets)
        offsets += int(b.cu_seqlens[-1])
    joined = {n: torch.cat([getattr(b, n) for b in batches]) for n in PackedBatch.PER_SLOT}
    return dataclasses.replace(
        first,
        cu_seqlens=torch.cat(cu).to(torch.int32),
        max_seqlen=max(b.max_seqlen for b in batches),
        seq_length=first.seq_length if len(lengths) == 1 else sum(b.seq_length for b in batches),
        num_windows=sum(b.num_windows for b in batches),
        consumed=[c for b in batches for c in b.consumed],
        **joined,
    )


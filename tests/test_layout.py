"""The packed-window contract: layout, positions and loss-mask rules of docs/design.md §2 and §3."""

import random

import pytest
import torch

from megatron_anchor.layout import (
    KIND_ANCHOR, KIND_DOC, KIND_PAD, KIND_TAG, VARIANTS, check_cp_divisibility, collate,
    cp_partition_indices, pack_documents, shard_for_cp, unshard_cp,
)

A = 1  # anchor token id used throughout


def segments(batch):
    bounds = batch.cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def check_invariants(batch, documents):
    """Rules every packed window must satisfy, whatever the variant."""
    S = batch.seq_length
    assert all(getattr(batch, n).shape == (S,) for n in batch.PER_SLOT)
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens[0] == 0 and batch.cu_seqlens[-1] == S
    assert batch.max_seqlen == int(batch.segment_lengths.max())
    m = 2 * batch.cp_size if batch.cp_size > 1 else 1
    assert all((e - s) % m == 0 for s, e in segments(batch))
    kinds, mask = batch.token_kinds, batch.loss_mask
    assert not mask[kinds == KIND_PAD].any(), "padding is never trained"
    # tags are never targets: no trained slot is followed by a tag it predicts
    nxt = torch.cat([kinds[1:], torch.tensor([KIND_PAD], dtype=kinds.dtype)])
    assert not mask[nxt == KIND_TAG].any()
    # a trained slot's label is the next token of its own document
    for slot in torch.nonzero(mask).flatten().tolist():
        d = int(batch.document_ids[slot])
        assert d >= 0
        if kinds[slot] == KIND_DOC:
            assert slot + 1 == S or batch.document_ids[slot + 1] in (d, -1) or batch.variant == "full"
    # the tokens placed are exactly the consumed prefixes of the documents
    for d, n in batch.consumed:
        placed = batch.tokens[(batch.document_ids == d) & (kinds == KIND_DOC)].tolist()
        assert placed == list(documents[d][:n])


def test_anchor_layout_by_hand():
    docs = [[11, 12, 13], [21, 22], [31, 32, 33, 34, 35, 36]]
    b = pack_documents(docs, 12, "anchor", anchor_token_id=A)
    assert b.cu_seqlens.tolist() == [0, 4, 7, 12]
    assert b.tokens.tolist() == [A, 11, 12, 13, A, 21, 22, A, 31, 32, 33, 34]
    assert b.position_ids.tolist() == [0, 1, 2, 3, 0, 5, 6, 0, 8, 9, 10, 11]
    # first anchor trained (predicts 11); later copies and document ends masked;
    # the cut document's last slot predicts its next token (35)
    assert b.loss_mask.tolist() == [1, 1, 1, 0, 0, 1, 0, 0, 1, 1, 1, 1]
    assert b.labels.tolist()[:3] == [11, 12, 13] and b.labels[11] == 35
    assert b.consumed == [(0, 3), (1, 2), (2, 4)]


def test_full_and_intra_doc_by_hand():
    docs = [[11, 12, 13], [21, 22]]
    full = pack_documents(docs, 6, "full")
    assert full.cu_seqlens.tolist() == [0, 6]
    assert full.position_ids.tolist() == list(range(6))
    # in full attention the next document is visible, so 13 -> 21 is trained
    assert full.loss_mask.tolist() == [1, 1, 1, 1, 0, 0]
    intra = pack_documents(docs, 6, "intra-doc")
    assert intra.cu_seqlens.tolist() == [0, 3, 5, 6]
    assert intra.loss_mask.tolist() == [1, 1, 0, 1, 0, 0]
    assert intra.position_ids.tolist() == list(range(6))
    reset = pack_documents(docs, 6, "intra-doc-reset")
    assert reset.position_ids.tolist() == [0, 1, 2, 0, 1, 0]
    assert reset.loss_mask.tolist() == intra.loss_mask.tolist()


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_token_documents(variant):
    docs = [[10 + i] for i in range(20)]
    b = pack_documents(docs, 16, variant, anchor_token_id=A)
    check_invariants(b, docs)
    if variant == "anchor":
        assert b.num_segments == 8 and b.tokens[::2].eq(A).all()
        assert b.loss_mask.tolist() == [1] + [0] * 15  # only anchor 0 -> first token
    elif variant == "full":
        assert b.loss_mask.sum() == 15
    else:
        assert b.loss_mask.sum() == 0  # one-token documents have nothing to predict


@pytest.mark.parametrize("variant", VARIANTS)
def test_document_exactly_filling_the_window(variant):
    n = 15 if variant == "anchor" else 16
    docs = [list(range(100, 100 + n)), [7, 8]]
    b = pack_documents(docs, 16, variant, anchor_token_id=A)
    check_invariants(b, docs)
    assert b.consumed == [(0, n)] and b.num_segments == 1
    # n-1 in-document targets (the end's target is in the next window), plus anchor -> first
    assert b.loss_mask.sum() == n - 1 + (variant == "anchor")


@pytest.mark.parametrize("variant", VARIANTS)
def test_document_cut_by_the_window(variant):
    docs = [list(range(100, 110)), list(range(200, 240))]
    b = pack_documents(docs, 32, variant, anchor_token_id=A)
    check_invariants(b, docs)
    d, taken = b.consumed[-1]
    assert d == 1 and taken < 40
    last = 31
    assert b.loss_mask[last] == 1 and b.labels[last] == docs[1][taken]
    # packing goes on from where this window stopped
    nxt = pack_documents([docs[1][taken:]], 32, variant, anchor_token_id=A)
    assert nxt.tokens[nxt.token_kinds == KIND_DOC][0] == docs[1][taken]


@pytest.mark.parametrize("variant", VARIANTS)
def test_single_document_shorter_than_window_pads(variant):
    docs = [[5, 6, 7, 8]]
    b = pack_documents(docs, 16, variant, anchor_token_id=A, pad_token_id=0)
    check_invariants(b, docs)
    assert (b.token_kinds == KIND_PAD).sum() == 16 - 4 - (variant == "anchor")
    assert b.document_ids[-1] == -1


@pytest.mark.parametrize("variant", VARIANTS)
def test_many_tiny_documents(variant):
    rng = random.Random(3)
    docs = [[rng.randrange(2, 50) for _ in range(rng.randint(1, 4))] for _ in range(500)]
    b = pack_documents(docs, 256, variant, anchor_token_id=A)
    check_invariants(b, docs)
    if variant != "full":
        assert b.num_segments >= 60


def test_domain_tags_precede_documents_and_are_never_targets():
    docs = [[11, 12, 13], [21, 22, 23]]
    b = pack_documents(docs, 12, "anchor", anchor_token_id=A, domain_tags=[[90, 91], [92]])
    assert b.tokens.tolist()[:9] == [A, 90, 91, 11, 12, 13, A, 92, 21]
    kinds = b.token_kinds.tolist()
    assert kinds[:4] == [KIND_ANCHOR, KIND_TAG, KIND_TAG, KIND_DOC]
    # A->90 and 90->91 masked (tag targets); 91->11 trained; copy 2 masked; 92->21 trained
    assert b.loss_mask.tolist()[:9] == [0, 0, 1, 1, 1, 0, 0, 1, 1]
    assert b.position_ids.tolist()[:9] == [0, 1, 2, 3, 4, 5, 0, 7, 8]
    check_invariants(b, docs)


@pytest.mark.parametrize("cp_size", [2, 4])
@pytest.mark.parametrize("variant", VARIANTS)
def test_context_parallel_padding_and_sharding(variant, cp_size):
    rng = random.Random(cp_size)
    docs = [[rng.randrange(2, 50) for _ in range(rng.choice([1, 3, 5, 9, 30]))] for _ in range(40)]
    S = 128
    b = pack_documents(docs, S, variant, anchor_token_id=A, cp_size=cp_size)
    check_invariants(b, docs)
    shards = [shard_for_cp(b, cp_size, r) for r in range(cp_size)]
    assert all(s.tokens.numel() == S // cp_size for s in shards)
    assert torch.equal(unshard_cp([s.tokens for s in shards], b.cu_seqlens, cp_size), b.tokens)
    assert torch.equal(unshard_cp([s.loss_mask for s in shards], b.cu_seqlens, cp_size), b.loss_mask)


def test_cp_partition_follows_te_chunk_convention():
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)  # two segments of 8, cp=2 -> chunks of 2
    assert cp_partition_indices(cu, 2, 0).tolist() == [0, 1, 6, 7, 8, 9, 14, 15]
    assert cp_partition_indices(cu, 2, 1).tolist() == [2, 3, 4, 5, 10, 11, 12, 13]


def test_cp_guard_refuses_indivisible_segments():
    with pytest.raises(ValueError, match="multiple of 4"):
        check_cp_divisibility(torch.tensor([0, 6, 12], dtype=torch.int32), 2)


def test_collate_shifts_cu_seqlens():
    a = pack_documents([[5, 6, 7]], 8, "intra-doc")
    b = pack_documents([[8, 9]], 8, "intra-doc")
    c = collate([a, b])
    assert c.cu_seqlens.tolist() == [0, 3, 8, 10, 16] and c.tokens.numel() == 16
    assert c.num_windows == 2


@pytest.mark.parametrize("kwargs,message", [
    (dict(variant="sliding"), "unknown attention variant"),
    (dict(variant="anchor"), "needs an anchor token id"),
    (dict(variant="full", cp_size=2, seq_length=10), "multiple of 2 x --context-parallel-size"),
    (dict(variant="full", documents=[]), "empty document list"),
    (dict(variant="full", documents=[[1], []]), "document 1 is empty"),
    (dict(variant="full", domain_tags=[[3]]), "one per document"),
])
def test_bad_arguments_say_what_to_change(kwargs, message):
    args = dict(documents=[[1, 2], [3]], seq_length=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        pack_documents(**args)


@pytest.mark.parametrize("chunks", [2, 3])
@pytest.mark.parametrize("variant", ["intra-doc", "anchor"])
def test_interleaved_chunks_permute_positions_keeping_chunk_order(variant, chunks):
    docs = [list(range(100, 109)), list(range(200, 206)), list(range(300, 330))]
    plain = pack_documents(docs, 40, variant, anchor_token_id=A)
    mixed = pack_documents(docs, 40, variant, anchor_token_id=A, interleave_chunks=chunks)
    # same tokens, segments and targets: only the positions follow the interleaving
    for name in ("tokens", "labels", "loss_mask", "cu_seqlens"):
        assert torch.equal(getattr(plain, name), getattr(mixed, name))
    body = (mixed.token_kinds == KIND_DOC)
    assert sorted(mixed.position_ids[body].tolist()) == sorted(plain.position_ids[body].tolist())
    for d in range(3):
        pos = mixed.position_ids[body & (mixed.document_ids == d)]
        assert bool((pos[1:] > pos[:-1]).all()), "a document's chunks keep their order"
    # chunk 0 of document 1 comes before chunk 1 of document 0
    p0 = mixed.position_ids[body & (mixed.document_ids == 0)]
    p1 = mixed.position_ids[body & (mixed.document_ids == 1)]
    assert p1[0] < p0[-1]
    assert (mixed.position_ids[mixed.token_kinds == KIND_ANCHOR] == 0).all()


def test_interleaving_is_refused_where_it_has_no_meaning():
    with pytest.raises(ValueError, match="--interleave-chunks"):
        pack_documents([[1, 2, 3]], 8, "full", interleave_chunks=2)
    with pytest.raises(ValueError, match="--interleave-chunks"):
        pack_documents([[1, 2, 3]], 8, "intra-doc", interleave_chunks=5)

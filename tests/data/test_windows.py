"""WindowDataset: deterministic, resumable packing that never drops or duplicates documents
within an epoch; blends, splits, UpSampledMix, CP padding, tags, interleaving plan."""

from typing import Optional

import numpy as np
import pytest
import torch

from tests.data.data_helpers import build_null_dataset, doc_tokens, lengths_rng
from megatron_anchor.data.indexed import DatasetError
from megatron_anchor.data.windows import (
    WindowConfig,
    WindowDataset,
    split_range,
    target_counts,
    unigram_cross_entropy,
    validation_unigram_cross_entropy,
    upsample_keep_mask,
)
from megatron_anchor.layout import KIND_DOC, WindowLayout, collate

ANCHOR = 59999


def consecutive_step_overlap(dataset: WindowDataset, global_batch_size: int,
                             num_steps: Optional[int] = None) -> float:
    """Share of consecutive training steps that hold a piece of the same document.

    Step i holds samples ``[i*G, (i+1)*G)`` (G = `global_batch_size`, the trainer's data
    position); a document is ``(source, document)``. Returns the share of the pairs
    (i, i+1), i < num_steps-1, whose document sets intersect (0.0 with fewer than 2 steps).
    """
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    available = len(dataset) // global_batch_size
    steps = available if num_steps is None else min(num_steps, available)
    previous, shared = None, 0
    for step in range(steps):
        docs = {(s, d) for i in range(step * global_batch_size, (step + 1) * global_batch_size)
                for s, d, _, _ in dataset.window_pieces(i)}
        if previous is not None and docs & previous:
            shared += 1
        previous = docs
    return shared / (steps - 1) if steps > 1 else 0.0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """60 documents of 1..299 tokens in three domains, plus a second source."""
    tmp = tmp_path_factory.mktemp("windows")
    lengths = lengths_rng(0, 60)
    domains = [("web", "code", "books")[d % 3] for d in range(60)]
    prefix = build_null_dataset(tmp, "main", lengths, domains)
    other = build_null_dataset(tmp, "other", lengths_rng(1, 40, 1, 100), ["web"] * 40)
    return {"prefix": prefix, "other": other, "lengths": lengths, "domains": domains, "tmp": tmp}


LAYOUT_FIELDS = ("seq_length", "variant", "anchor_token_id", "pad_token_id", "cp_size",
                 "interleave_chunks")


def _config(**overrides):
    base = dict(seq_length=256, variant="anchor", anchor_token_id=ANCHOR, split="100,0,0")
    base.update(overrides)
    window = WindowLayout(**{k: base.pop(k) for k in LAYOUT_FIELDS if k in base})
    return WindowConfig(layout=window, **base)


def _document_tokens_per_window(ds):
    """{(source, doc): [(first, tokens placed)]} read back from the packed tokens."""
    placed = {}
    for i in range(len(ds)):
        batch = ds[i]
        pieces = ds.window_pieces(i)
        kinds, tokens, doc_ids = batch.token_kinds, batch.tokens, batch.document_ids
        for k, (s, d, first, stop) in enumerate(pieces):
            mine = (doc_ids == k) & (kinds == KIND_DOC)
            placed.setdefault((s, d), []).append((first, tokens[mine].tolist()))
    return placed


@pytest.mark.parametrize("variant,cp_size", [("anchor", 1), ("intra-doc", 2), ("full", 1),
                                             ("anchor", 2)])
def test_one_epoch_holds_every_document_exactly_once(corpus, variant, cp_size):
    ds = WindowDataset(corpus["prefix"], _config(variant=variant, cp_size=cp_size))
    placed = _document_tokens_per_window(ds)
    assert sorted(d for _, d in placed) == list(range(60))  # none dropped, none repeated
    for (_, d), parts in placed.items():
        parts.sort()
        tokens = [t for _, chunk in parts for t in chunk]
        assert tokens == doc_tokens(d, corpus["lengths"][d])  # in order, no gap, no overlap
    total = sum(corpus["lengths"])
    assert len(ds) < total / 256 + 20  # windows are actually filled
    if cp_size > 1:
        for i in range(len(ds)):
            assert all(int(n) % (2 * cp_size) == 0 for n in ds[i].segment_lengths)


def test_packing_is_deterministic_for_a_seed(corpus):
    a = WindowDataset(corpus["prefix"], _config(seed=3))
    b = WindowDataset(corpus["prefix"], _config(seed=3))
    c = WindowDataset(corpus["prefix"], _config(seed=4))
    assert len(a) == len(b)
    for i in range(len(a)):
        assert torch.equal(a[i].tokens, b[i].tokens)
        assert torch.equal(a[i].loss_mask, b[i].loss_mask)
    assert not torch.equal(a[0].tokens, c[0].tokens)


def test_resume_from_any_sample_index(corpus):
    sequential = WindowDataset(corpus["prefix"], _config(num_samples=40))
    expected = [sequential[i].tokens for i in range(len(sequential))]
    resumed = WindowDataset(corpus["prefix"], _config(num_samples=40))  # fresh, as after restart
    for i in [37, 5, 22, 0, 39]:  # random access, no earlier window read first
        assert torch.equal(resumed[i].tokens, expected[i])


def test_samples_are_shuffled_within_each_epoch(corpus):
    """Megatron's shuffle_index on top of the document shuffle: epoch e's windows are served,
    permuted, before any window of epoch e+1; a partly used epoch is packed whole."""
    k = len(WindowDataset(corpus["prefix"], _config()))  # windows of one epoch
    ds = WindowDataset(corpus["prefix"], _config(num_samples=2 * k + k // 2))
    assert len(ds) == 2 * k + k // 2
    blocks = ds.blocks  # the epoch each packed window starts in
    assert list(blocks[:k]) == [0] * k and blocks[-1] == 2 and np.all(np.diff(blocks) >= 0)
    assert ds.num_windows == len(blocks) > len(ds)  # the third epoch is packed whole
    served = blocks[ds.order]
    assert np.all(np.diff(served) >= 0)  # epoch by epoch
    for epoch in (0, 1):  # each full epoch: all its windows, permuted
        assert sorted(ds.order[served == epoch]) == list(np.flatnonzero(blocks == epoch))
    assert list(ds.order[:k]) != list(range(k))  # actually shuffled
    plain = WindowDataset(corpus["prefix"], _config(num_samples=2 * k, shuffle_samples=False))
    assert list(plain.order) == list(range(2 * k))
    for i in range(2 * k):  # the same windows, only served in another order
        assert torch.equal(ds[i].tokens, plain[int(ds.order[i])].tokens)


def test_sample_order_does_not_depend_on_the_run_length(corpus):
    short = WindowDataset(corpus["prefix"], _config(num_samples=10))
    long_ = WindowDataset(corpus["prefix"], _config(num_samples=3 * len(short.order) + 50))
    for i in range(10):
        assert torch.equal(short[i].tokens, long_[i].tokens)
        assert short.window_pieces(i) == long_.window_pieces(i)


def test_sample_shuffle_separates_consecutive_steps_of_long_documents(tmp_path):
    prefix = build_null_dataset(tmp_path, "long", [1500] * 40 + [40] * 20)
    plain = WindowDataset(prefix, _config(shuffle_samples=False))
    mixed = WindowDataset(prefix, _config())
    before = consecutive_step_overlap(plain, 2)
    after = consecutive_step_overlap(mixed, 2)
    assert before > 0.8 and after < 0.25, (before, after)


def test_consecutive_step_overlap_hand_count():
    class Steps:  # one window per step: a, a, b, (c b), d, e
        windows = [["a"], ["a"], ["b"], ["c", "b"], ["d"], ["e"]]

        def __len__(self):
            return len(self.windows)

        def window_pieces(self, i):
            return [(0, doc, 0, 1) for doc in self.windows[i]]

    assert consecutive_step_overlap(Steps(), 1) == pytest.approx(2 / 5)
    assert consecutive_step_overlap(Steps(), 2) == 0.0  # {a} {b, c} {d, e}
    assert consecutive_step_overlap(Steps(), 3) == 1.0  # {a, b} {b, c, d, e}
    assert consecutive_step_overlap(Steps(), 1, num_steps=2) == 1.0
    assert consecutive_step_overlap(Steps(), 6) == 0.0


def test_unigram_cross_entropy_hand_count():
    from types import SimpleNamespace

    windows = [SimpleNamespace(labels=torch.tensor([1, 1, 2, 3]),
                               loss_mask=torch.tensor([1.0, 1.0, 1.0, 0.0])),
               SimpleNamespace(labels=torch.tensor([2, 5]), loss_mask=torch.tensor([1.0, 0.0]))]
    # targets 1, 1, 2, 2 (3 and 5 are masked)
    assert target_counts(windows).tolist() == [0, 2, 2]
    assert target_counts(windows, vocab_size=6).tolist() == [0, 2, 2, 0, 0, 0]
    assert target_counts(windows, max_tokens=2).tolist() == [0, 2, 1]  # stops after window 0
    # reference counts [0, 2, 1, 0] + add-one over 4 tokens: q = [1, 3, 2, 1] / 7
    ce = unigram_cross_entropy(np.array([0, 2, 2]), np.array([0, 2, 1]), vocab_size=4)
    assert ce == pytest.approx(-(2 * np.log(3 / 7) + 2 * np.log(2 / 7)) / 4)
    # the targets' own distribution with a huge reference: its entropy, ln 2
    assert unigram_cross_entropy(np.array([0, 2, 2]), np.array([0, 10**9, 10**9]), 3) \
        == pytest.approx(np.log(2), abs=1e-6)


def test_validation_unigram_cross_entropy(corpus):
    train = WindowDataset(corpus["prefix"], _config(split="80,20,0"))
    valid = WindowDataset(corpus["prefix"], _config(split="80,20,0", split_name="valid"))
    ce = validation_unigram_cross_entropy(train, valid, vocab_size=60000)
    # The synthetic documents share no token ids across documents: every validation target
    # is unseen in training, so its probability is 1 / (train targets + vocabulary).
    n_train = int(target_counts(train).sum())
    assert ce == pytest.approx(np.log(n_train + 60000))


def test_later_epochs_reshuffle_and_repeat_each_document_once(corpus):
    one = WindowDataset(corpus["prefix"], _config())
    ds = WindowDataset(corpus["prefix"], _config(num_samples=3 * len(one)))
    entries = ds.stream[:, 1].tolist()
    epoch1, epoch2 = entries[:60], entries[60:120]
    assert sorted(epoch1) == sorted(epoch2) == list(range(60))
    assert epoch1 != epoch2  # reshuffled


def test_blend_weights_set_token_shares(corpus):
    blend = f"1 {corpus['prefix']} 3 {corpus['other']}"
    # Samples are shuffled within blocks of one pass over the split's tokens (a blend's
    # epoch); serving whole blocks (the default length is one) serves every packed window.
    block = len(WindowDataset(blend, _config()))
    ds = WindowDataset(blend, _config(num_samples=2 * block))
    assert len(ds) == ds.num_windows == 2 * block
    tokens = np.zeros(2)
    for i in range(len(ds)):
        for s, _, first, stop in ds.window_pieces(i):
            tokens[s] += stop - first
    share = tokens[1] / tokens.sum()
    assert abs(share - 0.75) < 0.02
    # The 40 short "other" documents cycle several epochs: no repeat inside one epoch.
    other = [int(d) for s, d, _ in ds.stream if s == 1]
    for e in range(len(other) // 40):
        assert sorted(other[40 * e:40 * (e + 1)]) == list(range(40))


def test_splits_are_disjoint_and_cover_the_documents(corpus):
    docs = {}
    for name in ("train", "valid", "test"):
        ds = WindowDataset(corpus["prefix"], _config(split="80,15,5", split_name=name))
        docs[name] = {d for _, d, _ in ds.stream.tolist()}
    assert docs["train"] == set(range(0, 48)) and docs["valid"] == set(range(48, 57))
    assert docs["test"] == set(range(57, 60))
    assert split_range("969,30,1", "valid", 1000) == (969, 999)


def test_upsampled_mix_keeps_fraction_of_short_documents_per_domain(corpus):
    lengths = np.asarray(corpus["lengths"])
    ds = WindowDataset(corpus["prefix"], _config(short_doc_keep_fraction=0.25,
                                                 short_doc_threshold=100))
    kept = set(ds.stream[:, 1].tolist())
    for domain in ("web", "code", "books"):
        mine = [d for d in range(60) if corpus["domains"][d] == domain]
        short = [d for d in mine if lengths[d] < 100]
        long_ = [d for d in mine if lengths[d] >= 100]
        assert set(long_) <= kept  # long documents all stay
        assert len(kept & set(short)) == round(0.25 * len(short))


def test_upsample_keep_mask_is_exact_and_seeded():
    lengths = np.array([10, 5000, 20, 30, 40, 9000, 50, 60])
    domains = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    mask = upsample_keep_mask(lengths, domains, 0.5, 4096, np.random.default_rng(0))
    assert mask[1] and mask[5]
    assert mask[[0, 2, 3]].sum() == 2 and mask[[4, 6, 7]].sum() == 2  # round(1.5)=2 each
    with pytest.raises(DatasetError):
        upsample_keep_mask(lengths, domains, 1.5, 4096, np.random.default_rng(0))


def test_domain_tags_and_domain_ids(corpus):
    tags = {"web": [7, 7], "code": [8], "books": [9, 9, 9]}
    ds = WindowDataset(corpus["prefix"], _config(domain_tag_ids=tags))
    batch = ds[0]
    first_doc = ds.window_pieces(0)[0][1]
    name = corpus["domains"][first_doc]
    n = len(tags[name])
    assert batch.tokens[0] == ANCHOR and batch.tokens[1:1 + n].tolist() == tags[name]
    assert ds.domain_names[int(batch.domain_ids[0])] == name
    with pytest.raises(DatasetError, match="no tag"):
        WindowDataset(corpus["prefix"], _config(domain_tag_ids={"web": [1]}))


def test_torch_dataloader_with_collate(corpus):
    ds = WindowDataset(corpus["prefix"], _config())
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate, num_workers=0)
    batch = next(iter(loader))
    assert batch.tokens.shape == (512,) and batch.num_windows == 2
    assert torch.equal(batch.tokens[256:], ds[1].tokens)


def test_index_cache_is_reused(corpus, monkeypatch):
    cache = corpus["tmp"] / "cache"
    first = WindowDataset(corpus["prefix"], _config(index_cache_dir=str(cache)))
    monkeypatch.setattr(WindowDataset, "_build_index",
                        lambda self: pytest.fail("index rebuilt despite the cache"))
    second = WindowDataset(corpus["prefix"], _config(index_cache_dir=str(cache)))
    assert np.array_equal(first.starts, second.starts)
    assert np.array_equal(first.order, second.order)
    assert torch.equal(first[3].tokens, second[3].tokens)


def test_drop_last_drops_only_a_partial_final_window(corpus):
    keep = WindowDataset(corpus["prefix"], _config())
    drop = WindowDataset(corpus["prefix"], _config(drop_last=True))
    assert len(drop) == len(keep) - 1
    # The partial window is the last one packed; the sample shuffle serves it anywhere.
    partial = [i for i in range(len(keep)) if (keep[i].document_ids < 0).any()]
    assert partial == [int(np.flatnonzero(keep.order == keep.num_windows - 1)[0])]
    assert not any((drop[i].document_ids < 0).any() for i in range(len(drop)))


def test_interleaved_windows_permute_positions_only(corpus):
    plain = WindowDataset(corpus["prefix"], _config(shuffle=False))
    mixed = WindowDataset(corpus["prefix"], _config(interleave_chunks=2, shuffle=False))
    index = next(i for i in range(len(plain)) if len(plain.window_pieces(i)) >= 3)
    a, b = plain[index], mixed[index]
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.loss_mask, b.loss_mask)
    assert not torch.equal(a.position_ids, b.position_ids)
    assert sorted(a.position_ids.tolist()) == sorted(b.position_ids.tolist())


def test_bad_configuration_is_refused(corpus):
    from megatron_anchor.layout import LayoutError

    with pytest.raises(LayoutError, match="needs an anchor token id"):
        WindowDataset(corpus["prefix"], _config(anchor_token_id=None))
    with pytest.raises(DatasetError, match="data-path"):
        WindowDataset(f"x {corpus['prefix']} 1 {corpus['other']}", _config())
    with pytest.raises(DatasetError, match="weights"):
        WindowDataset(f"-1 {corpus['prefix']} 1 {corpus['other']}", _config())

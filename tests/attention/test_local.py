"""The `local` backend against the dense FP64 reference: forward, q/k/v gradients, memory."""

import random

import pytest
import torch
import torch.nn.functional as F

from megatron_anchor.attention import local
from megatron_anchor.attention.local import packed_causal_attention, plan_buckets
from megatron_anchor.attention.reference import (
    dense_reference_attention, segment_causal_visibility,
)
from megatron_anchor.layout import VARIANTS, pack_documents


def random_documents(rng, n, lengths):
    return [[rng.randrange(2, 100) for _ in range(rng.choice(lengths))] for _ in range(n)]


def compare_with_reference(cu_seqlens, heads=8, groups=2, dim=16, seed=0):
    torch.manual_seed(seed)
    T = int(cu_seqlens[-1])
    q = torch.randn(T, heads, dim, requires_grad=True)
    k = torch.randn(T, groups, dim, requires_grad=True)
    v = torch.randn(T, groups, dim, requires_grad=True)
    out = packed_causal_attention(q, k, v, cu_seqlens)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = dense_reference_attention(q64, k64, v64, segment_causal_visibility(cu_seqlens))
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_documents_match_fp64_reference(variant, seed):
    rng = random.Random(seed)
    docs = random_documents(rng, 40, [1, 2, 3, 7, 16, 33, 80, 150])
    batch = pack_documents(docs, 384, variant, anchor_token_id=1)
    compare_with_reference(batch.cu_seqlens, seed=seed)


@pytest.mark.parametrize("lengths", [
    [1] * 64,                 # one-token documents
    [64],                     # one document exactly filling the window
    [5, 59],                  # a document cut by the window (the tail segment)
    [3, 3, 3, 3, 52],         # many tiny documents before a long one
    [8, 8, 16, 32],           # CP-style padded segments (multiples of 2*cp)
])
def test_edge_case_segments(lengths):
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    compare_with_reference(cu, heads=4, groups=4)


def test_multi_head_attention_without_gqa():
    cu = torch.tensor([0, 10, 30, 31, 64], dtype=torch.int32)
    compare_with_reference(cu, heads=4, groups=4)


def test_no_tensor_spans_two_segments(monkeypatch):
    """Memory scales with Σ L_i², never S²: every SDPA call sees at most one segment's keys."""
    rng = random.Random(5)
    docs = random_documents(rng, 200, [3, 20, 60, 200])
    batch = pack_documents(docs, 2048, "anchor", anchor_token_id=1)
    shapes = []
    real_sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kw):
        shapes.append((q.shape, k.shape))
        return real_sdpa(q, k, v, **kw)

    monkeypatch.setattr(local.F, "scaled_dot_product_attention", recording_sdpa)
    T = 2048
    packed_causal_attention(torch.randn(T, 2, 8), torch.randn(T, 2, 8), torch.randn(T, 2, 8),
                            batch.cu_seqlens)
    lengths = batch.segment_lengths.tolist()
    assert all(k[2] <= max(lengths) for _, k in shapes)
    padded_cost = sum(q[0] * q[2] * k[2] for q, k in shapes)
    real_cost = sum(n * n for n in lengths)
    assert padded_cost <= local.PADDED_COST_SLACK * real_cost + 1
    assert padded_cost < 0.25 * T * T


def test_bucket_plan_covers_every_segment_once():
    lengths = [100, 1, 1, 50, 49, 48, 7, 100, 3]
    buckets = plan_buckets(lengths)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    for b in buckets:
        longest = max(lengths[i] for i in b)
        assert len(b) * longest ** 2 <= local.PADDED_COST_SLACK * sum(lengths[i] ** 2 for i in b)


def test_token_count_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="local tokens"):
        packed_causal_attention(torch.randn(10, 2, 4), torch.randn(10, 2, 4),
                                torch.randn(10, 2, 4), torch.tensor([0, 12], dtype=torch.int32))

"""The `local` backend against the dense FP64 reference: forward, q/k/v gradients, memory."""

import random

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias

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


# ---------------------------------------------------------------------------------------
# The per-batch plan, the CUDA formulation and CP bookkeeping (one process, any device)
# ---------------------------------------------------------------------------------------

CP_CASES = {
    "random": lambda cp: [n for n in (7, 13, 1, 22, 9, 31, 3, 5, 11, 40)],
    "one-token docs": lambda cp: [1] * 24,
    "lengths 64 mod 128": lambda cp: [192, 64, 320],
    "doc filling the window": lambda cp: [127],
    "doc cut by the window": lambda cp: [20, 200],
}


def cp_window(case, cp, seq_length=128):
    lengths = CP_CASES[case](cp)
    docs = [[2 + i % 50 for i in range(n)] for n in lengths]
    return pack_documents(docs, seq_length if case != "lengths 64 mod 128" else 640, "anchor",
                          anchor_token_id=1, cp_size=cp)


def assert_matches_reference(result, reference, out_tol=1e-5, grad_tol=1e-4):
    from megatron_anchor.attention.reference import relative_error

    for name, got, want, tol in zip(("out", "dq", "dk", "dv"), result, reference,
                                    (out_tol, grad_tol, grad_tol, grad_tol)):
        assert relative_error(got, want) <= tol, f"{name}: {relative_error(got, want)}"


@pytest.mark.parametrize("cuda_kernels", [False, True], ids=["cpu-masks", "cuda-no-bool-mask"])
@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("case", sorted(CP_CASES))
def test_simulated_cp_ranks_match_fp64_reference(case, cp, cuda_kernels):
    """Each rank's chunks r and 2cp-1-r against the gathered keys of their segment, for
    both formulations (the CUDA one runs on the CPU too): outputs and q/k/v gradients."""
    from megatron_anchor.attention.reference import reference_with_grads, simulated_cp

    batch = cp_window(case, cp)
    T = batch.seq_length
    g = torch.Generator().manual_seed(cp)
    q, k, v = (torch.randn(T, h, 16, generator=g) for h in (4, 2, 2))
    grad_out = torch.randn(T, 4, 16, generator=g)
    plans = [local.plan_attention(batch.cu_seqlens, cp, r, cuda_kernels=cuda_kernels)
             for r in range(cp)]

    def attend(rank, q_local, k_all, v_all):
        rows = plans[rank].k_rows
        return local.attend_planned(q_local, k_all.index_select(0, rows),
                                    v_all.index_select(0, rows), plans[rank])

    result = simulated_cp(attend, q, k, v, batch.cu_seqlens, grad_out, cp)
    assert_matches_reference(result, reference_with_grads(q, k, v, batch.cu_seqlens, grad_out))


def record_sdpa(monkeypatch):
    """Top-level SDPA calls of the backend: (attn_mask kind, is_causal, q shape, k shape)."""
    calls, depth = [], [0]
    real = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, is_causal=False, **kw):
        if depth[0] == 0:
            kind = (None if attn_mask is None else "CausalBias" if isinstance(attn_mask, CausalBias)
                    else attn_mask.dtype)
            calls.append((kind, is_causal, tuple(q.shape), tuple(k.shape)))
        depth[0] += 1
        try:
            return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(local.F, "scaled_dot_product_attention", recording)
    return calls


def test_cuda_formulation_passes_no_boolean_mask(monkeypatch):
    """torch 2.11's cuDNN backward is wrong for masked calls (pytorch#196678): the CUDA plan
    uses plain causal, a lower-right causal bias (no mask tensor) or an additive float mask."""
    calls = record_sdpa(monkeypatch)
    for case in ("random", "doc cut by the window"):
        batch = cp_window(case, 2)
        for rank in range(2):
            plan = local.plan_attention(batch.cu_seqlens, 2, rank, cuda_kernels=True)
            T = batch.seq_length // 2
            rows = plan.k_rows
            local.attend_planned(torch.randn(T, 2, 8), torch.randn(2 * T, 2, 8)[rows],
                                 torch.randn(2 * T, 2, 8)[rows], plan)
    kinds = {c[0] for c in calls}
    assert torch.bool not in kinds
    assert "CausalBias" in kinds and torch.float32 in kinds  # both masked kinds exercised
    cpu_plan = local.plan_attention(batch.cu_seqlens, 2, 0, cuda_kernels=False)
    assert {b.mask.dtype for b in cpu_plan.buckets if b.mask is not None} == {torch.bool}


def test_cp_chunks_see_their_segment_prefix_bottom_right():
    """The late chunk's causal offset: rank 0 of CP=2 holds chunks 0 and 3 of a 16-token
    segment; chunk 3 (positions 12..15) sees keys 0..15, chunk 0 (0..3) keys 0..3."""
    seqs = local.query_sequences([0, 16], cp_size=2, cp_rank=0)
    assert [(s.q_start, s.k_start, s.len_q, s.len_k) for s in seqs] == [(0, 0, 4, 4),
                                                                        (4, 0, 4, 16)]
    assert [s.offset for s in seqs] == [0, 12]


def test_plan_is_built_once_per_batch_for_all_layers(megatron_cpu, monkeypatch):
    from megatron_anchor.cpu import model_parallel_manual_seed
    from megatron_anchor.model import ModelConfig, build_model, forward_packed

    model_parallel_manual_seed(3)
    model = build_model(ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=4,
                                    num_query_groups=2, vocab_size=64))
    built = []
    real = local.plan_attention
    monkeypatch.setattr(local, "plan_attention", lambda *a, **kw: built.append(1) or real(*a, **kw))
    batch = pack_documents(random_documents(random.Random(2), 12, [1, 5, 9, 30]), 96, "anchor",
                           anchor_token_id=1)
    _, loss = forward_packed(model, batch)
    loss.sum().backward()
    assert len(built) == 1
    forward_packed(model, batch)  # a new batch object: planned again, once
    assert len(built) == 2


class HostReadError(AssertionError):
    pass


@pytest.fixture
def no_host_reads(monkeypatch):
    """Turn every Python-level read of tensor data on the host into an error."""
    def forbid(name):
        def raising(self, *args, **kwargs):
            raise HostReadError(f"Tensor.{name} in the per-layer path (a host sync on CUDA)")
        return raising

    def activate():
        for name in ("tolist", "item", "cpu", "numpy", "__int__", "__float__", "__bool__",
                     "__index__"):
            monkeypatch.setattr(torch.Tensor, name, forbid(name))
    return activate


@pytest.mark.parametrize("lengths", [[1] * 10 + [40, 30, 30], [3, 61], [64]])
def test_planned_layer_reads_nothing_on_the_host(no_host_reads, lengths):
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    T = int(cu[-1])
    plan = local.plan_attention(cu, device="cpu")
    q, k, v = (torch.randn(T, h, 8, requires_grad=True) for h in (4, 2, 2))
    no_host_reads()
    out = packed_causal_attention(q, k, v, cu, plan=plan)
    out.backward(torch.ones_like(out))
    assert q.grad is not None and k.grad is not None


def test_host_read_guard_can_fail(no_host_reads):
    """The guard above really fires on the kind of read the old per-layer path did."""
    cu = torch.tensor([0, 3, 64], dtype=torch.int32)
    no_host_reads()
    with pytest.raises(HostReadError):
        int(cu[-1])


def test_plan_made_for_another_rank_is_refused():
    plan = local.plan_attention(torch.tensor([0, 8, 16], dtype=torch.int32), 2, 1)
    with pytest.raises(ValueError, match="plan made for CP rank 1 of 2"):
        packed_causal_attention(torch.randn(8, 2, 4), torch.randn(8, 2, 4),
                                torch.randn(8, 2, 4), torch.tensor([0, 8, 16]), plan=plan)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reference_and_local_run_on_cuda():
    from megatron_anchor.attention.reference import reference_with_grads

    cu = torch.tensor([0, 1, 65, 257, 300], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(300, h, 64, device="cuda", requires_grad=True) for h in (8, 2, 2))
    out = packed_causal_attention(q, k, v, cu)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref = reference_with_grads(q, k, v, cu, grad)
    assert_matches_reference((out, q.grad, k.grad, v.grad), ref, 1e-4, 1e-3)

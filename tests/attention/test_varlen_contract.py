"""What the `varlen` backend hands to torch's varlen_attn, checked without a GPU: a dense FP64
stand-in with varlen_attn's semantics (bottom-right causal, per-sequence cu_seqlens) shows
that the arguments describe exactly the anchor window, with GQA and under (simulated and
real gloo) context parallelism, against the FP64 reference. On a GPU the real kernel runs."""

import random
from types import SimpleNamespace

import pytest
import torch

from megatron_anchor import backends
from megatron_anchor.attention import varlen
from megatron_anchor.attention.reference import (
    dense_varlen_attn, reference_with_grads, relative_error, simulated_cp,
)
from megatron_anchor.layout import cp_partition_indices, pack_documents
from megatron_anchor.model import packed_seq_params
from megatron_anchor.rope import apply_rope
from megatron_anchor.testing import run_on_ranks


class StandIn:
    """A varlen_attn of a given torch version's signature, recording each call."""

    def __init__(self, version="2.13"):
        self.calls = []
        self.version = version

    def __call__(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kw):
        self.calls.append(SimpleNamespace(query=query, key=key, value=value, cu_seq_q=cu_seq_q,
                                          cu_seq_k=cu_seq_k, max_q=max_q, max_k=max_k, **kw))
        causal = kw.pop("is_causal", None)
        if causal:
            kw["window_size"] = (-1, 0)
        return dense_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kw)

    @property
    def signature_kernel(self):
        """A function with this version's keyword-only parameters, forwarding to self."""
        if self.version == "2.13":
            def kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                       scale=None, window_size=(-1, -1), enable_gqa=False, seqused_k=None,
                       block_table=None, num_splits=None):
                return self(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                            window_size=window_size, enable_gqa=enable_gqa)
        elif self.version == "2.11":
            def kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                       scale=None, window_size=(-1, -1)):
                return self(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                            window_size=window_size)
        else:  # 2.10: causal as a flag
            def kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False,
                       return_aux=None, scale=None):
                return self(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                            is_causal=is_causal)
        return kernel


def window(lengths, seq_length=None, cp=1):
    docs = [[2 + i % 90 for i in range(n)] for n in lengths]
    multiple = 2 * cp if cp > 1 else 1
    fits_all = sum(-(-(n + 1) // multiple) * multiple for n in lengths)
    return pack_documents(docs, seq_length or fits_all, "anchor", anchor_token_id=1, cp_size=cp)


CASES = {
    "random": [7, 13, 1, 22, 9, 31, 3, 5, 11, 40, 2, 17],
    "one-token docs": [1] * 30,
    "lengths 64 mod 128": [191, 63, 319],
    "one doc filling the window": [95],
    "doc cut by the window": [30, 300],
}
SEQ = {"one doc filling the window": 96, "doc cut by the window": 128}


def qkv(T, heads=8, groups=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, h, dim, generator=g) for h in (heads, groups, groups)] + \
        [torch.randn(T, heads, dim, generator=g)]


@pytest.mark.parametrize("version", ["2.13", "2.11", "2.10"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_window_matches_fp64_reference(case, version):
    batch = window(CASES[case], SEQ.get(case))
    q, k, v, grad_out = qkv(batch.seq_length)
    kernel = StandIn(version).signature_kernel
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    plan = varlen.plan_varlen(batch.cu_seqlens)
    out = varlen.varlen_packed_attention(*leaves, plan, softmax_scale=0.3, kernel=kernel)
    out.backward(grad_out)
    ref = reference_with_grads(q, k, v, batch.cu_seqlens, grad_out, softmax_scale=0.3)
    for name, got, want in zip(("out", "dq", "dk", "dv"), [out] + [x.grad for x in leaves], ref):
        assert relative_error(got, want) < 1e-5, name


def test_kernel_arguments_describe_the_window():
    batch = window(CASES["random"], cp=1)
    q, k, v, _ = qkv(batch.seq_length, heads=8, groups=2)
    standin = StandIn("2.13")
    varlen.varlen_packed_attention(q, k, v, varlen.plan_varlen(batch.cu_seqlens),
                                   softmax_scale=0.25, kernel=standin.signature_kernel)
    (call,) = standin.calls  # one kernel call for the whole window
    assert call.query is q and call.key is k and call.value is v  # THD, untouched, GQA heads
    for cu in (call.cu_seq_q, call.cu_seq_k):
        assert cu.dtype == torch.int32 and cu.device == q.device
        assert torch.equal(cu, batch.cu_seqlens)
    assert type(call.max_q) is int and call.max_q == call.max_k == batch.max_seqlen
    assert call.window_size == (-1, 0) and call.scale == 0.25 and call.enable_gqa is True


def test_without_enable_gqa_heads_are_repeated():
    """torch 2.10-2.12's varlen_attn documents equal head counts and takes no enable_gqa."""
    batch = window([5, 9])
    q, k, v, _ = qkv(batch.seq_length, heads=6, groups=2)
    standin = StandIn("2.11")
    varlen.varlen_packed_attention(q, k, v, varlen.plan_varlen(batch.cu_seqlens),
                                   kernel=standin.signature_kernel)
    (call,) = standin.calls
    assert call.key.shape[1] == call.value.shape[1] == 6
    torch.testing.assert_close(call.key[:, 2], k[:, 0], rtol=0, atol=0)  # heads 0,0,0,1,1,1
    assert "enable_gqa" not in vars(call) and call.window_size == (-1, 0)
    StandIn("2.10").signature_kernel  # noqa: B018 (built; 2.10 is covered above)


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_simulated_cp_ranks_match_fp64_reference(case, cp):
    """Chunks r and 2cp-1-r as query sequences against their segment's key prefix."""
    batch = window(CASES[case], SEQ.get(case), cp=cp)
    q, k, v, grad_out = qkv(batch.seq_length, heads=4, groups=2, seed=cp)
    plans = [varlen.plan_varlen(batch.cu_seqlens, cp, r) for r in range(cp)]
    kernel = StandIn().signature_kernel

    def attend(rank, q_local, k_all, v_all):
        rows = plans[rank].key_rows
        return varlen.varlen_attention(q_local, k_all.index_select(0, rows),
                                       v_all.index_select(0, rows), plans[rank], kernel=kernel)

    result = simulated_cp(attend, q, k, v, batch.cu_seqlens, grad_out, cp)
    ref = reference_with_grads(q, k, v, batch.cu_seqlens, grad_out)
    for name, got, want in zip(("out", "dq", "dk", "dv"), result, ref):
        assert relative_error(got, want) < 1e-5, name


def test_cp_key_sequences_are_segment_prefixes_up_to_each_chunk():
    """Segments of 8 and 16 tokens, CP=2, rank 0: chunks of 2 and 4 tokens; the late
    chunk's keys run from its segment's start to its own end (bottom-right causal)."""
    cu = torch.tensor([0, 8, 24], dtype=torch.int32)
    plan = varlen.plan_varlen(cu, cp_size=2, cp_rank=0)
    assert plan.cu_seqlens_q.tolist() == [0, 2, 4, 8, 12]
    assert plan.cu_seqlens_k.tolist() == [0, 2, 10, 14, 30]  # 2, 8, 4, 16 keys
    assert (plan.max_q, plan.max_k) == (4, 16)
    gathered_window_rows = torch.cat([cp_partition_indices(cu, 2, r) for r in range(2)])
    window_rows = gathered_window_rows[plan.key_rows].tolist()
    assert window_rows == [0, 1] + list(range(8)) + [8, 9, 10, 11] + list(range(8, 24))


def _cp_worker(rank, world_size, batch, tensors):
    from megatron.core import parallel_state

    from megatron_anchor import runtime

    runtime.initialize(1, world_size, cpu=True, seed=1)
    try:
        group = parallel_state.get_context_parallel_group()
        q, k, v, grad_out = tensors
        rows = cp_partition_indices(batch.cu_seqlens, world_size, rank)
        leaves = [x[rows].clone().requires_grad_() for x in (q, k, v)]
        plan = varlen.plan_varlen(batch.cu_seqlens, world_size, rank)
        out = varlen.varlen_packed_attention(*leaves, plan, cp_group=group,
                                             kernel=StandIn().signature_kernel)
        out.backward(grad_out[rows])
        return rows, [out.detach()] + [x.grad for x in leaves]
    finally:
        runtime.destroy()


@pytest.mark.distributed
def test_cp_over_gloo_matches_fp64_reference():
    """The real all-gather/all-reduce of K/V (shared with `local`) around the kernel call."""
    batch = window(CASES["random"] + [50], 256, cp=2)
    tensors = qkv(batch.seq_length, heads=4, groups=2, seed=7)
    results = run_on_ranks(_cp_worker, 2, batch, tensors)
    ref = reference_with_grads(*tensors[:3], batch.cu_seqlens, tensors[3])
    full = [torch.zeros_like(r, dtype=torch.float32) for r in ref]
    for rows, (out, dq, dk, dv) in results:
        full[0][rows], full[1][rows] = out, dq
        full[2][rows], full[3][rows] = dk, dv
    for name, got, want in zip(("out", "dq", "dk", "dv"), full, ref):
        assert relative_error(got, want) < 1e-5, name


def make_module(cls, dtype=torch.bfloat16, **overrides):
    fields = dict(attention_dropout=0.0, kv_channels=16, context_parallel_size=1,
                  params_dtype=dtype)
    config = SimpleNamespace(**{**fields, **overrides})
    return cls(config, layer_number=1, rotary_base=5e5)


def test_module_rotates_at_window_positions_and_plans_once(monkeypatch):
    """Two layers' core attention: rotated q/k reach the kernel; one plan per batch."""
    from megatron_anchor.attention.core import LocalAnchorAttention

    standin = StandIn()
    monkeypatch.setattr(varlen, "varlen_kernel", lambda: standin.signature_kernel)
    built = []
    real_plan = varlen.plan_varlen
    monkeypatch.setattr(varlen, "plan_varlen", lambda *a, **kw: built.append(1) or real_plan(*a, **kw))
    rng = random.Random(0)
    batch = pack_documents([[rng.randrange(2, 99) for _ in range(rng.choice([1, 6, 20]))]
                            for _ in range(12)], 96, "anchor", anchor_token_id=1)
    params = packed_seq_params(batch)
    q, k, v, _ = qkv(96, heads=4, groups=2)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    layers = [make_module(varlen.VarlenAnchorAttention) for _ in range(2)]
    outs = [layer(q, k, v, None, packed_seq_params=params) for layer in layers]
    assert len(built) == 1 and len(standin.calls) == 2
    call = standin.calls[0]
    assert call.query.dtype == torch.bfloat16
    torch.testing.assert_close(call.query, apply_rope(q, batch.position_ids, 5e5), rtol=0, atol=0)
    torch.testing.assert_close(call.key, apply_rope(k, batch.position_ids, 5e5), rtol=0, atol=0)
    local_out = make_module(LocalAnchorAttention)(q, k, v, None, packed_seq_params=params)
    assert outs[0].shape == local_out.shape == (96, 64)
    assert relative_error(outs[0].float(), local_out.float()) < 2e-2  # BF16 outputs


def test_module_refuses_fp32_and_dropout():
    with pytest.raises(backends.BackendError, match="BF16/FP16 only.*--bf16"):
        make_module(varlen.VarlenAnchorAttention, dtype=torch.float32)
    with pytest.raises(backends.BackendError, match="no attention dropout"):
        make_module(varlen.VarlenAnchorAttention, attention_dropout=0.1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_registry_refuses_varlen_without_a_gpu(monkeypatch):
    backend = backends.get("varlen")
    with pytest.raises(backends.BackendError, match="'varlen' needs a CUDA GPU"):
        backend.core_attention()
    with pytest.raises(backends.BackendError, match="needs a GPU"):
        backends.validate("varlen", cpu=True)
    monkeypatch.setattr(varlen, "varlen_kernel", lambda: None)
    with pytest.raises(backends.BackendError, match=r"varlen_attn \(torch >= 2.10\)"):
        backend.core_attention()


@pytest.mark.gpu
@pytest.mark.skipif(varlen.varlen_unavailable_reason() is not None, reason="needs varlen_attn on a GPU")
def test_real_varlen_matches_fp64_reference_on_gpu():
    batch = window(CASES["lengths 64 mod 128"] + [1, 1, 40], cp=1).to("cuda")
    q, k, v, grad_out = (x.cuda().bfloat16() for x in qkv(batch.seq_length, 8, 2, 64))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = varlen.varlen_packed_attention(*leaves, varlen.plan_varlen(batch.cu_seqlens, device="cuda"))
    out.backward(grad_out)
    ref = reference_with_grads(q, k, v, batch.cu_seqlens, grad_out)
    for name, got, want in zip(("out", "dq", "dk", "dv"), [out] + [x.grad for x in leaves], ref):
        assert relative_error(got, want) < 2e-2, name

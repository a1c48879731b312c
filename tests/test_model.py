"""Model-level invariants of the packed layouts, on a tiny Megatron-Core GPTModel in FP32."""

import random

import pytest
import torch
from torch import nn

from megatron_anchor.attention.reference import dense_reference_attention
from megatron_anchor.cpu import model_parallel_manual_seed
from megatron_anchor.layout import (
    DOCUMENT_MASKED_VARIANTS, KIND_ANCHOR, KIND_DOC, KIND_PAD, pack_documents,
)
from megatron_anchor.model import AnchorPackedSeqParams, ModelConfig, build_model, forward_packed
from megatron_anchor.rope import apply_rope

ANCHOR = 1
CFG = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                  vocab_size=128, rotary_base=10000.0)


@pytest.fixture(scope="module")
def model(megatron_cpu):
    model_parallel_manual_seed(11)
    m = build_model(CFG)
    m.eval()
    return m


def documents(seed, n=6, lengths=(1, 4, 9, 17, 30)):
    rng = random.Random(seed)
    return [[rng.randrange(2, 128) for _ in range(rng.choice(lengths))] for _ in range(n)]


def logits_of(model, batch):
    with torch.no_grad():
        return forward_packed(model, batch)[0]


@pytest.mark.parametrize("variant", DOCUMENT_MASKED_VARIANTS + ("full",))
def test_isolation_between_documents(model, variant):
    docs = documents(0)
    changed = [list(d) for d in docs]
    changed[2] = [(t * 7 + 3) % 126 + 2 for t in changed[2]]  # same length, new tokens
    a = pack_documents(docs, 96, variant, anchor_token_id=ANCHOR)
    b = pack_documents(changed, 96, variant, anchor_token_id=ANCHOR)
    la, lb = logits_of(model, a), logits_of(model, b)
    others = (a.document_ids != 2) & (a.document_ids >= 0)
    after = others & (torch.arange(96) > torch.nonzero(a.document_ids == 2).max())
    diff = (la[others] - lb[others]).abs().max()
    if variant == "full":
        assert (la[after] - lb[after]).abs().max() > 1e-4  # full attention leaks across
    else:
        assert diff == 0.0, f"{variant}: another document's logits moved by {diff}"


class DenseAnchorAttention(nn.Module):
    """Reference core attention: one dense FP64 mask over the whole window."""

    def __init__(self, visible, rotary_base):
        super().__init__()
        self.visible, self.rotary_base = visible, rotary_base

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **_):
        pos = packed_seq_params.position_ids
        q, k = apply_rope(query, pos, self.rotary_base), apply_rope(key, pos, self.rotary_base)
        out = dense_reference_attention(q, k, value, self.visible).to(query.dtype)
        return out.reshape(out.shape[0], -1)


def single_anchor_forward(model, batch):
    """The same window with ONE shared anchor (copies removed) and a dense anchor mask."""
    keep = ~((batch.token_kinds == KIND_ANCHOR) & (torch.arange(batch.seq_length) > 0))
    tokens, pos = batch.tokens[keep], batch.position_ids[keep]
    labels, mask, docs = batch.labels[keep], batch.loss_mask[keep], batch.document_ids[keep]
    kinds = batch.token_kinds[keep]
    T = tokens.numel()
    idx = torch.arange(T)
    same_doc = (docs[:, None] == docs[None, :]) & (kinds[:, None] != KIND_PAD)
    visible = (idx[None, :] <= idx[:, None]) & (same_doc | (idx[None, :] == 0))
    visible |= torch.eye(T, dtype=torch.bool)
    layers = model.decoder.layers
    saved = [layer.self_attention.core_attention for layer in layers]
    try:
        for layer in layers:
            layer.self_attention.core_attention = DenseAnchorAttention(visible, CFG.rotary_base)
        cu = torch.tensor([0, T], dtype=torch.int32)
        params = AnchorPackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                       max_seqlen_q=T, max_seqlen_kv=T, position_ids=pos)
        logits = model(tokens[None], pos[None], None, packed_seq_params=params)[0]
    finally:
        for layer, core in zip(layers, saved):
            layer.self_attention.core_attention = core
    loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    return logits, (loss * mask).sum(), keep


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_duplicated_anchor_layout_equals_single_shared_anchor(model, seed):
    batch = pack_documents(documents(seed, n=8), 96, "anchor", anchor_token_id=ANCHOR)
    assert (batch.token_kinds == KIND_ANCHOR).sum() > 2
    model.zero_grad()
    logits, per_token = forward_packed(model, batch)
    loss = (per_token * batch.loss_mask).sum()
    loss.backward()
    thd_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    ref_logits, ref_loss, keep = single_anchor_forward(model, batch)
    ref_loss.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]

    real = batch.token_kinds[keep] != KIND_PAD  # padding is never trained; its mask differs
    torch.testing.assert_close(logits[keep][real], ref_logits[real], rtol=1e-5, atol=1e-5)
    # every anchor copy computes exactly what the shared anchor computes
    copies = batch.token_kinds == KIND_ANCHOR
    torch.testing.assert_close(logits[copies], ref_logits[:1].expand(int(copies.sum()), -1),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for g, r in zip(thd_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_reset_positions_make_logits_independent_of_offset(megatron_cpu):
    """In BF16 (where RoPE stops being exactly relative) only reset positions are offset-free.

    In FP32 a constant shift barely moves RoPE attention, so the control (`intra-doc`,
    continuous positions) is run in BF16 at a large offset, where it must move.
    """
    model_parallel_manual_seed(11)
    bf16_model = build_model(ModelConfig(**{**CFG.__dict__, "bf16": True, "rope_fp32": False}))
    bf16_model.eval()
    doc = documents(5, n=1, lengths=(20,))[0]
    for variant, invariant in (("intra-doc-reset", True), ("intra-doc", False)):
        early = pack_documents([[5, 6, 7], doc], 2048, variant)
        late = pack_documents([[5] * 1900, doc], 2048, variant)
        la = logits_of(bf16_model, early)[(early.document_ids == 1) & (early.token_kinds == KIND_DOC)]
        lb = logits_of(bf16_model, late)[(late.document_ids == 1) & (late.token_kinds == KIND_DOC)]
        diff = (la.float() - lb.float()).abs().max()
        if invariant:
            assert diff == 0.0, f"reset positions: logits moved by {diff} with the offset"
        else:
            assert diff > 0.0  # same tokens, same relative positions, yet BF16 RoPE moves them


def test_plain_packed_seq_params_are_refused(model):
    from megatron.core.packed_seq_params import PackedSeqParams

    batch = pack_documents([[3, 4, 5]], 8, "intra-doc")
    cu = batch.cu_seqlens
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=8, max_seqlen_kv=8)
    with pytest.raises(ValueError, match="per-token RoPE positions"):
        model(batch.tokens[None], batch.position_ids[None], None, packed_seq_params=params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [2 ** 25, 3 * 300])  # one chunk; chunks of 3 tokens
def test_chunked_cross_entropy_equals_megatrons(megatron_cpu, dtype, chunk_elements):
    """Loss and logit gradients as Megatron-Core's vocab_parallel_cross_entropy on an FP32
    copy (the computation it replaces), with no FP32 [T, V] tensor kept for the backward."""
    from megatron.core import tensor_parallel

    from megatron_anchor.model import vocab_parallel_cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(37, 300, generator=g)).to(dtype)
    labels = torch.randint(0, 300, (37,), generator=g)
    grad_loss = torch.rand(37, generator=g)

    ours_in = logits.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = vocab_parallel_cross_entropy(ours_in, labels, chunk_elements=chunk_elements)
    loss.backward(grad_loss)
    assert loss.dtype == torch.float32
    copies = [t for t in saved if t.dim() == 2 and t.data_ptr() != ours_in.data_ptr()]
    assert not copies  # only the logits themselves are kept

    ref_in = logits.clone().requires_grad_()
    ref = tensor_parallel.vocab_parallel_cross_entropy(ref_in.float()[:, None], labels[:, None])[:, 0]
    ref.backward(grad_loss)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-5 if dtype == torch.float32 else 1e-2,
                               atol=1e-7 if dtype == torch.float32 else 1e-3)


def test_forward_packed_keeps_model_dtype_logits_and_writes_the_gradient_over_them(megatron_cpu):
    model_parallel_manual_seed(4)
    model = build_model(ModelConfig(**{**CFG.__dict__, "bf16": True}))
    batch = pack_documents(documents(3), 64, "anchor", anchor_token_id=ANCHOR)
    logits, loss = forward_packed(model, batch)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    kept = logits.detach().clone()
    loss.sum().backward()
    torch.testing.assert_close(logits.detach(), kept, rtol=0, atol=0)  # returned: untouched
    _, loss = forward_packed(model, batch, return_logits=False)
    loss.sum().backward()  # in-place gradient: the training path


def _tp2_cross_entropy(rank, world_size, logits, labels, grad_loss):
    from megatron.core import tensor_parallel

    from megatron_anchor import runtime
    from megatron_anchor.model import vocab_parallel_cross_entropy

    runtime.initialize(world_size, 1, cpu=True, seed=1)
    try:
        half = logits.shape[1] // world_size
        shard = logits[:, rank * half:(rank + 1) * half]
        ours_in, ref_in = shard.clone().requires_grad_(), shard.clone().requires_grad_()
        ours = vocab_parallel_cross_entropy(ours_in, labels, chunk_elements=5 * half)
        ours.backward(grad_loss)
        ref = tensor_parallel.vocab_parallel_cross_entropy(ref_in[:, None], labels[:, None])[:, 0]
        ref.backward(grad_loss)
        return [float((ours - ref).abs().max()), float((ours_in.grad - ref_in.grad).abs().max())]
    finally:
        runtime.destroy()


@pytest.mark.distributed
def test_chunked_cross_entropy_equals_megatrons_at_tp2():
    from megatron_anchor.testing import run_on_ranks

    g = torch.Generator().manual_seed(1)
    logits, labels = 3 * torch.randn(23, 256, generator=g), torch.randint(0, 256, (23,), generator=g)
    for loss_diff, grad_diff in run_on_ranks(_tp2_cross_entropy, 2, logits, labels,
                                             torch.rand(23, generator=g)):
        assert loss_diff < 1e-5 and grad_diff < 1e-6

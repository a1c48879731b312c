"""What the `te` backend hands to Transformer Engine, checked without TE (contract), and
for real where TE imports (skipped elsewhere)."""

import random
from types import SimpleNamespace

import pytest
import torch

from megatron.core.transformer.enums import AttnMaskType

from megatron_anchor import backends
from megatron_anchor.attention import te as te_backend
from megatron_anchor.layout import pack_documents
from megatron_anchor.model import packed_seq_params
from megatron_anchor.rope import apply_rope


class StandInTEDotProductAttention(torch.nn.Module):
    """Records the call Megatron-Core's TEDotProductAttention would forward to TE."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout,
                 softmax_scale, k_channels, v_channels, cp_comm_type, **kwargs):
        super().__init__()
        self.config = config
        self.init_kwargs = dict(attn_mask_type=attn_mask_type, cp_comm_type=cp_comm_type)
        self.calls = []

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        self.calls.append(SimpleNamespace(query=query, key=key, value=value,
                                          attention_mask=attention_mask,
                                          attn_mask_type=attn_mask_type,
                                          packed_seq_params=packed_seq_params))
        return query.reshape(query.shape[0], -1)


def make_attention(cp_size=1, cp_comm_type="p2p"):
    cls = te_backend.te_anchor_forward_mixin(StandInTEDotProductAttention)
    config = SimpleNamespace(context_parallel_size=cp_size)
    return cls(config, layer_number=1, cp_comm_type=cp_comm_type, rotary_base=5e6)


def test_te_receives_thd_rotated_qkv_and_padded_cu_seqlens():
    rng = random.Random(0)
    docs = [[rng.randrange(2, 99) for _ in range(rng.choice([1, 5, 13]))] for _ in range(20)]
    batch = pack_documents(docs, 64, "anchor", anchor_token_id=1, cp_size=2)
    q, k, v = torch.randn(64, 8, 16), torch.randn(64, 2, 16), torch.randn(64, 2, 16)
    attn = make_attention(cp_size=2)
    attn(q, k, v, None, packed_seq_params=packed_seq_params(batch))
    (call,) = attn.calls

    assert call.attn_mask_type == AttnMaskType.padding_causal
    assert attn.init_kwargs["attn_mask_type"] == AttnMaskType.padding_causal
    assert call.attention_mask is None
    assert call.query.shape == (64, 8, 16) and call.key.shape == (64, 2, 16)  # THD: [T, h, d]
    torch.testing.assert_close(call.query, apply_rope(q, batch.position_ids, 5e6))
    torch.testing.assert_close(call.key, apply_rope(k, batch.position_ids, 5e6))
    assert call.value is v
    p = call.packed_seq_params
    assert type(p).__name__ == "PackedSeqParams"  # plain: TE gets no unknown fields
    assert p.qkv_format == "thd"
    for cu in (p.cu_seqlens_q, p.cu_seqlens_kv, p.cu_seqlens_q_padded, p.cu_seqlens_kv_padded):
        assert cu.dtype == torch.int32 and torch.equal(cu, batch.cu_seqlens)
    assert p.max_seqlen_q == p.max_seqlen_kv == batch.max_seqlen
    assert p.cp_group is None  # TE keeps the CP group Megatron gave it at construction


def test_te_refuses_cp_segments_it_would_miscompute():
    attn = make_attention(cp_size=2)
    batch = pack_documents([[5, 6, 7], [8, 9]], 8, "intra-doc")  # packed for cp_size=1
    with pytest.raises(ValueError, match="multiple of 4"):
        attn(torch.randn(8, 2, 4), torch.randn(8, 2, 4), torch.randn(8, 2, 4), None,
             packed_seq_params=packed_seq_params(batch))


def test_unknown_cp_comm_type_is_refused():
    with pytest.raises(ValueError, match="cp-comm-type"):
        make_attention(cp_size=2, cp_comm_type="ring-of-fire")


@pytest.mark.skipif(backends.transformer_engine_available(), reason="TE is installed here")
def test_selecting_te_without_te_is_a_clear_error():
    from megatron_anchor.spec import get_anchor_layer_spec

    with pytest.raises(backends.BackendError, match="Transformer Engine"):
        get_anchor_layer_spec(backends.get("te"))
    # Megatron-Core binds TEDotProductAttention to a MagicMock when TE is missing: the
    # guard must not be fooled by it.
    from megatron.core.extensions import transformer_engine as mcore_te

    assert "Mock" in type(mcore_te.TEDotProductAttention).__name__


@pytest.mark.gpu
@pytest.mark.skipif(not (backends.transformer_engine_available() and torch.cuda.is_available()),
                    reason="needs Transformer Engine and a CUDA GPU")
def test_real_te_matches_local_backend_on_gpu():
    from megatron.core import parallel_state

    from megatron_anchor import runtime
    from megatron_anchor.model import ModelConfig, build_model, forward_packed

    if not parallel_state.model_parallel_is_initialized():
        runtime.initialize(1, 1, cpu=False, seed=3)
    rng = random.Random(1)
    docs = [[rng.randrange(2, 500) for _ in range(rng.choice([1, 40, 300, 900]))] for _ in range(30)]
    batch = pack_documents(docs, 4096, "anchor", anchor_token_id=1).to("cuda")
    logits = {}
    for backend in ("local", "te"):
        runtime.manual_seed(3)
        cfg = ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=8,
                          num_query_groups=4, vocab_size=512, bf16=True,
                          attention_backend=backend)
        model = build_model(cfg).cuda()
        with torch.no_grad():
            logits[backend] = forward_packed(model, batch)[0].float()
    assert (logits["te"] - logits["local"]).abs().max() < 2.5e-2 * logits["local"].abs().max()

"""The `te` core attention: Megatron-Core's TEDotProductAttention on THD anchor windows.

Guarded by a real `import transformer_engine`: when TE is missing, Megatron-Core binds
`TEDotProductAttention` to a MagicMock, so a plain subclass would silently be a mock.

What we pass on is the contract checked in tests/attention/test_te_contract.py:
q/k/v in THD ([T, heads, head_dim]) already rotated at the window positions, mask type
`padding_causal`, and a plain `PackedSeqParams` with cu_seqlens == cu_seqlens_padded
(segments padded to a multiple of 2*cp inside cu_seqlens) and max_seqlen. Megatron-Core
forwards those to TE's `DotProductAttention`, which runs its own CP (p2p/a2a/all_gather).
"""

from __future__ import annotations

import functools

from megatron.core.transformer.enums import AttnMaskType

from megatron_anchor.attention.core import rotate_query_key
from megatron_anchor.layout import check_cp_divisibility

from megatron_anchor.attention.te_cp import CP_COMM_TYPES


def te_anchor_forward_mixin(base):
    """Build our subclass of `base` (Megatron's TEDotProductAttention, or a stand-in in tests)."""

    class TEAnchorAttention(base):
        def __init__(self, config, layer_number, attn_mask_type=AttnMaskType.padding_causal,
                     attention_type="self", attention_dropout=None, softmax_scale=None,
                     k_channels=None, v_channels=None, cp_comm_type="p2p",
                     pg_collection=None, rotary_base=10000.0, rope_fp32=True,
                     rope_scaling=None, **kwargs):
            if config.context_parallel_size > 1 and cp_comm_type not in CP_COMM_TYPES:
                raise ValueError(f"--cp-comm-type {cp_comm_type!r} is not one of "
                                 f"{', '.join(CP_COMM_TYPES)}")
            extra = {"pg_collection": pg_collection} if pg_collection is not None else {}
            super().__init__(config=config, layer_number=layer_number,
                             attn_mask_type=AttnMaskType.padding_causal,
                             attention_type=attention_type, attention_dropout=attention_dropout,
                             softmax_scale=softmax_scale, k_channels=k_channels,
                             v_channels=v_channels, cp_comm_type=cp_comm_type, **extra)
            self.rotary_base = rotary_base
            self.rope_fp32 = rope_fp32
            self.rope_scaling = rope_scaling

        def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None, **kwargs):
            query, key = rotate_query_key(query, key, packed_seq_params, self.rotary_base,
                                          self.rope_fp32, self.rope_scaling)
            check_cp_divisibility(packed_seq_params.cu_seqlens_q_padded,
                                  self.config.context_parallel_size)
            # A plain PackedSeqParams; cp_group stays None so TE keeps the CP group it was
            # built with.
            plain = packed_seq_params.as_megatron()
            return super().forward(query, key, value, None,
                                   attn_mask_type=AttnMaskType.padding_causal,
                                   attention_bias=attention_bias, packed_seq_params=plain)

    TEAnchorAttention.__qualname__ = TEAnchorAttention.__name__ = "TEAnchorAttention"
    return TEAnchorAttention


@functools.lru_cache(maxsize=None)
def te_anchor_attention_class():
    """The real class. Reached through `backends.get("te").core_attention()`, which first
    checks that Transformer Engine really imports (Megatron-Core binds a MagicMock here
    otherwise)."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    return te_anchor_forward_mixin(TEDotProductAttention)

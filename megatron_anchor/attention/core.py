"""The `local` core attention registered in Megatron-Core layer specs.

Megatron-Core's `SelfAttention` computes Q/K/V with its own parallel layers and hands them
to the spec's `core_attention`. Ours applies RoPE at the explicit per-token positions that
ride in `model.AnchorPackedSeqParams.position_ids` (the model is built with
position_embedding_type='none', so Megatron applies none of its own), then runs exact
packed causal attention over the THD segments.
"""

from __future__ import annotations

import math
from typing import Optional

from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule

from megatron_anchor.attention import BackendError
from megatron_anchor.attention.local import local_plan, packed_causal_attention
from megatron_anchor.rope import apply_rope, rope_cos_sin


def require_packed_positions(packed_seq_params, who: str):
    if packed_seq_params is None or getattr(packed_seq_params, "qkv_format", None) != "thd":
        raise ValueError(
            f"{who} runs on packed THD batches only: build them with "
            "megatron_anchor.pack_documents(...) and pass model.packed_seq_params(batch)"
        )
    position_ids = getattr(packed_seq_params, "position_ids", None)
    if position_ids is None:
        raise ValueError(
            f"{who} needs per-token RoPE positions: pass an AnchorPackedSeqParams "
            "(model.packed_seq_params(batch)), not a plain PackedSeqParams"
        )
    return position_ids


def rotate_query_key(query, key, packed_seq_params, rotary_base, rope_fp32, rope_scaling=None):
    """RoPE on q/k [T, H, D]; the FP32 tables are computed once per forward and shared."""
    position_ids = require_packed_positions(packed_seq_params, "AnchorAttention")
    cache = packed_seq_params.__dict__.setdefault("_rope_tables", {})
    key_ = (query.shape[-1], float(rotary_base), str(query.device),
            tuple(sorted((rope_scaling or {}).items())))
    if key_ not in cache:
        cache[key_] = rope_cos_sin(position_ids.to(query.device), query.shape[-1], rotary_base,
                                   rope_scaling)
    cos_sin = cache[key_]
    return (apply_rope(query, position_ids, rotary_base, rope_fp32, cos_sin),
            apply_rope(key, position_ids, rotary_base, rope_fp32, cos_sin))


class PackedCoreAttention(MegatronModule):
    """What every core attention of ours shares: Megatron-Core's constructor arguments, the
    refusals, RoPE at the window positions, the CP group. A subclass supplies `attend` (and
    its name, for the messages)."""

    backend_name = ""

    def __init__(self, config, layer_number: int, attn_mask_type=None,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None, rotary_base: float = 10000.0, rope_fp32: bool = True,
                 rope_scaling=None, **unused):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise BackendError(f"attention backend {self.backend_name!r} has no attention "
                               "dropout; set --attention-dropout 0")
        self.softmax_scale = (softmax_scale if softmax_scale is not None
                              else 1.0 / math.sqrt(config.kv_channels))
        self.rotary_base, self.rope_fp32, self.rope_scaling = rotary_base, rope_fp32, rope_scaling
        self.layer_number = layer_number
        self._cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None

    def _context_parallel_group(self):
        if self.config.context_parallel_size <= 1:
            return None
        return self._cp_group or parallel_state.get_context_parallel_group()

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **unused):
        if attention_bias is not None:
            raise ValueError("AnchorAttention does not take an attention bias")
        query, key = rotate_query_key(query, key, packed_seq_params, self.rotary_base,
                                      self.rope_fp32, self.rope_scaling)
        out = self.attend(query, key, value, packed_seq_params, self._context_parallel_group())
        return out.reshape(out.shape[0], -1)

    def attend(self, query, key, value, packed_seq_params, cp_group):
        """[T, Hq, D] causal attention within each THD segment (q/k already rotated)."""
        raise NotImplementedError


class LocalAnchorAttention(PackedCoreAttention):
    """Pure-PyTorch exact core attention for packed windows (any device, CP over any backend)."""

    backend_name = "local"

    def attend(self, query, key, value, packed_seq_params, cp_group):
        return packed_causal_attention(
            query, key, value, packed_seq_params.cu_seqlens_q, self.softmax_scale,
            cp_group=cp_group, plan=local_plan(packed_seq_params, query, cp_group))

"""Megatron-Core layer specs with AnchorAttention as the core attention.

We take Megatron-Core's own GPT layer spec (local or Transformer Engine) and swap one
submodule, `self_attention.submodules.core_attention`, for ours. Everything else (QKV and
output projections, RMSNorm, SwiGLU MLP, tensor/sequence parallelism) stays Megatron's.

Megatron-LM: ``pretrain_gpt.py --spec megatron_anchor.megatron_lm_spec anchor_layer_spec
--position-embedding-type none ...`` (see that module). Positions must reach the core
attention through our batch function (`megatron_anchor.training.megatron_lm`), hence
`--position-embedding-type none`: Megatron's own RoPE would restart at every segment and
rotate twice.
"""

from __future__ import annotations

import copy

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_anchor.attention.core import LocalAnchorAttention

ATTENTION_BACKENDS = ("local", "te")


def core_attention_spec(attention_backend: str = "local", rotary_base: float = 10000.0,
                        rope_fp32: bool = True) -> ModuleSpec:
    params = {"rotary_base": float(rotary_base), "rope_fp32": bool(rope_fp32)}
    if attention_backend == "local":
        return ModuleSpec(module=LocalAnchorAttention, params=params)
    if attention_backend == "te":
        from megatron_anchor.attention.te import te_anchor_attention_class

        return ModuleSpec(module=te_anchor_attention_class(), params=params)
    raise ValueError(f"unknown attention backend {attention_backend!r}: choose "
                     f"{' or '.join(ATTENTION_BACKENDS)}")


def get_anchor_layer_spec(attention_backend: str = "local", rotary_base: float = 10000.0,
                          rope_fp32: bool = True, qk_layernorm: bool = False) -> ModuleSpec:
    """A GPT `TransformerLayer` spec (RMSNorm) whose core attention is AnchorAttention."""
    if attention_backend == "te":
        from megatron_anchor.attention.te import require_transformer_engine

        require_transformer_engine()
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    elif attention_backend == "local":
        spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm)
    else:
        raise ValueError(f"unknown attention backend {attention_backend!r}: choose "
                         f"{' or '.join(ATTENTION_BACKENDS)}")
    spec = copy.deepcopy(spec)
    attention = spec.submodules.self_attention
    attention.params = dict(attention.params or {}, attn_mask_type=AttnMaskType.padding_causal)
    attention.submodules.core_attention = core_attention_spec(
        attention_backend, rotary_base, rope_fp32)
    return spec


def spec_from_megatron_lm_args() -> ModuleSpec:
    """The layer spec for Megatron-LM's parsed arguments (`megatron.training.get_args()`)."""
    from megatron.training import get_args

    args = get_args()
    if getattr(args, "position_embedding_type", "none") != "none":
        raise ValueError(
            "megatron_anchor.megatron_lm_spec applies RoPE itself at window positions: "
            "run pretrain_gpt.py with --position-embedding-type none (and keep --rotary-base)"
        )
    backend = "te" if getattr(args, "transformer_impl", "local") == "transformer_engine" else "local"
    return get_anchor_layer_spec(backend, rotary_base=getattr(args, "rotary_base", 10000),
                                 rope_fp32=not getattr(args, "anchor_rope_bf16", False),
                                 qk_layernorm=getattr(args, "qk_layernorm", False))

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

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_anchor import backends
from megatron_anchor.rope import check_rope_scaling


def core_attention_spec(attention_backend: str = "local", rotary_base: float = 10000.0,
                        rope_fp32: bool = True, rope_scaling=None) -> ModuleSpec:
    params = {"rotary_base": float(rotary_base), "rope_fp32": bool(rope_fp32)}
    if rope_scaling:  # Llama-3.1 frequency scaling (megatron_anchor.rope)
        params["rope_scaling"] = check_rope_scaling(rope_scaling)
    return ModuleSpec(module=backends.get(attention_backend).core_attention(), params=params)


def get_anchor_layer_spec(attention_backend: str = "local", rotary_base: float = 10000.0,
                          rope_fp32: bool = True, qk_layernorm: bool = False,
                          rope_scaling=None) -> ModuleSpec:
    """A GPT `TransformerLayer` spec (RMSNorm) whose core attention is AnchorAttention."""
    spec = backends.get(attention_backend).base_layer_spec(qk_layernorm)
    spec = copy.deepcopy(spec)
    attention = spec.submodules.self_attention
    attention.params = dict(attention.params or {}, attn_mask_type=AttnMaskType.padding_causal)
    attention.submodules.core_attention = core_attention_spec(
        attention_backend, rotary_base, rope_fp32, rope_scaling)
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
    backend = backends.from_megatron_transformer_impl(getattr(args, "transformer_impl", "local"))
    # Megatron-LM's --use-rope-scaling is Llama-3.1's rule with Megatron-Core's fixed bands.
    scaling = {"rope_type": "llama3", "factor": getattr(args, "rope_scaling_factor", 8.0),
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192} \
        if getattr(args, "use_rope_scaling", False) else None
    return get_anchor_layer_spec(backend.name, rotary_base=getattr(args, "rotary_base", 10000),
                                 rope_fp32=not getattr(args, "anchor_rope_bf16", False),
                                 qk_layernorm=getattr(args, "qk_layernorm", False),
                                 rope_scaling=scaling)

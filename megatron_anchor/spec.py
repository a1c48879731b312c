"""Megatron-Core layer specs with AnchorAttention as the core attention.

We take the backend's own Megatron-Core GPT layer spec (local or Transformer Engine) and swap
one submodule, `self_attention.submodules.core_attention`, for ours. Everything else (QKV
and output projections, RMSNorm, SwiGLU MLP, tensor/sequence parallelism) stays Megatron's.
The backend is an object of `megatron_anchor.backends` (as Megatron-Core's
`BackendSpecProvider`), resolved from its name once by the caller.

Megatron-LM's trainer gets its spec from `megatron_anchor.megatron_lm_spec` (see
`training/megatron_lm.py`).
"""

from __future__ import annotations

import copy

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_anchor.backends import AttentionBackend
from megatron_anchor.rope import check_rope_scaling


def core_attention_spec(backend: AttentionBackend, rotary_base: float = 10000.0,
                        rope_fp32: bool = True, rope_scaling=None) -> ModuleSpec:
    params = {"rotary_base": float(rotary_base), "rope_fp32": bool(rope_fp32)}
    if rope_scaling:  # Llama-3.1 frequency scaling (megatron_anchor.rope)
        params["rope_scaling"] = check_rope_scaling(rope_scaling)
    return ModuleSpec(module=backend.core_attention(), params=params)


def get_anchor_layer_spec(backend: AttentionBackend, rotary_base: float = 10000.0,
                          rope_fp32: bool = True, qk_layernorm: bool = False,
                          rope_scaling=None) -> ModuleSpec:
    """A GPT `TransformerLayer` spec (RMSNorm) whose core attention is AnchorAttention."""
    spec = copy.deepcopy(backend.base_layer_spec(qk_layernorm))
    attention = spec.submodules.self_attention
    attention.params = dict(attention.params or {}, attn_mask_type=AttnMaskType.padding_causal)
    attention.submodules.core_attention = core_attention_spec(
        backend, rotary_base, rope_fp32, rope_scaling)
    return spec

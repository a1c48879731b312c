"""Names and layouts between Hugging Face Llama-family tensors and our Megatron GPTModel (TP=1).

Megatron-Core's layout, from `SelfAttention.get_query_key_value_tensors` and `MLP`:

* `linear_qkv.weight` is [G * (H/G + 2) * D, d]: for each query group g, the rows of its H/G
  query heads, then its key head, then its value head. The QKV bias (Qwen) is grouped the
  same way. HF safetensors already hold q/k in the rotate-half RoPE layout Megatron uses, so
  no row permutation is needed (only GGUF / Meta `consolidated.pth` files are permuted).
* `mlp.linear_fc1.weight` is cat[gate, up] ([2F, d]); SwiGLU = silu(gate) * up.
* Norms: `input_layernorm`, `pre_mlp_layernorm`, `decoder.final_layernorm` (local spec); a TE
  spec fuses them into `linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight`.
* `embedding.word_embeddings.weight` and `output_layer.weight` have
  `ModelConfig.padded_vocab_size` rows (zero padding on import, sliced off on export); with
  tied embeddings there is no `output_layer.weight`.

One rule lives here for every importer (this one and the SmolLM2 GGUF path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
             num_groups: int) -> torch.Tensor:
    """Per query group [its q heads, k, v]; works on weights [out, in] and biases [out]."""
    G = num_groups
    rest = q.shape[1:]
    return torch.cat([q.reshape(G, -1, *rest), k.reshape(G, -1, *rest),
                      v.reshape(G, -1, *rest)], dim=1).reshape(-1, *rest)


def split_qkv(fused: torch.Tensor, num_heads: int, num_groups: int, head_dim: int):
    """Inverse of `fuse_qkv`: (q, k, v) with HF's row order."""
    G, D = num_groups, head_dim
    per_group = num_heads // G * D
    rest = fused.shape[1:]
    grouped = fused.reshape(G, per_group + 2 * D, *rest)
    q, k, v = grouped.split([per_group, D, D], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    if weight.shape[0] == rows:
        return weight
    if weight.shape[0] > rows:
        raise ValueError(f"{weight.shape[0]} rows do not fit in {rows}")
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])])


def norm_key(state_keys, layer: int, which: str) -> str:
    """Local spec: separate norm modules; TE spec: norm fused into the next linear."""
    p = f"decoder.layers.{layer}."
    separate = p + ("input_layernorm.weight" if which == "attn" else "pre_mlp_layernorm.weight")
    fused = p + ("self_attention.linear_qkv.layer_norm_weight" if which == "attn"
                 else "mlp.linear_fc1.layer_norm_weight")
    return separate if separate in state_keys else fused


# A rule: Megatron key <- function of the named HF tensors (import), and the inverse (export).
@dataclass
class Rule:
    megatron: str
    hf: Tuple[str, ...]
    to_megatron: Callable  # (*hf tensors) -> megatron tensor
    to_hf: Callable        # megatron tensor -> tuple of hf tensors


def rules(model_config, state_keys) -> List[Rule]:
    """Every tensor of the model, in HF order (embedding, layers, final norm, head)."""
    m = model_config
    H, G = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    D, V, P = m.hidden_size // H, m.vocab_size, m.padded_vocab_size
    keys = set(state_keys)

    def one(x):
        return x

    def as_tuple(x):
        return (x,)

    def qkv_in(q, k, v):
        return fuse_qkv(q, k, v, H, G)

    def qkv_out(fused):
        return split_qkv(fused, H, G, D)

    def fc1_in(gate, up):
        return torch.cat([gate, up])

    def fc1_out(fused):
        return tuple(fused.chunk(2, dim=0))

    def vocab_in(w):
        if w.shape[0] != V:
            raise ValueError(f"{w.shape[0]} vocabulary rows, config.json says vocab_size {V}")
        return pad_rows(w, P)

    def vocab_out(w):
        return (w[:V],)

    out = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                vocab_in, vocab_out)]
    for i in range(m.num_layers):
        p, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        a = h + "self_attn."
        out += [
            Rule(norm_key(keys, i, "attn"), (h + "input_layernorm.weight",), one, as_tuple),
            Rule(p + "self_attention.linear_qkv.weight",
                 (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
                 qkv_in, qkv_out),
        ]
        if m.add_qkv_bias:
            out.append(Rule(p + "self_attention.linear_qkv.bias",
                            (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
                            qkv_in, qkv_out))
        out += [
            Rule(p + "self_attention.linear_proj.weight", (a + "o_proj.weight",), one, as_tuple),
            Rule(norm_key(keys, i, "mlp"), (h + "post_attention_layernorm.weight",), one,
                 as_tuple),
            Rule(p + "mlp.linear_fc1.weight",
                 (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), fc1_in, fc1_out),
            Rule(p + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), one, as_tuple),
        ]
    out.append(Rule("decoder.final_layernorm.weight", ("model.norm.weight",), one, as_tuple))
    if not m.share_embeddings_and_output_weights:
        out.append(Rule("output_layer.weight", ("lm_head.weight",), vocab_in, vocab_out))
    return out


# HF tensors that carry nothing (recomputed buffers in old checkpoints).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_shapes(model_config) -> Dict[str, Tuple[int, ...]]:
    """Shape of every HF tensor an export writes (used to plan the shards)."""
    m = model_config
    H, G = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    d, D, F, V = m.hidden_size, m.hidden_size // H, m.ffn_size, m.vocab_size
    shapes = {"model.embed_tokens.weight": (V, d)}
    for i in range(m.num_layers):
        h = f"model.layers.{i}."
        a = h + "self_attn."
        shapes.update({
            h + "input_layernorm.weight": (d,),
            a + "q_proj.weight": (H * D, d), a + "k_proj.weight": (G * D, d),
            a + "v_proj.weight": (G * D, d),
        })
        if m.add_qkv_bias:
            shapes.update({a + "q_proj.bias": (H * D,), a + "k_proj.bias": (G * D,),
                           a + "v_proj.bias": (G * D,)})
        shapes.update({
            a + "o_proj.weight": (d, H * D),
            h + "post_attention_layernorm.weight": (d,),
            h + "mlp.gate_proj.weight": (F, d), h + "mlp.up_proj.weight": (F, d),
            h + "mlp.down_proj.weight": (d, F),
        })
    shapes["model.norm.weight"] = (d,)
    if not m.share_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (V, d)
    return shapes

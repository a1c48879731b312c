"""Weights between the reference Llama (one tensor per projection) and our Megatron GPTModel.

Megatron-Core's layout (TP=1), from `SelfAttention.get_query_key_value_tensors` and `MLP`:

* `linear_qkv.weight` is [G * (H/G + 2) * D, d]: for each query group g, the rows of its H/G
  query heads, then its key head, then its value head ("q1 q2 q3 k1 v1 | q4 ... ").
* `mlp.linear_fc1.weight` is [gate; up] stacked ([2F, d]); SwiGLU = silu(gate) * up.
* Norms: `input_layernorm`, `pre_mlp_layernorm`, `decoder.final_layernorm` (local spec; a TE
  spec fuses them into `linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight`, which
  `_norm_key` handles).
* `embedding.word_embeddings.weight` and (untied models only) `output_layer.weight`,
  padded to `ModelConfig.padded_vocab_size` rows; tied models (SmolLM2) have no output layer.
"""

from __future__ import annotations

import json
import os
import sysconfig
import time
from pathlib import Path
from typing import Optional

import torch

from megatron_anchor import checkpoint, runtime
from megatron_anchor.convert import mapping
from megatron_anchor.convert.reference_llama import LlamaConfig, ReferenceLlama
from megatron_anchor.layout import pack_documents
from megatron_anchor.model import ModelConfig, build_model, forward_packed


def model_config_for(cfg: LlamaConfig, rope_fp32: bool = True, bf16: bool = False):
    return ModelConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size, vocab_size=cfg.vocab_size,
        rotary_base=cfg.rotary_base, norm_epsilon=cfg.norm_epsilon, rope_fp32=rope_fp32,
        bf16=bf16, attention_backend="local",
        share_embeddings_and_output_weights=cfg.tied_embeddings,
    )


def llama_config_from_model_config(mcfg) -> LlamaConfig:
    return LlamaConfig(
        num_layers=mcfg.num_layers, hidden_size=mcfg.hidden_size,
        ffn_hidden_size=mcfg.ffn_size, num_attention_heads=mcfg.num_attention_heads,
        num_query_groups=mcfg.num_query_groups or mcfg.num_attention_heads,
        vocab_size=mcfg.vocab_size, rotary_base=mcfg.rotary_base,
        norm_epsilon=mcfg.norm_epsilon,
        tied_embeddings=mcfg.share_embeddings_and_output_weights,
    )


# ---------------------------------------------------------------------------------------
# Name and layout mapping
# ---------------------------------------------------------------------------------------

# The layout rules live once, in megatron_anchor.convert.mapping (shared with the HF importer).

def fuse_qkv(wq, wk, wv, cfg: LlamaConfig) -> torch.Tensor:
    """Per query group [its q heads, k, v] rows, as Megatron-Core splits `linear_qkv`."""
    return mapping.fuse_qkv(wq, wk, wv, cfg.num_attention_heads, cfg.num_query_groups)


def split_qkv(fused, cfg: LlamaConfig):
    return mapping.split_qkv(fused, cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim)


_pad_rows, _norm_key = mapping.pad_rows, mapping.norm_key


def megatron_state_from_reference(weights: dict, cfg: LlamaConfig, state_keys,
                                  padded_vocab_size: int) -> dict:
    state = {
        "embedding.word_embeddings.weight": _pad_rows(weights["embedding"], padded_vocab_size),
        "output_layer.weight": _pad_rows(weights["output"], padded_vocab_size),
        "decoder.final_layernorm.weight": weights["final_norm"],
    }
    for i in range(cfg.num_layers):
        w = {name: weights[f"layers.{i}.{name}"] for name in
             ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")}
        p = f"decoder.layers.{i}."
        state[_norm_key(state_keys, i, "attn")] = w["attn_norm"]
        state[_norm_key(state_keys, i, "mlp")] = w["ffn_norm"]
        state[p + "self_attention.linear_qkv.weight"] = fuse_qkv(w["wq"], w["wk"], w["wv"], cfg)
        state[p + "self_attention.linear_proj.weight"] = w["wo"]
        state[p + "mlp.linear_fc1.weight"] = torch.cat([w["w_gate"], w["w_up"]])
        state[p + "mlp.linear_fc2.weight"] = w["w_down"]
    if "output_layer.weight" not in state_keys:  # tied: the head reads the embedding
        del state["output_layer.weight"]
    return state


def reference_weights_from_megatron(state: dict, cfg: LlamaConfig) -> dict:
    """Inverse of `megatron_state_from_reference` (drops vocab padding rows), FP32."""
    V, keys = cfg.vocab_size, set(state)
    weights = {
        "embedding": state["embedding.word_embeddings.weight"][:V],
        # Tied embeddings have no output layer of their own.
        "output": state.get("output_layer.weight", state["embedding.word_embeddings.weight"])[:V],
        "final_norm": state["decoder.final_layernorm.weight"],
    }
    for i in range(cfg.num_layers):
        p, r = f"decoder.layers.{i}.", f"layers.{i}."
        wq, wk, wv = split_qkv(state[p + "self_attention.linear_qkv.weight"], cfg)
        gate, up = state[p + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        weights.update({
            r + "attn_norm": state[_norm_key(keys, i, "attn")],
            r + "ffn_norm": state[_norm_key(keys, i, "mlp")],
            r + "wq": wq, r + "wk": wk, r + "wv": wv,
            r + "wo": state[p + "self_attention.linear_proj.weight"],
            r + "w_gate": gate, r + "w_up": up,
            r + "w_down": state[p + "mlp.linear_fc2.weight"],
        })
    return {name: t.detach().float().clone() for name, t in weights.items()}


# ---------------------------------------------------------------------------------------
# Building, loading, saving
# ---------------------------------------------------------------------------------------

def build_megatron_model(cfg: LlamaConfig, weights: dict, rope_fp32: bool = True,
                         bf16: bool = False):
    """Our Megatron-Core GPTModel (TP=1) holding `weights`. Returns (model, ModelConfig)."""
    runtime.ensure_initialized()
    mcfg = model_config_for(cfg, rope_fp32=rope_fp32, bf16=bf16)
    model = build_model(mcfg)
    state_keys = set(model.state_dict())
    state = megatron_state_from_reference(weights, cfg, state_keys, mcfg.padded_vocab_size)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval(), mcfg


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """FP32 logits [T, V] of one causal window through our packed forward."""
    batch = pack_documents([tokens.tolist()], tokens.numel(), "full")
    with torch.no_grad():
        logits, _ = forward_packed(model, batch)
    return logits.float()


def load_reference(ckpt):
    """(LlamaConfig, reference weights) of any opened checkpoint the project writes."""
    model = ckpt.load_model()
    cfg = llama_config_from_model_config(ckpt.model_config)
    return cfg, reference_weights_from_megatron(model.state_dict(), cfg)


def default_validation_tokens(tokenizer, count: int, text_path: Optional[str] = None):
    """Tokens of real text read at run time (a Python stdlib module by default)."""
    path = text_path or os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py")
    ids = tokenizer.encode(Path(path).read_text(encoding="utf-8")).ids
    return torch.tensor(ids[:count]), path


def convert_and_save(smol, out: Path, tokenizer_dir: Optional[str] = None,
                     validate_tokens: int = 256, validate_text: Optional[str] = None) -> dict:
    """Build the Megatron model from SmolLM2, check it against the reference, save it."""
    model, mcfg = build_megatron_model(smol.config, smol.weights)
    summary = {"gguf": str(smol.source), "model_config": json.loads(mcfg.to_json()),
               "bos_token_id": smol.bos_token_id, "eos_token_id": smol.eos_token_id,
               "eod_token_id": smol.eod_token_id}
    if validate_tokens:
        tokens, path = default_validation_tokens(smol.tokenizer, validate_tokens, validate_text)
        start = time.time()
        mlogits = megatron_logits(model, tokens)
        rlogits = ReferenceLlama(smol.config, smol.weights).logits(
            tokens, torch.arange(tokens.numel()))[0]
        nll = torch.nn.functional.cross_entropy(mlogits[:-1, :smol.config.vocab_size], tokens[1:])
        summary["validation"] = {
            "text": path, "tokens": int(tokens.numel()),
            "max_abs_logit_diff_vs_reference": float((mlogits[:, :rlogits.shape[-1]] - rlogits)
                                                     .abs().max()),
            "perplexity": float(torch.exp(nll)),
            "seconds": round(time.time() - start, 1),
        }
    summary["checkpoint"] = checkpoint.save_model(model, mcfg, str(out),
                                                  tokenizer_dir=tokenizer_dir,
                                                  extra_json={"import_summary.json": summary})
    summary["tokenizer"] = checkpoint.open(str(out)).tokenizer_dir
    return summary

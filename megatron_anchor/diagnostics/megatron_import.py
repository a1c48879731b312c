"""Weights between the reference Llama (one tensor per projection) and our Megatron GPTModel.

Megatron-Core's layout (TP=1), from `SelfAttention.get_query_key_value_tensors` and `MLP`:

* `linear_qkv.weight` is [G * (H/G + 2) * D, d]: for each query group g, the rows of its H/G
  query heads, then its key head, then its value head ("q1 q2 q3 k1 v1 | q4 ... ").
* `mlp.linear_fc1.weight` is [gate; up] stacked ([2F, d]); SwiGLU = silu(gate) * up.
* Norms: `input_layernorm`, `pre_mlp_layernorm`, `decoder.final_layernorm` (local spec; a TE
  spec fuses them into `linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight`, which
  `_norm_key` handles).
* Untied `embedding.word_embeddings.weight` and `output_layer.weight`, padded to
  `ModelConfig.padded_vocab_size` rows.
"""

from __future__ import annotations

import json
import os
import sysconfig
import time
from pathlib import Path
from typing import Optional

import torch

from megatron_anchor.diagnostics.reference_llama import LlamaConfig

MODEL_CONFIG_FILE = "model_config.json"


def model_config_for(cfg: LlamaConfig, rope_fp32: bool = True, bf16: bool = False):
    from megatron_anchor.model import ModelConfig

    return ModelConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size, vocab_size=cfg.vocab_size,
        rotary_base=cfg.rotary_base, norm_epsilon=cfg.norm_epsilon, rope_fp32=rope_fp32,
        bf16=bf16, attention_backend="local",
    )


def llama_config_from_model_config(mcfg) -> LlamaConfig:
    return LlamaConfig(
        num_layers=mcfg.num_layers, hidden_size=mcfg.hidden_size,
        ffn_hidden_size=mcfg.ffn_size, num_attention_heads=mcfg.num_attention_heads,
        num_query_groups=mcfg.num_query_groups or mcfg.num_attention_heads,
        vocab_size=mcfg.vocab_size, rotary_base=mcfg.rotary_base,
        norm_epsilon=mcfg.norm_epsilon, tied_embeddings=False,
    )


# ---------------------------------------------------------------------------------------
# Name and layout mapping
# ---------------------------------------------------------------------------------------

def fuse_qkv(wq, wk, wv, cfg: LlamaConfig) -> torch.Tensor:
    """Per query group [its q heads, k, v] rows, as Megatron-Core splits `linear_qkv`."""
    G, D, d = cfg.num_query_groups, cfg.head_dim, cfg.hidden_size
    q = wq.reshape(G, cfg.num_attention_heads // G * D, d)
    return torch.cat([q, wk.reshape(G, D, d), wv.reshape(G, D, d)], dim=1).reshape(-1, d)


def split_qkv(fused, cfg: LlamaConfig):
    G, D, d = cfg.num_query_groups, cfg.head_dim, cfg.hidden_size
    per_group = cfg.num_attention_heads // G * D
    grouped = fused.reshape(G, per_group + 2 * D, d)
    wq, wk, wv = grouped.split([per_group, D, D], dim=1)
    return wq.reshape(-1, d), wk.reshape(-1, d), wv.reshape(-1, d)


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    if weight.shape[0] == rows:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])


def _norm_key(state_keys, layer: int, which: str) -> str:
    """Local spec: separate norm modules; TE spec: norm fused into the next linear."""
    p = f"decoder.layers.{layer}."
    separate = p + ("input_layernorm.weight" if which == "attn" else "pre_mlp_layernorm.weight")
    fused = p + ("self_attention.linear_qkv.layer_norm_weight" if which == "attn"
                 else "mlp.linear_fc1.layer_norm_weight")
    return separate if separate in state_keys else fused


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
    return state


def reference_weights_from_megatron(state: dict, cfg: LlamaConfig) -> dict:
    """Inverse of `megatron_state_from_reference` (drops vocab padding rows), FP32."""
    V, keys = cfg.vocab_size, set(state)
    weights = {
        "embedding": state["embedding.word_embeddings.weight"][:V],
        "output": state["output_layer.weight"][:V],
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

def ensure_parallel_state() -> None:
    """A one-rank CPU world (TP=CP=1) unless the caller initialised one already."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        from megatron_anchor import distributed

        distributed.initialize(cpu=not torch.cuda.is_available())


def build_megatron_model(cfg: LlamaConfig, weights: dict, rope_fp32: bool = True,
                         bf16: bool = False):
    """Our Megatron-Core GPTModel (TP=1) holding `weights`. Returns (model, ModelConfig)."""
    from megatron_anchor.model import build_model

    ensure_parallel_state()
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
    from megatron_anchor.layout import pack_documents
    from megatron_anchor.model import forward_packed

    batch = pack_documents([tokens.tolist()], tokens.numel(), "full")
    with torch.no_grad():
        logits, _ = forward_packed(model, batch)
    return logits.float()


def save_checkpoint(model, mcfg, directory: Path) -> str:
    """Megatron-LM layout: `release/` (dist_checkpointing, model under "model"), the
    `latest_checkpointed_iteration.txt` tracker, and model_config.json to rebuild the model.

    That is what `--load` of Megatron-LM and of this project's tools reads.
    """
    from megatron.core import dist_checkpointing

    release = directory / "release"
    release.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(release))
    (directory / "latest_checkpointed_iteration.txt").write_text("release")
    (directory / MODEL_CONFIG_FILE).write_text(mcfg.to_json())
    return str(release)


def checkpoint_iteration_dir(directory: Path) -> Path:
    """A Megatron-LM checkpoint root (tracker file) or one iteration directory."""
    tracker = directory / "latest_checkpointed_iteration.txt"
    if tracker.exists():
        iteration = tracker.read_text().strip()
        return directory / ("release" if iteration == "release" else f"iter_{int(iteration):07d}")
    return directory


def find_model_config(directory: Path) -> Path:
    for candidate in (directory / MODEL_CONFIG_FILE, directory.parent / MODEL_CONFIG_FILE):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"no {MODEL_CONFIG_FILE} in {directory} or its parent: --load expects a checkpoint "
        "written by megatron-anchor-import-smollm2 (or one with the same model_config.json)")


def load_checkpoint(directory: os.PathLike):
    """(LlamaConfig, reference weights) from a Megatron checkpoint with a model_config.json."""
    from megatron.core import dist_checkpointing
    from megatron_anchor.model import ModelConfig, build_model

    directory = Path(directory)
    mcfg = ModelConfig.from_dict(json.loads(find_model_config(directory).read_text()))
    ensure_parallel_state()
    model = build_model(mcfg)
    state = dist_checkpointing.load({"model": model.sharded_state_dict()},
                                    str(checkpoint_iteration_dir(directory)))
    model.load_state_dict(state["model"], strict=False)
    cfg = llama_config_from_model_config(mcfg)
    return cfg, reference_weights_from_megatron(model.state_dict(), cfg)


def default_validation_tokens(tokenizer, count: int, text_path: Optional[str] = None):
    """Tokens of real text read at run time (a Python stdlib module by default)."""
    path = text_path or os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py")
    ids = tokenizer.encode(Path(path).read_text(encoding="utf-8")).ids
    return torch.tensor(ids[:count]), path


def convert_and_save(smol, out: Path, validate_tokens: int = 256,
                     validate_text: Optional[str] = None) -> dict:
    """Build the Megatron model from SmolLM2, check it against the reference, save it."""
    from megatron_anchor.diagnostics.reference_llama import ReferenceLlama

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
    summary["checkpoint"] = save_checkpoint(model, mcfg, out)
    summary["tokenizer"] = str(out / "tokenizer.json")
    (out / "import_summary.json").write_text(json.dumps(summary, indent=2))
    return summary

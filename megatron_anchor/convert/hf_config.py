"""Hugging Face `config.json` <-> our `ModelConfig`, per family, refusing what is not modelled.

Families (docs/design.md §9): `llama` (Llama-2, Llama-3, Llama-3.1/3.2 with `llama3` RoPE scaling,
SmolLM2), `mistral` (no active sliding window), `qwen2` (Qwen-1.5/Qwen2: bias on q/k/v only).
All three are the same Megatron architecture: RMSNorm, SwiGLU, GQA, RoPE, no other biases.

Reading works on the plain JSON (no transformers import): both the transformers-4 keys
(`rope_theta`, `rope_scaling`) and the transformers-5 `rope_parameters` are understood.
Every refusal is one line naming the config.json field.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Optional

from megatron_anchor.checkpoint import CheckpointError
from megatron_anchor.rope import check_rope_scaling

CONFIG_FILE = "config.json"

FAMILIES = ("llama", "mistral", "qwen2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}
# Fields that, when set, mean a mixture-of-experts model.
MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok",
              "moe_intermediate_size", "n_shared_experts")
QK_NORM_FIELDS = ("qk_norm", "use_qk_norm", "qk_layernorm", "use_qk_layernorm")
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class ConversionError(CheckpointError):
    """A Hugging Face checkpoint (or an export request) this converter cannot handle exactly."""


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConversionError(f"{hf_dir}: no {CONFIG_FILE} (expected a Hugging Face model "
                              "directory)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return config


def _need(hf: dict, key: str):
    if hf.get(key) is None:
        raise ConversionError(f"config.json lacks {key}")
    return hf[key]


def rope_of(hf: dict):
    """(rope_theta, rope_scaling or None) from either the v4 or the v5 keys."""
    params = hf.get("rope_parameters") or {}
    if params and not isinstance(params, dict):
        raise ConversionError("config.json rope_parameters: per-layer-type RoPE is not modelled")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ConversionError("config.json rope_parameters: per-layer-type RoPE is not modelled")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    theta = 10000.0 if theta is None else float(theta)
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) not in (1, 1.0):
        raise ConversionError("config.json partial_rotary_factor != 1: partial RoPE is not "
                              "modelled")
    scaling, field = hf.get("rope_scaling"), "rope_scaling"
    if not scaling and params.get("rope_type", "default") != "default":
        scaling, field = params, "rope_parameters"
    try:
        return theta, check_rope_scaling(scaling)
    except ValueError as err:
        raise ConversionError(f"config.json {field}: {err}") from None


def model_config_from_hf(hf: dict, *, rotary_base: Optional[float] = None,
                         bf16: bool = False, seq_length: Optional[int] = None):
    """Our ModelConfig for a Hugging Face config dict; ConversionError names what is refused.

    `rotary_base` replaces the RoPE base (the recipe's raised base); `seq_length` is the
    training length a Mistral/Qwen2 sliding window is checked against (default: the model's
    `max_position_embeddings`).
    """
    from megatron_anchor.model import ModelConfig

    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ConversionError(f"config.json model_type {family!r} is not supported "
                              f"(supported: {', '.join(FAMILIES)})")
    for key in MOE_FIELDS:
        if hf.get(key):
            raise ConversionError(f"config.json {key}={hf[key]}: mixture-of-experts models "
                                  "are not modelled")
    for key in QK_NORM_FIELDS:
        if hf.get(key):
            raise ConversionError(f"config.json {key}={hf[key]}: qk-norm is not modelled")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"config.json hidden_act {act!r}: only silu (SwiGLU) is modelled")
    if hf.get("mlp_bias"):
        raise ConversionError("config.json mlp_bias=true: MLP biases are not modelled")
    if hf.get("attention_bias") and family != "qwen2":
        raise ConversionError("config.json attention_bias=true: a bias on every attention "
                              "projection (including o_proj) is not modelled; only Qwen2's "
                              "q/k/v bias is")

    hidden = int(_need(hf, "hidden_size"))
    heads = int(_need(hf, "num_attention_heads"))
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    if hidden % heads:
        raise ConversionError(f"config.json hidden_size {hidden} is not divisible by "
                              f"num_attention_heads {heads}")
    if hf.get("head_dim") not in (None, hidden // heads):
        raise ConversionError(f"config.json head_dim {hf['head_dim']} != hidden_size / "
                              f"num_attention_heads = {hidden // heads}: not modelled")
    if heads % kv_heads:
        raise ConversionError(f"config.json num_attention_heads {heads} is not a multiple of "
                              f"num_key_value_heads {kv_heads}")
    max_positions = int(hf.get("max_position_embeddings") or 131072)
    length = int(seq_length or max_positions)
    _check_sliding_window(hf, family, length)
    theta, scaling = rope_of(hf)
    return ModelConfig(
        num_layers=int(_need(hf, "num_hidden_layers")),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=kv_heads if kv_heads != heads else None,
        ffn_hidden_size=int(_need(hf, "intermediate_size")),
        vocab_size=int(_need(hf, "vocab_size")),
        max_sequence_length=max_positions,
        rotary_base=float(rotary_base) if rotary_base else theta,
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        attention_backend="local",
        bf16=bool(bf16),
        add_qkv_bias=family == "qwen2",
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        rope_scaling=scaling,
    )


def _check_sliding_window(hf: dict, family: str, length: int) -> None:
    window = hf.get("sliding_window")
    if family == "qwen2":
        types = hf.get("layer_types") or []
        active = hf.get("use_sliding_window", False) or "sliding_attention" in types
        if not active:
            return
        field = "use_sliding_window" if hf.get("use_sliding_window") else "layer_types"
    elif family == "mistral":
        field = "sliding_window"
    else:
        return
    if window is not None and int(window) < length:
        raise ConversionError(
            f"config.json {field}: sliding-window attention (window {window}) would be active "
            f"below the training length {length}; it is not modelled (pass a --seq-length "
            f"<= {window} or use a model without a window)")


def family_of(model_config, base: Optional[dict]) -> str:
    if base and base.get("model_type") in FAMILIES:
        family = base["model_type"]
    else:
        family = "qwen2" if model_config.add_qkv_bias else "llama"
    if model_config.add_qkv_bias != (family == "qwen2"):
        raise ConversionError(f"the checkpoint {'has' if model_config.add_qkv_bias else 'lacks'}"
                              f" a QKV bias but the Hugging Face config says model_type "
                              f"{family!r}")
    return family


def hf_config_from_model_config(model_config, base: Optional[dict] = None,
                                dtype: str = "float32") -> dict:
    """config.json for an exported model: `base` (the imported or given config) updated with
    the trained architecture, RoPE base (`rope_theta` and `rope_parameters`) and max length.
    """
    m = model_config
    family = family_of(m, base)
    hf = copy.deepcopy(base) if base else {}
    hf.update({
        "model_type": family,
        "architectures": [ARCHITECTURES[family]],
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
        "head_dim": m.hidden_size // m.num_attention_heads,
        "vocab_size": m.vocab_size,
        "rms_norm_eps": m.norm_epsilon,
        "hidden_act": "silu",
        "tie_word_embeddings": bool(m.share_embeddings_and_output_weights),
        "max_position_embeddings": int(m.max_sequence_length),
        "rope_theta": float(m.rotary_base),
        "rope_parameters": dict({"rope_type": "default"}, **(m.rope_scaling or {}),
                                rope_theta=float(m.rotary_base)),
        "dtype": dtype,
    })
    hf.pop("torch_dtype", None)
    hf.pop("rope_scaling", None)
    if family == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    if family in ("mistral", "qwen2"):
        hf["sliding_window"] = None  # the trained model attends over its whole window
    if family == "qwen2":
        hf["use_sliding_window"] = False
        hf["layer_types"] = ["full_attention"] * m.num_layers
    return hf

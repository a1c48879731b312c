"""What is not modelled is refused with one line naming the config.json field (or tensor)."""

import json
import os

import pytest
import torch

from megatron_anchor.convert import ConversionError, model_config_from_hf

LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 300, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}


def refused(hf, **kwargs) -> str:
    with pytest.raises(ConversionError) as err:
        model_config_from_hf(hf, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("change,field", [
    ({"model_type": "gemma2"}, "model_type"),
    ({"model_type": "mixtral"}, "model_type"),
    ({"num_local_experts": 8}, "num_local_experts"),
    ({"num_experts": 4}, "num_experts"),
    ({"use_qk_norm": True}, "use_qk_norm"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 32}, "head_dim"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "rope_parameters"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "rope_parameters"),
    ({"model_type": "mistral", "sliding_window": 256}, "sliding_window"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 128},
     "use_sliding_window"),
    ({"num_hidden_layers": None}, "num_hidden_layers"),
])
def test_refusal_names_the_field(change, field):
    message = refused(dict(LLAMA, **change))
    assert field in message, message


def test_rope_type_named_in_refusal():
    hf = dict(LLAMA, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    assert "yarn" in refused(hf)


def test_sliding_window_is_checked_against_the_training_length():
    mistral = dict(LLAMA, model_type="mistral", sliding_window=4096)
    assert model_config_from_hf(mistral).max_sequence_length == 512  # never active
    assert "sliding_window" in refused(mistral, seq_length=8192)
    qwen = dict(LLAMA, model_type="qwen2", use_sliding_window=False, sliding_window=64)
    assert model_config_from_hf(qwen).add_qkv_bias  # the window is off: accepted


def test_accepted_configs():
    cfg = model_config_from_hf(dict(LLAMA, rope_theta=5e5, rope_parameters=None,
                                    rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                  "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 8192}))
    assert cfg.rotary_base == 5e5 and cfg.rope_scaling["factor"] == 8.0  # transformers 4 keys
    assert model_config_from_hf(LLAMA, rotary_base=5e6).rotary_base == 5e6
    assert model_config_from_hf(dict(LLAMA, tie_word_embeddings=True)) \
        .share_embeddings_and_output_weights


def test_unexpected_and_missing_tensors_are_refused(tmp_path, megatron_cpu):
    from safetensors.torch import load_file, save_file

    from megatron_anchor.convert import load_hf_model
    from tests.convert.conftest import make_hf_model

    src, _ = make_hf_model("llama-gqa", tmp_path / "hf")
    path = os.path.join(src, "model.safetensors")
    tensors = load_file(path)
    save_file(dict(tensors, **{"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}),
              path, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"q_norm.*qk-norm"):
        load_hf_model(src)
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"up_proj.*missing"):
        load_hf_model(src)
    os.remove(path)
    with pytest.raises(ConversionError, match="no \\*.safetensors"):
        load_hf_model(src)
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(dict(LLAMA, model_type="phi3"), f)
    with pytest.raises(ConversionError, match="model_type 'phi3'"):
        load_hf_model(src)

"""Llama-3.1 RoPE frequency scaling in our FP64 tables equals transformers' rule."""

import pytest
import torch

from megatron_anchor.rope import check_rope_scaling, rope_cos_sin, rope_inv_freq

LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_inv_freq_matches_transformers_llama3_rule():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=4096, num_attention_heads=32,
                         max_position_embeddings=131072,
                         rope_parameters=dict(LLAMA31, rope_theta=500000.0))
    theirs, scale = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = rope_inv_freq(128, 500000.0, rope_scaling=LLAMA31)
    assert scale == 1.0
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-6, atol=0)  # theirs is FP32
    plain = rope_inv_freq(128, 500000.0)
    assert torch.equal(ours[:20], plain[:20])          # high frequencies untouched
    torch.testing.assert_close(ours[-10:], plain[-10:] / 8)  # low frequencies divided
    cos, _ = rope_cos_sin(torch.arange(5), 128, 500000.0, LLAMA31)
    assert cos.dtype == torch.float32 and cos.shape == (5, 128)


@pytest.mark.parametrize("bad,words", [
    ({"rope_type": "yarn", "factor": 2.0}, "'yarn'"),
    ({"rope_type": "llama3", "factor": 8.0}, "low_freq_factor"),
    (dict(LLAMA31, high_freq_factor=1.0), "high_freq_factor"),
])
def test_bad_scaling_is_named(bad, words):
    with pytest.raises(ValueError, match=words):
        check_rope_scaling(bad)


def test_default_rope_type_means_no_scaling():
    assert check_rope_scaling({"rope_type": "default", "rope_theta": 1e4}) is None
    assert check_rope_scaling(None) is None


def test_megatron_lm_use_rope_scaling_reaches_the_core_attention():
    """Megatron-LM's --use-rope-scaling becomes our llama3 scaling, equal to Megatron-Core's
    own RotaryEmbedding tables."""
    from types import SimpleNamespace

    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_anchor.training.megatron_lm import layer_spec_from_args

    args = SimpleNamespace(position_embedding_type="none", transformer_impl="local",
                           rotary_base=500000, use_rope_scaling=True, rope_scaling_factor=8.0)
    params = layer_spec_from_args(args).submodules.self_attention.submodules \
        .core_attention.params
    scaling = params["rope_scaling"]
    assert scaling == dict(LLAMA31, factor=8.0)
    megatron = RotaryEmbedding(kv_channels=128, rotary_percent=1.0, rope_scaling=True,
                               rope_scaling_factor=8.0, rotary_base=500000,
                               use_cpu_initialization=True)
    torch.testing.assert_close(rope_inv_freq(128, 500000, rope_scaling=scaling).float(),
                               megatron.inv_freq.float(), rtol=1e-6, atol=0)
    args.use_rope_scaling = False
    assert "rope_scaling" not in layer_spec_from_args(args).submodules.self_attention \
        .submodules.core_attention.params

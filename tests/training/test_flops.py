"""Model FLOP count (training.flops) against a hand count; throughput and MFU."""

import pytest

from megatron_anchor.training.flops import (
    FlopsShape,
    batch_training_flops,
    causal_pairs,
    default_peak_tflops,
    throughput,
    training_flops,
)

# 2 layers, h=64, 4 query heads in 2 groups (d=16), SwiGLU width 192, padded vocab 256.
SHAPE = FlopsShape(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                   kv_channels=16, ffn_hidden_size=192, vocab_size=256)


def test_dense_flops_per_token_by_hand():
    qkv = 2 * 64 * (4 * 16 + 2 * 2 * 16)     # 16384: q (4 heads) + k, v (2 groups each)
    proj = 2 * 64 * 64                        # 8192
    mlp = 2 * 64 * 2 * 192 + 2 * 192 * 64     # 73728: gate + up, then down
    logits = 2 * 64 * 256                     # 32768
    assert qkv + proj + mlp == 98304
    assert SHAPE.dense_forward_flops_per_token() == 2 * 98304 + logits == 229376


def test_attention_counted_per_segment():
    # QK^T and AV: 2 matmuls x 2 FLOPs x 4 heads x 16 channels = 256 per pair and layer.
    assert SHAPE.attention_forward_flops(1) == 2 * 256
    assert causal_pairs([8]) == 32 and causal_pairs([3, 5]) == 17
    full = training_flops(SHAPE, 8, [8])
    assert full == 3 * (8 * 229376 + 512 * 32) == 5554176
    anchor = training_flops(SHAPE, 8, [3, 5])
    assert anchor == 3 * (8 * 229376 + 512 * 17) == 5531136


def test_packed_batch_flops_follow_its_segments():
    from megatron_anchor.layout import collate, pack_documents, shard_for_cp

    docs = [list(range(10, 40)), list(range(50, 120)), list(range(130, 170))]
    anchor = pack_documents(docs, 128, "anchor", anchor_token_id=1)
    full = pack_documents(docs, 128, "full")
    lengths = anchor.segment_lengths.tolist()
    assert len(lengths) >= 3 and sum(lengths) == 128
    assert batch_training_flops(SHAPE, anchor) == training_flops(SHAPE, 128, lengths)
    assert batch_training_flops(SHAPE, full) == training_flops(SHAPE, 128, [128])
    assert batch_training_flops(SHAPE, anchor) < batch_training_flops(SHAPE, full)
    both = collate([anchor, anchor])
    assert batch_training_flops(SHAPE, both) == 2 * batch_training_flops(SHAPE, anchor)
    # cu_seqlens stays global under CP: a CP rank counts the whole sequence.
    cp = pack_documents(docs, 128, "anchor", anchor_token_id=1, cp_size=2)
    assert batch_training_flops(SHAPE, shard_for_cp(cp, 2, 1)) == batch_training_flops(SHAPE, cp)


def test_shape_from_model_config():
    from megatron_anchor.model import ModelConfig

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      vocab_size=200)
    assert FlopsShape.from_model_config(cfg) == SHAPE  # ffn 8/3*64 -> 192, vocab -> 256


def test_llama2_7b_at_4k_matches_the_usual_6nd_estimate():
    """Dense FLOPs per token are ~6 x parameters (+ attention): a sanity check at scale."""
    shape = FlopsShape(num_layers=32, hidden_size=4096, num_attention_heads=32,
                       num_query_groups=32, kv_channels=128, ffn_hidden_size=11008,
                       vocab_size=32000)
    params = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 4096 * 32000  # no input embedding
    per_token = training_flops(shape, 4096, [4096]) / 4096
    attention = 3 * 32 * 4 * 4096 * 4096 / 2  # 3 x L x 4 x h x S/2 per token
    assert per_token == pytest.approx(6 * params + attention, rel=1e-9)


def test_throughput_and_peak():
    rate = throughput(10e12, 2.0, 5, 100.0)
    assert rate["tflops_per_rank"] == pytest.approx(1.0) and rate["mfu"] == pytest.approx(0.01)
    assert throughput(10e12, 2.0, 5, None)["mfu"] is None
    assert default_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert default_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert default_peak_tflops("NVIDIA GB200") == 2500.0
    assert default_peak_tflops("NVIDIA H100 80GB HBM3", bf16=False) is None
    assert default_peak_tflops("Some Other GPU") is None

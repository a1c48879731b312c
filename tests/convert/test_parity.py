"""Imported Hugging Face models give transformers' logits (FP32, <= 1e-5 relative).

Each family in tests/convert/conftest.py: one document as `[BOS] + doc` at positions 0..n,
and a packed `anchor` window whose every document matches transformers run on
`[BOS] + doc` alone at the window's position ids (0 for the anchor, then window offsets).
"""

import pytest

from megatron_anchor.layout import pack_documents
from tests.convert.conftest import (BOS, FAMILIES, VOCAB, documents, hf_logits, our_logits,
                                    rel_diff)

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def imported(hf_models, megatron_cpu):
    from megatron_anchor.convert import load_hf_model

    return {name: load_hf_model(folder)[:2] for name, (folder, _) in hf_models.items()}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_one_document_matches_transformers(name, hf_models, imported):
    model, _ = imported[name]
    hf = hf_models[name][1]
    tokens = [BOS] + documents(seed=7, lengths=(60,))[0]
    batch = pack_documents([tokens], len(tokens), "full")
    ours = our_logits(model, batch)
    ref = hf_logits(hf, tokens, list(range(len(tokens))))
    assert rel_diff(ours, ref) <= TOLERANCE, rel_diff(ours, ref)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_anchor_window_matches_transformers_per_document(name, hf_models, imported):
    model, _ = imported[name]
    hf = hf_models[name][1]
    docs = documents(seed=3, lengths=(23, 40, 17, 31))
    batch = pack_documents(docs, 128, "anchor", anchor_token_id=BOS)
    ours = our_logits(model, batch)
    checked = 0
    for i, doc in enumerate(docs):
        slots = (batch.document_ids == i).nonzero().flatten()
        if slots.numel() == 0:
            continue
        tokens = batch.tokens[slots]
        assert tokens[0] == BOS and tokens[1:].tolist() == doc[:slots.numel() - 1]
        positions = batch.position_ids[slots]
        if checked:  # later documents really sit at window offsets, not at 1..n
            assert positions[1] > 1
        ref = hf_logits(hf, tokens, positions)
        assert rel_diff(ours[slots], ref) <= TOLERANCE, (i, rel_diff(ours[slots], ref))
        checked += 1
    assert checked >= 3


def test_rope_scaling_is_what_makes_llama31_match(hf_models, imported):
    """Negative control: the same weights without the llama3 scaling do not match."""
    import dataclasses

    from megatron_anchor.model import build_model

    model, cfg = imported["llama31-rope-scaling"]
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rotary_base == 500000.0
    plain = build_model(dataclasses.replace(cfg, rope_scaling=None))
    plain.load_state_dict(model.state_dict())
    plain.eval()
    tokens = [BOS] + documents(seed=7, lengths=(60,))[0]
    batch = pack_documents([tokens], len(tokens), "full")
    ref = hf_logits(hf_models["llama31-rope-scaling"][1], tokens, list(range(len(tokens))))
    assert rel_diff(our_logits(plain, batch), ref) > 100 * TOLERANCE


def test_import_maps_the_config(imported):
    llama = imported["llama-gqa"][1]
    assert (llama.num_layers, llama.hidden_size, llama.num_attention_heads,
            llama.num_query_groups, llama.ffn_hidden_size) == (2, 64, 4, 2, 96)
    assert llama.vocab_size == VOCAB and llama.padded_vocab_size == 384
    assert not llama.add_qkv_bias and not llama.share_embeddings_and_output_weights
    qwen = imported["qwen2-bias-tied-gqa"][1]
    assert qwen.add_qkv_bias and qwen.share_embeddings_and_output_weights
    assert imported["mistral-mha"][1].num_query_groups is None  # multi-head
    model = imported["qwen2-bias-tied-gqa"][0]
    keys = set(model.state_dict())
    assert "output_layer.weight" not in keys  # tied: the head reads the embedding
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in keys


def test_old_model_config_json_without_the_new_fields_loads():
    import dataclasses
    import json

    from megatron_anchor.model import ModelConfig

    old = json.loads(ModelConfig().to_json())
    for name in ("add_qkv_bias", "share_embeddings_and_output_weights", "rope_scaling"):
        old.pop(name)
    cfg = ModelConfig.from_dict(old)
    assert not cfg.add_qkv_bias and not cfg.share_embeddings_and_output_weights
    assert cfg.rope_scaling is None
    scaled = dataclasses.replace(cfg, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                    "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 64})
    assert ModelConfig.from_dict(json.loads(scaled.to_json())) == scaled

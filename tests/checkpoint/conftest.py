"""Fixtures for the checkpoint tests: a tiny model and a root holding two saves."""

import pytest

from megatron_anchor import checkpoint
from megatron_anchor.model import ModelConfig, build_model

CFG = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                  vocab_size=100)


@pytest.fixture
def two_saves(megatron_cpu, tmp_path):
    root = str(tmp_path / "ck")
    model = build_model(CFG)
    for it in (10, 20):
        checkpoint.save_model(model, CFG, root, iteration=it)
    return root

"""The checkpoint module: the one reader of the on-disk layout."""

import json
import os

import pytest
import torch

from megatron_anchor import checkpoint
from megatron_anchor.model import ModelConfig, build_model, forward_packed

CFG = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                  vocab_size=100)


def test_resolve_and_errors(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint directory"):
        checkpoint.resolve(str(tmp_path / "missing"))
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint"):
        checkpoint.resolve(str(tmp_path))
    (tmp_path / checkpoint.TRACKER_FILE).write_text("12\n")
    with pytest.raises(checkpoint.CheckpointError, match="iter_0000012, which is missing"):
        checkpoint.resolve(str(tmp_path))
    (tmp_path / checkpoint.TRACKER_FILE).write_text("garbage")
    with pytest.raises(checkpoint.CheckpointError, match="expected an iteration number"):
        checkpoint.resolve(str(tmp_path))
    (tmp_path / checkpoint.TRACKER_FILE).unlink()
    assert not checkpoint.exists(str(tmp_path)) and not checkpoint.exists(None)


def test_flags_that_contradict_the_checkpoint_are_refused():
    checkpoint.check_flags_match(CFG, {"hidden_size": 32, "num_layers": None}, "ck")
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"--hidden-size 64 contradicts the checkpoint ck \(hidden_size = 32\)"):
        checkpoint.check_flags_match(CFG, {"hidden_size": 64}, "ck")
    assert checkpoint.with_runtime_fields(CFG, rope_fp32=False).rope_fp32 is False
    with pytest.raises(checkpoint.CheckpointError, match="cannot override vocab_size"):
        checkpoint.with_runtime_fields(CFG, vocab_size=5)


def test_save_model_then_load_anywhere(megatron_cpu, tmp_path):
    from megatron_anchor.layout import pack_documents

    root = str(tmp_path / "ck")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    model = build_model(CFG)
    for it in (10, 20):
        checkpoint.save_model(model, CFG, root, iteration=it, tokenizer_dir=str(tok),
                              extra_json={"note.json": {"it": it}})
    assert [i for i, _ in checkpoint.list_iterations(root)] == [10, 20]
    assert checkpoint.resolve(root).endswith("iter_0000020")
    assert checkpoint.root_of(os.path.join(root, "iter_0000010")) == os.path.abspath(root)
    assert sorted(os.listdir(checkpoint.tokenizer_dir(root))) == [
        "tokenizer.json", "tokenizer_config.json"]
    assert json.loads(open(os.path.join(root, "iter_0000010", "note.json")).read()) == {"it": 10}
    assert checkpoint.read_model_config(root) == CFG

    loaded, config = checkpoint.load_model(root, rope_fp32=True)
    assert config == CFG and not loaded.training
    batch = pack_documents([[3, 4, 5, 6], [7, 8]], 16, "anchor", anchor_token_id=1)
    with torch.no_grad():
        torch.testing.assert_close(forward_packed(loaded, batch)[0],
                                   forward_packed(model.eval(), batch)[0], rtol=0, atol=0)
    with pytest.raises(checkpoint.CheckpointError, match="model weights only"):
        checkpoint.load_training(root, components=None)

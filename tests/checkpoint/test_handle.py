"""The handle: `checkpoint.open` resolves a root or an iteration once; what tools do with it."""

import os

import pytest
import torch

from megatron_anchor import checkpoint
from megatron_anchor.model import build_model, forward_packed
from tests.checkpoint.conftest import CFG


def test_open_errors(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint directory"):
        checkpoint.open(str(tmp_path / "missing"))
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint"):
        checkpoint.open(str(tmp_path))
    (tmp_path / checkpoint.TRACKER_FILE).write_text("12\n")
    with pytest.raises(checkpoint.CheckpointError, match="iter_0000012, which is missing"):
        checkpoint.open(str(tmp_path))
    (tmp_path / checkpoint.TRACKER_FILE).write_text("garbage")
    with pytest.raises(checkpoint.CheckpointError, match="expected an iteration number"):
        checkpoint.open(str(tmp_path))
    (tmp_path / checkpoint.TRACKER_FILE).unlink()
    assert not checkpoint.exists(str(tmp_path)) and not checkpoint.exists(None)


def test_flags_that_contradict_the_checkpoint_are_refused():
    ck = checkpoint.Checkpoint(path="ck", root=".", iteration=None, model_config=CFG,
                               tokenizer_dir=None)
    assert ck.architecture({"hidden_size": 32, "num_layers": None}) == CFG
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"--hidden-size 64 contradicts the checkpoint ck \(hidden_size = 32\)"):
        ck.architecture({"hidden_size": 64})
    assert ck.architecture(rope_fp32=False).rope_fp32 is False
    with pytest.raises(checkpoint.CheckpointError, match="cannot override vocab_size"):
        ck.architecture(vocab_size=5)


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
    latest = checkpoint.open(root)
    assert latest.path.endswith("iter_0000020") and latest.iteration == 20
    older = checkpoint.open(os.path.join(root, "iter_0000010"))
    assert older.root == os.path.abspath(root) and older.iteration == 10
    assert checkpoint.open(root, step=10).path == older.path
    with pytest.raises(checkpoint.CheckpointError, match=r"--ckpt-step 15: .* \(complete "
                       r"iterations under .*: 10, 20\)"):
        checkpoint.open(root, step=15)
    assert sorted(os.listdir(latest.tokenizer_dir)) == [
        "tokenizer.json", "tokenizer_config.json"]
    assert older.json_file("note.json") == {"it": 10}
    assert latest.model_config == CFG
    assert [c.iteration for c in checkpoint.last(root, 2)] == [10, 20]

    loaded = latest.load_model(rope_fp32=True)
    assert not loaded.training
    batch = pack_documents([[3, 4, 5, 6], [7, 8]], 16, "anchor", anchor_token_id=1)
    with torch.no_grad():
        torch.testing.assert_close(forward_packed(loaded, batch)[0],
                                   forward_packed(model.eval(), batch)[0], rtol=0, atol=0)
    with pytest.raises(checkpoint.CheckpointError, match="model weights only"):
        checkpoint.load_training(latest, components=None)

"""The checkpoint module: the one reader of the on-disk layout."""

import os

import pytest
import torch

from megatron_anchor import checkpoint
from megatron_anchor.model import ModelConfig, build_model, forward_packed

CFG = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                  vocab_size=100)


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


# ----------------------------------------------------------------------------------------
# Complete, incomplete, damaged (issue 18)
# ----------------------------------------------------------------------------------------

@pytest.fixture
def two_saves(megatron_cpu, tmp_path):
    root = str(tmp_path / "ck")
    model = build_model(CFG)
    for it in (10, 20):
        checkpoint.save_model(model, CFG, root, iteration=it)
    return root


def _manifest(path):
    import json

    with open(os.path.join(path, checkpoint.MANIFEST_FILE)) as f:
        return json.load(f)


def test_a_save_is_complete_only_with_its_manifest(two_saves):
    newest = os.path.join(two_saves, "iter_0000020")
    manifest = _manifest(newest)
    assert manifest["iteration"] == 20 and manifest["contents"] == ["model"]
    on_disk = {os.path.relpath(os.path.join(d, n), newest)
               for d, _, names in os.walk(newest) for n in names} - {checkpoint.MANIFEST_FILE}
    assert set(manifest["files"]) == on_disk and ".metadata" in on_disk
    assert all(os.path.getsize(os.path.join(newest, n)) == size
               for n, size in manifest["files"].items())
    # A save that died: only its .incomplete directory remains, which nothing picks.
    os.makedirs(os.path.join(two_saves, "iter_0000030.incomplete"))
    assert [i for i, _ in checkpoint.list_iterations(two_saves)] == [10, 20]
    assert checkpoint.open(two_saves).iteration == 20
    with pytest.raises(checkpoint.CheckpointError, match="an unfinished save"):
        checkpoint.open(os.path.join(two_saves, "iter_0000030.incomplete"))
    ckpt, notes = checkpoint.open_for_resume(two_saves)
    assert ckpt.iteration == 20 and notes == [
        f"skipping {os.path.join(two_saves, 'iter_0000030.incomplete')}: its save did not finish"]


@pytest.mark.parametrize("damage,message", [
    (lambda p: os.truncate(os.path.join(p, "__0_0.distcp"), 100),
     r"__0_0.distcp is truncated \(100 of \d+ bytes\)"),
    (lambda p: os.remove(os.path.join(p, ".metadata")), r"\.metadata is missing"),
    (lambda p: os.remove(os.path.join(p, "metadata.json")), r"metadata.json is missing"),
    (lambda p: open(os.path.join(p, "model_config.json"), "a").write("x"),
     r"model_config.json has \d+ bytes, \d+ when it was saved"),
    (lambda p: open(os.path.join(p, checkpoint.MANIFEST_FILE), "w").write("{"),
     r"manifest.json: unreadable"),
], ids=["truncated", "no-.metadata", "no-metadata.json", "grown", "bad-manifest"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(two_saves, damage, message):
    newest = os.path.join(two_saves, "iter_0000020")
    damage(newest)
    with pytest.raises(checkpoint.CheckpointError, match=message) as caught:
        checkpoint.open(two_saves)
    text = str(caught.value)
    assert "\n" not in text and newest in text
    if "manifest.json" not in message:
        assert f"older complete iterations under {two_saves}: 10 (--ckpt-step N loads one)" in text
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.open_for_resume(two_saves)  # damaged is the user's call, not skipped
    assert checkpoint.open(two_saves, step=10).iteration == 10  # --ckpt-step


def test_unreadable_json_of_a_trainer_save(two_saves):
    newest = os.path.join(two_saves, "iter_0000020")
    manifest = _manifest(newest)
    with open(os.path.join(newest, "train_state.json"), "w") as f:
        f.write('{"a": ')
    manifest["files"]["train_state.json"] = 6
    checkpoint.files.write_json(os.path.join(newest, checkpoint.MANIFEST_FILE), manifest)
    with pytest.raises(checkpoint.CheckpointError, match="train_state.json is unreadable JSON"):
        checkpoint.open(two_saves)


def test_checkpoints_from_before_manifests(two_saves):
    """Saved by the code before manifests: complete by that code's rule (metadata.json and
    model_config.json; train_state.json after train_config.json), read without size checks,
    and a read error is still one line."""
    for it in (10, 20):
        os.remove(os.path.join(two_saves, f"iter_{it:07d}", checkpoint.MANIFEST_FILE))
    assert [i for i, _ in checkpoint.list_iterations(two_saves)] == [10, 20]
    ckpt, notes = checkpoint.open_for_resume(two_saves)
    assert ckpt.manifest is None and "saved before megatron-anchor wrote manifests" in notes[-1]
    half = os.path.join(two_saves, "iter_0000020")
    open(os.path.join(half, checkpoint.TRAIN_CONFIG_FILE), "w").write("{}")  # no train_state
    assert [i for i, _ in checkpoint.list_iterations(two_saves)] == [10]
    os.remove(os.path.join(half, checkpoint.TRAIN_CONFIG_FILE))
    shard = os.path.join(half, "__0_0.distcp")
    os.truncate(shard, os.path.getsize(shard) // 2)
    ckpt = checkpoint.open(two_saves)  # nothing to compare the size with
    with pytest.raises(checkpoint.CheckpointError, match=r"iter_0000020: cannot read the "
                       r"checkpoint \(.*\); older complete iterations .*: 10 ") as caught:
        ckpt.load_model()
    assert "\n" not in str(caught.value)


def test_a_tracker_pointing_at_nothing_falls_back_only_on_resume(two_saves):
    import shutil

    shutil.rmtree(os.path.join(two_saves, "iter_0000020"))
    with pytest.raises(checkpoint.CheckpointError, match="iter_0000020, which is missing or "
                       r"incomplete; older complete iterations .*: 10 "):
        checkpoint.open(two_saves)
    ckpt, notes = checkpoint.open_for_resume(two_saves)
    assert ckpt.iteration == 10 and "resuming from" in notes[0]


def test_a_failed_save_is_one_line_and_touches_nothing(two_saves, monkeypatch):
    import errno

    from megatron.core import dist_checkpointing

    before = sorted(os.listdir(two_saves))
    tracker = open(os.path.join(two_saves, checkpoint.TRACKER_FILE)).read()

    def full(state, directory, **kwargs):
        with open(os.path.join(directory, "__0_0.distcp"), "wb") as f:
            f.write(b"partial")
        raise RuntimeError("Worker failure") from OSError(
            errno.ENOSPC, "No space left on device", os.path.join(directory, "__0_0.distcp"))

    monkeypatch.setattr(dist_checkpointing, "save", full)
    with pytest.raises(checkpoint.CheckpointError) as caught:
        checkpoint.save_model(build_model(CFG), CFG, two_saves, iteration=30)
    text = str(caught.value)
    assert text.startswith(f"cannot save iteration 30 to {two_saves}: [Errno 28] No space "
                           "left on device: ") and "iter_0000030.incomplete/__0_0.distcp" in text
    assert "the newest complete checkpoint is still" in text and "\n" not in text
    assert sorted(os.listdir(two_saves)) == before  # the partial directory is gone
    assert open(os.path.join(two_saves, checkpoint.TRACKER_FILE)).read() == tracker


def test_saving_an_iteration_again_never_leaves_the_tracker_on_nothing(two_saves, monkeypatch):
    """A run resumed from an older --ckpt-step saves iteration 20 again: the tracker moves
    to 10 while the old 20 is replaced."""
    seen = []
    remove = checkpoint._remove_tree

    def spy(path):
        seen.append(open(os.path.join(two_saves, checkpoint.TRACKER_FILE)).read().strip())
        remove(path)

    monkeypatch.setattr(checkpoint, "_remove_tree", spy)
    checkpoint.save_model(build_model(CFG), CFG, two_saves, iteration=20)
    assert seen == ["10"] and checkpoint.open(two_saves).iteration == 20


def test_error_descriptions_dig_out_the_os_error():
    import errno

    inner = OSError(errno.EACCES, "Permission denied", "/ck/iter_0000002.incomplete/common.pt")
    try:
        try:
            raise inner
        except OSError as err:
            raise RuntimeError("Worker failure: boom") from err
    except RuntimeError as wrapped:
        outer = wrapped

    class CheckpointException(Exception):  # torch's: each rank's (exception, traceback)
        def __init__(self, failures):
            super().__init__("CheckpointException ranks:dict_keys([0])\nTraceback ...")
            self.failures = failures

    assert checkpoint._describe(CheckpointException({3: (outer, "tb")})) == (2, str(inner), 3)
    assert checkpoint._describe(CheckpointException({}))[0] == 0  # others only heard of it
    assert checkpoint._describe(EOFError("Ran out of input")) == (
        1, "EOFError: Ran out of input", None)
    # the writer's OSError crossed to the coordinator rank without its cause
    crossed = RuntimeError(f"Worker failure: {inner}")
    assert checkpoint._describe(CheckpointException({1: (crossed, "tb")})) == (2, str(inner), 1)

    # megatron-core 0.19: the exception keeps the class only; the OS error is in its log
    bare = RuntimeError("Worker failure: An error is caught while starting worker 0, "
                        "error: <class 'OSError'>")
    logged = [f"Local worker 0 encountered an error: {inner}"]
    assert checkpoint._describe(bare, logged) == (2, str(inner), None)


def test_logged_errors_come_back_from_a_forked_writer():
    import logging
    import multiprocessing

    logged = checkpoint._LoggedErrors()
    source = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")
    with logged:  # attached while the writer forks, as in an async save
        source.warning("not an error")
        writer = multiprocessing.get_context("fork").Process(
            target=source.error, args=("Local worker 0 encountered an error:\n[Errno 28] x",))
        writer.start()
    writer.join(10)
    source.error("after the save: not this save's")
    assert writer.exitcode == 0
    assert logged.lines() == ["Local worker 0 encountered an error: [Errno 28] x"]
    assert logged.lines() == []


# ----------------------------------------------------------------------------------------
# Retention
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep_last,retain,expected", [
    (None, None, list(range(2, 31, 2))),
    (3, None, [26, 28, 30]),
    (None, 8, [8, 16, 24, 30]),          # Megatron-LM's --save-retain-interval: + the newest
    (3, 8, [8, 16, 24, 26, 28, 30]),
    (1, 10, [10, 20, 30]),
])
def test_retention_rule(keep_last, retain, expected):
    assert checkpoint.retained(list(range(2, 31, 2)), 30, keep_last, retain) == expected
    # iterations after the one just saved belong to an abandoned branch: never counted
    assert checkpoint.retained([2, 4, 6, 40], 6, 2, None) == [4, 6]


def test_apply_retention_deletes_only_what_the_rule_drops(megatron_cpu, tmp_path):
    root = str(tmp_path / "ck")
    model = build_model(CFG)
    for it in (2, 4, 6, 8):
        checkpoint.save_model(model, CFG, root, iteration=it)
    checkpoint.files.write_text(os.path.join(root, checkpoint.TRACKER_FILE), "4\n")
    os.makedirs(os.path.join(root, "iter_0000003.incomplete"))
    os.makedirs(os.path.join(root, "iter_0000002.deleting"))
    deleted, problems = checkpoint.apply_retention(root, 6, 1, None)
    assert not problems
    assert sorted(os.path.basename(d) for d in deleted) == [
        "iter_0000002", "iter_0000002.deleting", "iter_0000003.incomplete"]
    # kept: 4 (the tracker's), 6 (the newest up to 6), 8 (after 6: not this rule's to judge)
    assert sorted(os.listdir(root)) == ["iter_0000004", "iter_0000006", "iter_0000008",
                                        checkpoint.TRACKER_FILE]


def test_a_save_that_cannot_fit_is_refused_before_writing(two_saves, monkeypatch):
    """Rank 0 compares the free space with the previous checkpoint's size first."""
    class Full:
        f_bavail, f_frsize = 10, 4096  # 40 KiB free

    monkeypatch.setattr(checkpoint.os, "statvfs", lambda path: Full())
    before = sorted(os.listdir(two_saves))
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot save iteration 30 to .*: "
                       r"0.0 MiB free on its file system, and the previous checkpoint "
                       r".*iter_0000020 took .* MiB: free some space"):
        checkpoint.save_model(build_model(CFG), CFG, two_saves, iteration=30)
    assert sorted(os.listdir(two_saves)) == before

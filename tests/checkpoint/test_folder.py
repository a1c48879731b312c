"""Complete, incomplete, damaged: which iterations a load may pick (issue 18)."""

import os

import pytest

from megatron_anchor import checkpoint, files


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
    files.write_json(os.path.join(newest, checkpoint.MANIFEST_FILE), manifest)
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

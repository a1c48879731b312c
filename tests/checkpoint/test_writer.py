"""Saving one iteration: complete or not at all, and a failure is one line."""

import os

import pytest

from megatron_anchor import checkpoint
from megatron_anchor.checkpoint import folder, writer
from megatron_anchor.model import build_model
from tests.checkpoint.conftest import CFG


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
    remove = folder.remove_tree

    def spy(path):
        seen.append(open(os.path.join(two_saves, checkpoint.TRACKER_FILE)).read().strip())
        remove(path)

    monkeypatch.setattr(writer, "remove_tree", spy)  # the writer's own name for it
    checkpoint.save_model(build_model(CFG), CFG, two_saves, iteration=20)
    assert seen == ["10"] and checkpoint.open(two_saves).iteration == 20


def test_a_save_that_cannot_fit_is_refused_before_writing(two_saves, monkeypatch):
    """Rank 0 compares the free space with the previous checkpoint's size first."""
    class Full:
        f_bavail, f_frsize = 10, 4096  # 40 KiB free

    monkeypatch.setattr(os, "statvfs", lambda path: Full())
    before = sorted(os.listdir(two_saves))
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot save iteration 30 to .*: "
                       r"0.0 MiB free on its file system, and the previous checkpoint "
                       r".*iter_0000020 took .* MiB: free some space"):
        checkpoint.save_model(build_model(CFG), CFG, two_saves, iteration=30)
    assert sorted(os.listdir(two_saves)) == before

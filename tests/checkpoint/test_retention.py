"""Retention: --keep-last-checkpoints and --save-retain-interval."""

import os

import pytest

from megatron_anchor import checkpoint, files
from megatron_anchor.model import build_model
from tests.checkpoint.conftest import CFG


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
    files.write_text(os.path.join(root, checkpoint.TRACKER_FILE), "4\n")
    os.makedirs(os.path.join(root, "iter_0000003.incomplete"))
    os.makedirs(os.path.join(root, "iter_0000002.deleting"))
    deleted, problems = checkpoint.apply_retention(root, 6, 1, None)
    assert not problems
    assert sorted(os.path.basename(d) for d in deleted) == [
        "iter_0000002", "iter_0000002.deleting", "iter_0000003.incomplete"]
    # kept: 4 (the tracker's), 6 (the newest up to 6), 8 (after 6: not this rule's to judge)
    assert sorted(os.listdir(root)) == ["iter_0000004", "iter_0000006", "iter_0000008",
                                        checkpoint.TRACKER_FILE]

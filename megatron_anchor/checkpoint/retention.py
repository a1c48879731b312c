"""Retention for long runs (`--keep-last-checkpoints K`, `--save-retain-interval N`): which
iterations stay, and deleting the others so that a half-deleted one never looks complete."""

from __future__ import annotations

import os
import shutil
from typing import List, Optional, Tuple

from megatron_anchor.checkpoint.folder import (
    DELETING_SUFFIX, LEFTOVER_DIR, list_iterations, remove_tree, tracker_target)


def retained(iterations: List[int], newest: int, keep_last: Optional[int],
             retain_interval: Optional[int]) -> List[int]:
    """The iterations the retention rule keeps, given the complete ones up to `newest`
    (the one just saved): the newest `keep_last` (1 when only `retain_interval` is given:
    Megatron-LM's --save-retain-interval keeps the last checkpoint), every multiple of
    `retain_interval`, and everything when neither is set."""
    upto = sorted(i for i in iterations if i <= newest)
    if keep_last is None and retain_interval is None:
        return upto
    keep = set(upto[-(keep_last or 1):])
    if retain_interval:
        keep |= {i for i in upto if i % retain_interval == 0}
    return sorted(keep)


def apply_retention(root: str, newest: int, keep_last: Optional[int],
                    retain_interval: Optional[int]) -> Tuple[List[str], List[str]]:
    """After iteration `newest` was saved completely: delete the complete iterations up to
    it that the rule drops (never the tracker's, never a later one: those belong to a run
    that was resumed from an earlier iteration and are replaced as it reaches them) and the
    leftovers of saves that died before it. Rank 0 only. Returns (deleted, problems)."""
    deleted, problems = [], []
    complete = dict(list_iterations(root))
    keep = set(retained(list(complete), newest, keep_last, retain_interval))
    tracker = tracker_target(root)
    doomed = []  # leftovers first: removing an iteration reuses its ".deleting" name
    for name in sorted(os.listdir(root)):
        leftover = LEFTOVER_DIR.match(name)
        if leftover and leftover.group(2) and (int(leftover.group(2)) < newest or
                                               leftover.group(3) == DELETING_SUFFIX):
            doomed.append(os.path.join(root, name))
    doomed += [complete[i] for i in sorted(complete) if i <= newest and i not in keep
               and os.path.abspath(complete[i]) != os.path.abspath(tracker or "")]
    for path in doomed:
        try:
            if path.endswith(DELETING_SUFFIX):
                shutil.rmtree(path)
            else:
                remove_tree(path)
            deleted.append(path)
        except OSError as err:
            problems.append(f"could not delete {path}: {err}")
    return deleted, problems

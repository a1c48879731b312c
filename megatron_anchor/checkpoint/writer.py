"""Saving one iteration, collectively, complete or not at all: into `ITER.incomplete/`, then
the manifest, the rename and the tracker (`IterationWriter`); every phase ends with the
ranks agreeing on their errors. `save_model` is the weights-only save of importers and
converters; trainer saves are in `training_state`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import time
from typing import Callable, Dict, Optional, Tuple

import torch

from megatron_anchor import files, runtime
from megatron_anchor.checkpoint.failures import (
    NOT_OURS, LoggedErrors, PeerFailureWatch, describe, exchange, side_group)
from megatron_anchor.checkpoint.folder import (
    INCOMPLETE_SUFFIX, MANIFEST_FILE, MANIFEST_FORMAT, MODEL_CONFIG_FILE, TOKENIZER_DIR,
    TOKENIZER_FILES, TRACKER_FILE, CheckpointError, iteration_dir, list_iterations,
    newest_complete, read_manifest, remove_tree, tracker_target)

_SAVES = [0]  # saves started in this process: the same count on every rank (collective)


def _walk(directory: str) -> Dict[str, int]:
    out = {}
    for folder, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, directory)
            if rel != MANIFEST_FILE and not name.startswith(".") or name == ".metadata":
                out[rel.replace(os.sep, "/")] = os.path.getsize(path)
    return out


def _bytes_text(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


class IterationWriter:
    """One iteration saved by every rank: `begin`, `write` (each rank), `commit` (rank 0);
    every phase ends with the ranks exchanging their errors, so a failure anywhere is the
    same one-line `CheckpointError` everywhere, after the partial directory is removed."""

    def __init__(self, root: str, iteration, contents: Tuple[str, ...]):
        self.root = os.path.abspath(root)
        self.iteration = iteration
        self.final = iteration_dir(self.root, iteration)
        self.staging = self.final + INCOMPLETE_SUFFIX
        self.contents = contents
        _SAVES[0] += 1
        self.watch = PeerFailureWatch(_SAVES[0])
        self.logged = LoggedErrors()
        if runtime.world_size() > 1 and torch.distributed.is_initialized():
            side_group()  # before any rank can fail

    def _fail_text(self, rank: int, text: str) -> str:
        where = f" (rank {rank})" if runtime.world_size() > 1 else ""
        previous = newest_complete(self.root)
        kept = (f"the newest complete checkpoint is still {previous}" if previous else
                "no earlier checkpoint exists there")
        return (f"cannot save iteration {self.iteration} to {self.root}: {text}{where}; "
                f"nothing earlier was touched ({kept})")

    def phase(self, body: Callable[[], None], ranks: str = "all") -> None:
        """Run `body` on every rank (`ranks="all"`) or rank 0, then agree."""
        error = None
        if ranks == "all" or runtime.is_rank0():
            try:
                with self.logged:
                    body()
            except NOT_OURS:
                raise
            except BaseException as err:  # noqa: BLE001 (disk full, permission; torch's
                # CheckpointException derives from BaseException)
                telling, text, where = describe(err, self.logged.lines())
                where = runtime.rank() if where is None else where
                error = (telling, text, where)
                self.watch.post(self._fail_text(where, text))
        failed = exchange(error)
        if failed:
            _, text, where = max((e for _, e in failed), key=lambda e: e[0])
            self.abort()
            raise CheckpointError(self._fail_text(where, text))

    def abort(self) -> None:
        """Remove the partial directory (rank 0; what cannot be removed keeps its
        `.incomplete` name, which nothing picks)."""
        if runtime.is_rank0():
            with contextlib.suppress(OSError):
                shutil.rmtree(self.staging)

    def begin(self) -> None:
        def prepare():
            if os.path.exists(self.staging):  # left by a save that died
                shutil.rmtree(self.staging)
            os.makedirs(self.staging)
            previous = newest_complete(self.root)
            if previous and read_manifest(previous):
                needed = sum(read_manifest(previous)["files"].values())
                stat = os.statvfs(self.root)
                free = stat.f_bavail * stat.f_frsize
                if free < needed:
                    raise CheckpointError(
                        f"{_bytes_text(free)} free on its file system, and the previous "
                        f"checkpoint {previous} took {_bytes_text(needed)}: free some space "
                        "(or keep fewer: --keep-last-checkpoints, --save-retain-interval)")
        self.phase(prepare, ranks="rank0")

    def commit(self, small_files: Callable[[str], None]) -> str:
        """Rank 0: the small files, the manifest, the rename, the tracker. Collective."""
        def finish():
            small_files(self.staging)
            manifest = {"format": MANIFEST_FORMAT, "iteration": self.iteration,
                        "world_size": runtime.world_size(), "contents": list(self.contents),
                        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "files": dict(sorted(_walk(self.staging).items()))}
            files.write_json(os.path.join(self.staging, MANIFEST_FILE), manifest)
            self._replace_final()
            os.rename(self.staging, self.final)
            files.fsync_directory(self.root)
            files.write_text(os.path.join(self.root, TRACKER_FILE),
                             "release\n" if self.iteration in (None, "release")
                             else f"{int(self.iteration)}\n")
        self.phase(finish, ranks="rank0")
        return self.final

    def _replace_final(self) -> None:
        """An iteration saved again (a run resumed from an older --ckpt-step): the tracker
        must never point at a directory being replaced, so point it at the newest complete
        iteration before this one first."""
        if not os.path.exists(self.final):
            return
        target = tracker_target(self.root)
        if target and os.path.abspath(target) == self.final:
            before = [i for i, _ in list_iterations(self.root)
                      if self.iteration in (None, "release") or i < int(self.iteration)]
            tracker = os.path.join(self.root, TRACKER_FILE)
            if before:
                files.write_text(tracker, f"{before[-1]}\n")
            else:
                os.remove(tracker)
        remove_tree(self.final)


def copy_tokenizer(source: Optional[str], root: str) -> None:
    """Copy a tokenizer (a file, with the known tokenizer files beside it, or a folder)."""
    if not source:
        return
    folder = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    found = [os.path.join(folder, n) for n in TOKENIZER_FILES]
    found += glob.glob(os.path.join(folder, "*.model"))
    if os.path.isfile(source):
        found = [source] + [f for f in found if os.path.basename(f) in TOKENIZER_FILES[1:3]]
    found = [f for f in dict.fromkeys(found) if os.path.isfile(f)]
    if not found:
        raise CheckpointError(f"{source}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    target = os.path.join(root, TOKENIZER_DIR)
    for f in found:
        name = os.path.basename(f)
        if f == source and name.endswith(".json") and name not in TOKENIZER_FILES:
            name = "tokenizer.json"  # a tokenizers file under another name
        dest = os.path.join(target, name)
        if os.path.abspath(f) != os.path.abspath(dest):
            files.copy_file(f, dest)


def save_model(model, model_config, root: str, iteration=None, *,
               tokenizer_dir: Optional[str] = None, extra_json: Optional[dict] = None) -> str:
    """Weights only (importers, converters): `ROOT/release` or `ROOT/iter_N`. Collective.

    `extra_json` maps file names to JSON-able values written next to the model config.
    Complete once renamed into place with its manifest; the tracker follows.
    """
    from megatron.core import dist_checkpointing

    writer = IterationWriter(root, iteration, contents=("model",))
    with writer.watch:
        writer.begin()
        writer.phase(lambda: dist_checkpointing.save({"model": model.sharded_state_dict()},
                                                     writer.staging))

        def small_files(directory):
            copy_tokenizer(tokenizer_dir, writer.root)
            files.write_text(os.path.join(directory, MODEL_CONFIG_FILE),
                             model_config.to_json() + "\n")
            for name, value in (extra_json or {}).items():
                files.write_json(os.path.join(directory, name), value)
        return writer.commit(small_files)

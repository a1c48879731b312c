"""A checkpoint root on disk: its names, its tracker, and which of its iterations are
complete, unfinished or damaged. Nothing here reads weights (`handle`) or writes them
(`writer`); everything that decides whether a directory may be loaded is here.

An `iter_NNNNNNN` directory is complete by construction (a save renames it into place after
writing its manifest); a `*.incomplete` one is a save in progress or one that died, and
nothing picks it. A complete iteration whose files no longer match its manifest is damaged.
Iterations saved before manifests existed are judged by the rule of the code that wrote
them (`_legacy_complete`).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from typing import List, Optional, Tuple

from megatron_anchor.errors import UserError

TRACKER_FILE = "latest_checkpointed_iteration.txt"
MANIFEST_FILE = "manifest.json"
MODEL_CONFIG_FILE = "model_config.json"
TRAIN_CONFIG_FILE = "train_config.json"
TRAIN_STATE_FILE = "train_state.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt")
# dist_checkpointing's own files (torch_dist): what a pre-manifest iteration must hold.
# (common.pt is not among them: megatron-core 0.19 writes none when the common state is
# empty, as in a model-only save.)
DIST_METADATA_FILES = ("metadata.json", ".metadata")
INCOMPLETE_SUFFIX = ".incomplete"   # a save in progress, or one that died
DELETING_SUFFIX = ".deleting"       # retention renames before it removes
MANIFEST_FORMAT = 1
ITERATION_DIR = re.compile(r"^iter_(\d{7})$")
LEFTOVER_DIR = re.compile(r"^(iter_(\d{7})|release)(\.incomplete|\.deleting)$")


class CheckpointError(UserError):
    """A path that is not a usable checkpoint, a save that failed, or a flag that
    contradicts a checkpoint."""


def iteration_dir(root: str, iteration) -> str:
    name = "release" if iteration in (None, "release") else f"iter_{int(iteration):07d}"
    return os.path.join(root, name)


def iteration_of(path: str) -> Optional[int]:
    """N of an `iter_NNNNNNN` directory (None for `release` and other names)."""
    match = ITERATION_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def looks_like_iteration_dir(path: str) -> bool:
    """A directory holding one iteration's files (complete or not)."""
    return any(os.path.isfile(os.path.join(path, name))
               for name in (MANIFEST_FILE, "metadata.json", MODEL_CONFIG_FILE))


def root_of_iteration_dir(path: str) -> str:
    """The folder holding a standard iteration directory; a directory of another name is
    its own root."""
    path = os.path.abspath(path)
    name = os.path.basename(path)
    standard = iteration_of(path) is not None or name == "release" or \
        LEFTOVER_DIR.match(name) is not None
    return os.path.dirname(path) if standard else path


def _tracker_text(root: str) -> Optional[str]:
    tracker = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(tracker):
        return None
    try:
        with io.open(tracker, encoding="utf-8") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{tracker}: unreadable ({err})") from None
    if text != "release" and not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration number or 'release', "
                              f"found {text[:40]!r}")
    return text


def tracker_target(root: str) -> Optional[str]:
    text = _tracker_text(root)
    return None if text is None else iteration_dir(root, text)


def read_json(path: str):
    try:
        with io.open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None


def read_manifest(path: str) -> Optional[dict]:
    """The manifest of an iteration directory, None before manifests existed."""
    manifest_file = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(manifest_file):
        return None
    manifest = read_json(manifest_file)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{manifest_file}: not a megatron-anchor manifest")
    return manifest


def _legacy_complete(path: str) -> bool:
    """The completeness rule of the code that saved before manifests: dist_checkpointing
    wrote metadata.json last, then (after a barrier) model_config.json, and trainer saves
    train_config.json before train_state.json."""
    has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
    return has("metadata.json") and has(MODEL_CONFIG_FILE) and \
        (has(TRAIN_STATE_FILE) or not has(TRAIN_CONFIG_FILE))


def is_complete(path: str) -> bool:
    """Whether `path` is an iteration whose save finished (its files are not checked here:
    `open` does that)."""
    if not os.path.isdir(path) or LEFTOVER_DIR.match(os.path.basename(os.path.normpath(path))):
        return False
    return os.path.isfile(os.path.join(path, MANIFEST_FILE)) or _legacy_complete(path)


def _damage(path: str, manifest: Optional[dict]) -> Optional[str]:
    """What is wrong with the files of a complete iteration, or None."""
    if manifest is None:
        missing = [n for n in DIST_METADATA_FILES + (MODEL_CONFIG_FILE,)
                   if not os.path.isfile(os.path.join(path, n))]
        return f"{missing[0]} is missing" if missing else None
    for name, size in sorted(manifest["files"].items()):
        try:
            have = os.path.getsize(os.path.join(path, name))
        except FileNotFoundError:
            return f"{name} is missing (the manifest lists {size} bytes)"
        except OSError as err:
            return f"{name}: {err.strerror}"
        if have != size:
            return (f"{name} is truncated ({have} of {size} bytes)" if have < size else
                    f"{name} has {have} bytes, {size} when it was saved")
    for name in (TRAIN_STATE_FILE, TRAIN_CONFIG_FILE, "metadata.json"):
        if name in manifest["files"]:
            try:
                with io.open(os.path.join(path, name), encoding="utf-8") as f:
                    json.load(f)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                return f"{name} is unreadable JSON ({err})"
    return None


def list_iterations(root: str) -> List[Tuple[int, str]]:
    """Complete saved iterations under a checkpoint root, ascending."""
    if not os.path.isdir(root):
        raise CheckpointError(f"{root}: no such checkpoint directory")
    found = []
    for name in os.listdir(root):
        match = ITERATION_DIR.match(name)
        path = os.path.join(root, name)
        if match and is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def unfinished_saves(root: str) -> List[str]:
    """Iteration directories under `root` whose save did not finish, oldest first: the
    `*.incomplete` directories of this code and incomplete pre-manifest `iter_N`s."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            continue
        leftover = LEFTOVER_DIR.match(name)
        if (leftover and leftover.group(3) == INCOMPLETE_SUFFIX) or \
                (ITERATION_DIR.match(name) and not is_complete(path)):
            out.append(path)
    return out


def newest_complete(root: Optional[str]) -> Optional[str]:
    """The iteration a `--load root` resumes from (the tracker's when complete), or None."""
    if not root or not os.path.isdir(root):
        return None
    try:
        target = tracker_target(root)
    except CheckpointError:
        target = None
    if target and is_complete(target):
        return target
    found = list_iterations(root)
    return found[-1][1] if found else None


def older_hint(root: str, below: Optional[int]) -> str:
    older = [i for i, _ in list_iterations(root) if below is None or i < below] \
        if os.path.isdir(root) else []
    if not older:
        return f"no older complete iteration under {root}"
    shown = ", ".join(map(str, older[-5:]))
    more = f" and {len(older) - 5} earlier" if len(older) > 5 else ""
    return f"older complete iterations under {root}: {shown}{more} (--ckpt-step N loads one)"


def check_files(path: str) -> Optional[dict]:
    """The manifest of the complete iteration `path` after checking its files (one-line
    `CheckpointError` naming the file otherwise)."""
    manifest = read_manifest(path)
    problem = _damage(path, manifest)
    if problem:
        raise CheckpointError(f"{path}: {problem}: the checkpoint is damaged; "
                              f"{older_hint(root_of_iteration_dir(path), iteration_of(path))}")
    return manifest


def resolve(path: str, step: Optional[int]) -> str:
    """The complete iteration directory for a root (its tracker, or `step`) or an
    iteration directory."""
    if not path or not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if step is not None:
        root = root_of_iteration_dir(path) if looks_like_iteration_dir(path) else path
        target = iteration_dir(root, step)
        if not is_complete(target):
            have = ", ".join(str(i) for i, _ in list_iterations(root)) or "none"
            raise CheckpointError(f"--ckpt-step {step}: {target} is missing or incomplete "
                                  f"(complete iterations under {root}: {have})")
        return target
    if LEFTOVER_DIR.match(os.path.basename(os.path.normpath(path))) or \
            (looks_like_iteration_dir(path) and not is_complete(path)):
        root = root_of_iteration_dir(path)
        raise CheckpointError(f"{path}: an unfinished save (it was never completed); "
                              f"{older_hint(root, None)}")
    if looks_like_iteration_dir(path):
        return path
    target = tracker_target(path)
    if target is None:
        if list_iterations(path):
            raise CheckpointError(f"{path}: no {TRACKER_FILE}; {older_hint(path, None)}")
        raise CheckpointError(
            f"{path}: not a checkpoint (no {TRACKER_FILE} and no dist_checkpointing "
            "metadata.json); pass a --save directory of a run or one iter_NNNNNNN directory")
    if not is_complete(target):
        raise CheckpointError(f"{path}: {TRACKER_FILE} points at {target}, which is missing "
                              f"or incomplete; {older_hint(path, iteration_of(target))}")
    return target


def remove_tree(path: str) -> None:
    """Rename out of the way (atomic: a half-deleted directory never looks complete), then
    remove."""
    if not os.path.exists(path):
        return
    doomed = path + DELETING_SUFFIX
    if os.path.exists(doomed):
        shutil.rmtree(doomed)
    os.rename(path, doomed)
    shutil.rmtree(doomed)

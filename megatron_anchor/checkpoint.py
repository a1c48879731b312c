"""Checkpoints: the one module that knows the on-disk layout. Every `--load` goes through it.

Layout of a checkpoint root (Megatron-LM's names, so its tools find their way)::

    ROOT/latest_checkpointed_iteration.txt    the newest complete checkpoint ("100", "release")
    ROOT/iter_0000100/ (or ROOT/release/)      Megatron-Core dist_checkpointing (torch_dist):
        model.*, optimizer.*                   sharded tensors with global shapes (TP/CP-free)
        common.pt                              LR scheduler state, iteration
        model_config.json                      ModelConfig: the architecture, always from here
        train_config.json, train_state.json    trainer runs: the run's config; data position
        rng/rank_00000.pt                      trainer runs: every rank's RNG states
        manifest.json                          written last: every file above with its size
    ROOT/tokenizer/                            the tokenizer files the model was trained with

**Complete, incomplete, damaged** (docs/checkpoints.md, design §11). A save writes everything
into `ROOT/iter_0000100.incomplete/`, then `manifest.json` (every file of the iteration and
its size), then renames the directory to `iter_0000100`, then points the tracker at it. So
an `iter_NNNNNNN` directory is complete by construction, and a save that dies half-way
leaves only a `*.incomplete` directory that nothing ever picks. A complete iteration whose
files no longer match its manifest (a truncated or missing shard, unreadable JSON) is
damaged: opening it is one line naming the file and the older complete iterations.
Iterations saved before manifests existed are accepted by the rule of the code that wrote
them (dist_checkpointing's metadata.json and model_config.json, and train_state.json after
train_config.json); their files cannot be checked for truncation, and a read error is still
one line.

A path given to a tool may be the root (its tracker names the iteration; `step` picks
another, Megatron-LM's `--ckpt-step`) or one iteration directory. `open(path)` resolves and
checks it once into a `Checkpoint`, the handle every tool passes on: the iteration directory,
the root, the architecture (`model_config.json`, read once) and the tokenizer saved with it.
Weights are global tensors, so a checkpoint saved at one TP/CP layout loads at another:
Megatron-Core reshards at load. RNG states are per rank and are restored only when the world
size is the same.

**Saves are collective and fail cleanly.** Every phase of a save ends with the ranks
exchanging their errors (`_IterationWriter`), so a disk that fills up on one rank is the same
one-line `CheckpointError` on all of them, the partial `*.incomplete` directory is removed,
and the previous checkpoints and the tracker are untouched. Where a rank fails inside
dist_checkpointing while the others wait in one of its collectives, a watcher thread ends the
waiting ranks with the same line (`_PeerFailureWatch`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import inspect
import io
import json
import logging
import os
import random
import re
import shutil
import sys
import threading
import time
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from megatron_anchor import files, runtime
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
_ITERATION_DIR = re.compile(r"^iter_(\d{7})$")
_LEFTOVER_DIR = re.compile(r"^(iter_(\d{7})|release)(\.incomplete|\.deleting)$")

# ModelConfig fields a caller may change at load: they decide how, not what, is computed.
RUNTIME_FIELDS = ("attention_backend", "rope_fp32", "bf16", "sequence_parallel",
                  "cp_comm_type", "max_sequence_length", "recompute_granularity",
                  "recompute_method", "recompute_num_layers", "recompute_modules")

# How long a rank waits inside dist_checkpointing after another rank's save failed before it
# gives up with that rank's error (the failed rank is no longer in the collective it waits in).
PEER_FAILURE_GRACE_S = 30.0


# What a checkpoint failure never swallows. torch.distributed.checkpoint's
# CheckpointException derives from BaseException, so the handlers below catch that and let
# only these through.
_NOT_OURS = (KeyboardInterrupt, SystemExit, GeneratorExit)


class CheckpointError(UserError):
    """A path that is not a usable checkpoint, a save that failed, or a flag that
    contradicts a checkpoint."""


# ----------------------------------------------------------------------------------------
# Where things are
# ----------------------------------------------------------------------------------------

def iteration_dir(root: str, iteration) -> str:
    name = "release" if iteration in (None, "release") else f"iter_{int(iteration):07d}"
    return os.path.join(root, name)


def iteration_of(path: str) -> Optional[int]:
    """N of an `iter_NNNNNNN` directory (None for `release` and other names)."""
    match = _ITERATION_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def _looks_like_iteration_dir(path: str) -> bool:
    """A directory holding one iteration's files (complete or not)."""
    return any(os.path.isfile(os.path.join(path, name))
               for name in (MANIFEST_FILE, "metadata.json", MODEL_CONFIG_FILE))


def _root_of_iteration_dir(path: str) -> str:
    """The folder holding a standard iteration directory; a directory of another name is
    its own root."""
    path = os.path.abspath(path)
    name = os.path.basename(path)
    standard = iteration_of(path) is not None or name == "release" or \
        _LEFTOVER_DIR.match(name) is not None
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


def _tracker_target(root: str) -> Optional[str]:
    text = _tracker_text(root)
    return None if text is None else iteration_dir(root, text)


def _read_json(path: str):
    try:
        with io.open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None


# ----------------------------------------------------------------------------------------
# Complete, incomplete, damaged
# ----------------------------------------------------------------------------------------

def _read_manifest(path: str) -> Optional[dict]:
    """The manifest of an iteration directory, None before manifests existed."""
    manifest_file = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(manifest_file):
        return None
    manifest = _read_json(manifest_file)
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
    if not os.path.isdir(path) or _LEFTOVER_DIR.match(os.path.basename(os.path.normpath(path))):
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
        match = _ITERATION_DIR.match(name)
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
        leftover = _LEFTOVER_DIR.match(name)
        if (leftover and leftover.group(3) == INCOMPLETE_SUFFIX) or \
                (_ITERATION_DIR.match(name) and not is_complete(path)):
            out.append(path)
    return out


def newest_complete(root: Optional[str]) -> Optional[str]:
    """The iteration a `--load root` resumes from (the tracker's when complete), or None."""
    if not root or not os.path.isdir(root):
        return None
    try:
        target = _tracker_target(root)
    except CheckpointError:
        target = None
    if target and is_complete(target):
        return target
    found = list_iterations(root)
    return found[-1][1] if found else None


def _older_hint(root: str, below: Optional[int]) -> str:
    older = [i for i, _ in list_iterations(root) if below is None or i < below] \
        if os.path.isdir(root) else []
    if not older:
        return f"no older complete iteration under {root}"
    shown = ", ".join(map(str, older[-5:]))
    more = f" and {len(older) - 5} earlier" if len(older) > 5 else ""
    return f"older complete iterations under {root}: {shown}{more} (--ckpt-step N loads one)"


def _check_files(path: str) -> Optional[dict]:
    """The manifest of the complete iteration `path` after checking its files (one-line
    `CheckpointError` naming the file otherwise)."""
    manifest = _read_manifest(path)
    problem = _damage(path, manifest)
    if problem:
        raise CheckpointError(f"{path}: {problem}: the checkpoint is damaged; "
                              f"{_older_hint(_root_of_iteration_dir(path), iteration_of(path))}")
    return manifest


def _resolve(path: str, step: Optional[int]) -> str:
    """The complete iteration directory for a root (its tracker, or `step`) or an
    iteration directory."""
    if not path or not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if step is not None:
        root = _root_of_iteration_dir(path) if _looks_like_iteration_dir(path) else path
        target = iteration_dir(root, step)
        if not is_complete(target):
            have = ", ".join(str(i) for i, _ in list_iterations(root)) or "none"
            raise CheckpointError(f"--ckpt-step {step}: {target} is missing or incomplete "
                                  f"(complete iterations under {root}: {have})")
        return target
    if _LEFTOVER_DIR.match(os.path.basename(os.path.normpath(path))) or \
            (_looks_like_iteration_dir(path) and not is_complete(path)):
        root = _root_of_iteration_dir(path)
        raise CheckpointError(f"{path}: an unfinished save (it was never completed); "
                              f"{_older_hint(root, None)}")
    if _looks_like_iteration_dir(path):
        return path
    target = _tracker_target(path)
    if target is None:
        if list_iterations(path):
            raise CheckpointError(f"{path}: no {TRACKER_FILE}; {_older_hint(path, None)}")
        raise CheckpointError(
            f"{path}: not a checkpoint (no {TRACKER_FILE} and no dist_checkpointing "
            "metadata.json); pass a --save directory of a run or one iter_NNNNNNN directory")
    if not is_complete(target):
        raise CheckpointError(f"{path}: {TRACKER_FILE} points at {target}, which is missing "
                              f"or incomplete; {_older_hint(path, iteration_of(target))}")
    return target


def with_runtime_fields(config, **overrides):
    """`config` with fields that do not touch the weights changed."""
    bad = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if bad:
        raise CheckpointError(f"cannot override {', '.join(bad)} at load: the architecture "
                              "comes from the checkpoint")
    return dataclasses.replace(config, **overrides)


def _read_model_config(directory: str):
    from megatron_anchor.model import ModelConfig

    config_file = os.path.join(directory, MODEL_CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise CheckpointError(f"{directory}: no {MODEL_CONFIG_FILE}; it was not written by "
                              "megatron-anchor (the architecture cannot be known)")
    try:
        return ModelConfig.from_dict(_read_json(config_file))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_file}: {err}") from None


# ----------------------------------------------------------------------------------------
# The handle
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One checkpoint iteration, resolved, checked and read once (`open`); every tool
    carries this."""

    path: str                      # the iteration directory
    root: str                      # the folder holding it (and the tokenizer, the tracker)
    iteration: Optional[int]       # None for ROOT/release
    model_config: object           # ModelConfig: the architecture, always from here
    tokenizer_dir: Optional[str]   # ROOT/tokenizer, if the tokenizer was saved with it
    manifest: Optional[dict] = None  # None: saved before manifests (files not size-checked)

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    @property
    def has_training_state(self) -> bool:
        return os.path.isfile(os.path.join(self.path, TRAIN_STATE_FILE))

    @property
    def has_optimizer_state(self) -> bool:
        """Saved without --no-save-optim (pre-manifest trainer saves always were)."""
        if self.manifest is None:
            return self.has_training_state
        return "optimizer" in self.manifest.get("contents", ())

    def json_file(self, name: str) -> Optional[dict]:
        """A JSON file saved next to the weights (train_config.json, an import summary...)."""
        path = os.path.join(self.path, name)
        return _read_json(path) if os.path.isfile(path) else None

    def architecture(self, flags: Optional[dict] = None, **runtime_fields):
        """The checkpoint's architecture with the run's own choices (`RUNTIME_FIELDS`).

        `flags` maps ModelConfig fields to architecture flags the user gave (None: not
        given); the first one that contradicts the checkpoint is a one-line error.
        """
        for name, wanted in (flags or {}).items():
            if wanted is None or name in RUNTIME_FIELDS:
                continue
            have = getattr(self.model_config, name)
            if have != wanted:
                flag = "--" + name.replace("_", "-")
                raise CheckpointError(f"{flag} {wanted} contradicts the checkpoint {self.path} "
                                      f"({name} = {have}); drop the flag, the architecture "
                                      "comes from the checkpoint")
        return with_runtime_fields(self.model_config, **runtime_fields)

    def _check_architecture(self, config) -> None:
        saved = dataclasses.asdict(self.model_config)
        for name, value in dataclasses.asdict(config).items():
            if name not in RUNTIME_FIELDS and saved.get(name) != value:
                raise CheckpointError(f"{self.path}: {name} = {saved.get(name)} in the "
                                      f"checkpoint, {value} in the model to load it into")

    @contextlib.contextmanager
    def reading(self):
        """Any failure to read this checkpoint (torch's unpickler, dist_checkpointing) is one
        line naming its directory and the older complete iterations."""
        try:
            yield
        except (UserError,) + _NOT_OURS:
            raise
        except BaseException as err:  # noqa: BLE001 (torch's CheckpointException is one)
            raise CheckpointError(
                f"{self.path}: cannot read the checkpoint ({_describe(err)[1]}); "
                f"{_older_hint(self.root, self.iteration)}") from None

    def load_weights(self, model) -> None:
        """Load the weights into `model` (built on the current TP/CP layout). Collective."""
        from megatron.core import dist_checkpointing

        with self.reading():
            loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, self.path)
            model.load_state_dict(loaded["model"])

    def load_model(self, config=None, *, tp: Optional[int] = None, cp: Optional[int] = None,
                   cpu: Optional[bool] = None, **runtime_fields):
        """The model of `config` holding these weights, in eval mode. `config` defaults to
        `architecture(**runtime_fields)`: the checkpoint's, with run-time changes.

        Built on the current TP/CP layout; if Megatron's parallel state is not initialised
        yet, a single-process one (or `tp`×`cp`) is set up, on CPU when no GPU is visible.
        """
        from megatron.core import parallel_state

        from megatron_anchor.model import build_model

        if config is None:
            config = self.architecture(**runtime_fields)
        elif runtime_fields:
            raise TypeError("give either a config or run-time fields, not both")
        self._check_architecture(config)
        if parallel_state.model_parallel_is_initialized() and tp is None and cp is None:
            runtime.decide_device(cpu)  # the caller's layout, on the device already chosen
        else:
            runtime.ensure_initialized(tp or 1, cp or 1, cpu=cpu)
        # No random init: every weight is overwritten by the checkpoint's.
        model = build_model(config, initialize=False).to(runtime.device())
        self.load_weights(model)
        model.eval()
        return model


def _handle(resolved: str) -> Checkpoint:
    resolved = os.path.abspath(resolved)
    manifest = _check_files(resolved)
    root = _root_of_iteration_dir(resolved)
    tokenizer = os.path.join(root, TOKENIZER_DIR)
    return Checkpoint(path=resolved, root=root, iteration=iteration_of(resolved),
                      model_config=_read_model_config(resolved),
                      tokenizer_dir=tokenizer if os.path.isdir(tokenizer) and
                      os.listdir(tokenizer) else None,
                      manifest=manifest)


def open(path: str, step: Optional[int] = None) -> Checkpoint:  # noqa: A001 (checkpoint.open)
    """Resolve `path` (a root, or one iteration directory) once and check its files; `step`
    picks an iteration of the root other than the tracker's (Megatron-LM's --ckpt-step)."""
    return _handle(_resolve(path, step))


def exists(path: Optional[str]) -> bool:
    """True when `path` holds a complete checkpoint to open (its files are not checked)."""
    if not path or not os.path.isdir(path):
        return False
    if _looks_like_iteration_dir(path):
        return is_complete(path)
    try:
        target = _tracker_target(path)
    except CheckpointError:
        return True  # a tracker there: `open` says what is wrong with it
    return target is not None and is_complete(target)


def open_for_resume(path: Optional[str], step: Optional[int] = None
                    ) -> Tuple[Optional[Checkpoint], List[str]]:
    """The checkpoint `--load path` resumes from (None: nothing saved there yet), and the
    lines to tell the user.

    Unattended restarts (a requeued job) must not stop at a save that died: unfinished saves
    are skipped, and a tracker pointing at a missing or incomplete iteration falls back to
    the newest complete one before it, each said in one line. A damaged complete iteration
    is an error: which older one to take is the user's call (`--ckpt-step`).
    """
    if step is not None:
        ckpt = open(path, step)
        return ckpt, []
    if not path or not os.path.isdir(path):
        return None, []
    if _looks_like_iteration_dir(path) or _LEFTOVER_DIR.match(os.path.basename(
            os.path.normpath(path))):
        return open(path), []
    notes, chosen = [], None
    target = _tracker_target(path)
    complete = list_iterations(path)
    if target is not None and is_complete(target):
        chosen = target
    elif target is not None:
        below = [p for i, p in complete if i < (iteration_of(target) or 0)]
        if not below:
            raise CheckpointError(f"{path}: {TRACKER_FILE} points at {target}, which is "
                                  f"missing or incomplete, and no complete iteration precedes "
                                  "it")
        chosen = below[-1]
        notes.append(f"{TRACKER_FILE} points at {target}, which is missing or incomplete: "
                     f"resuming from {chosen}")
    elif complete:
        chosen = complete[-1][1]
        notes.append(f"{path} has no {TRACKER_FILE}: resuming from its newest complete "
                     f"iteration {chosen}")
    newest = iteration_of(chosen) if chosen else None
    for unfinished in unfinished_saves(path):
        it = iteration_of(os.path.basename(unfinished).split(".")[0])
        if newest is None or it is None or it > newest:
            notes.append(f"skipping {unfinished}: its save did not finish")
    if chosen is None:
        return None, notes
    ckpt = _handle(chosen)
    if ckpt.manifest is None:
        notes.append(f"{chosen} was saved before megatron-anchor wrote manifests: its files "
                     "are not checked for truncation")
    return ckpt, notes


def last(path: str, count: int) -> List[Checkpoint]:
    """The last `count` complete iterations under the root of `path`, oldest first."""
    root = _root_of_iteration_dir(path) if _looks_like_iteration_dir(path) else path
    found = list_iterations(root)
    if len(found) < count:
        raise CheckpointError(f"{root} holds {len(found)} complete iteration(s), "
                              f"{count} asked for")
    return [open(p) for _, p in found[-count:]]


# ----------------------------------------------------------------------------------------
# Errors, from wherever torch and dist_checkpointing raise them, as one line
# ----------------------------------------------------------------------------------------

def _innermost(err: BaseException) -> Tuple[BaseException, Optional[int]]:
    """The exception behind `err`, and the rank it happened on when torch says: its
    CheckpointException holds each failed rank's exception, and dist_checkpointing wraps a
    writer process's OSError in a RuntimeError (whose cause is lost when the exception
    crossed to another rank)."""
    seen, rank = set(), None
    while id(err) not in seen:
        seen.add(id(err))
        failures = getattr(err, "failures", None)
        if isinstance(failures, dict) and failures:
            rank, inner = next(iter(sorted(failures.items(), key=lambda kv: str(kv[0]))))
            err = inner[0] if isinstance(inner, tuple) else inner
            continue
        if isinstance(err, OSError):
            break
        cause = err.__cause__ or err.__context__
        if cause is None:
            break
        err = cause
    return err, rank if isinstance(rank, int) else None


def _describe(err: BaseException, logged: List[str] = ()) -> Tuple[int, str, Optional[int]]:
    """(how telling, one line, the rank it happened on if another one): an OS error (path
    and errno) or our own error says the most; torch's CheckpointException without the
    failures (the ranks that only heard that another one failed) the least. `logged`: the
    errors dist_checkpointing logged meanwhile, where megatron-core 0.19's writer leaves the
    OS error it met (its exception keeps only the class: "error: <class 'OSError'>")."""
    inner, rank = _innermost(err)
    if isinstance(inner, (OSError, UserError)):
        return 2, str(inner), rank
    text = " ".join(str(inner).split()) or type(inner).__name__
    for told in (text, *logged):
        if "[Errno " in told:  # an OS error whose exception object did not reach us
            return 2, told[told.index("[Errno "):][:400], rank
    hearsay = isinstance(getattr(inner, "failures", None), dict) and not inner.failures
    return (0 if hearsay else 1), f"{type(inner).__name__}: {text[:300]}", rank


class _LoggedErrors(logging.Handler):
    """The error lines dist_checkpointing logs during a save, in this process and in the
    writer processes it forks for an async save (megatron-core 0.19's writer leaves the OS
    error it met only in its log: its exception keeps the class alone). Forked writers
    inherit the handler while it is attached; the lines travel back through a pipe."""

    SOURCE = "megatron.core.dist_checkpointing"

    def __init__(self):
        super().__init__(logging.ERROR)
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)  # a full pipe drops lines, never blocks a save
        weakref.finalize(self, _close_fds, self._read, self._write)

    def emit(self, record):
        line = " ".join(record.getMessage().split())[:2000] + "\n"
        with contextlib.suppress(OSError):
            os.write(self._write, line.encode("utf-8", "replace"))

    def __enter__(self):
        logging.getLogger(self.SOURCE).addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger(self.SOURCE).removeHandler(self)

    def lines(self) -> List[str]:
        chunks = []
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := os.read(self._read, 65536):
                chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace").splitlines()


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


_SIDE_GROUP: list = [None, None]  # (the world it belongs to, a gloo group over it)


def _side_group():
    """A gloo group of its own for the error exchange: a rank that left dist_checkpointing
    early must not meet, in the exchange, a collective the other ranks still wait in there.
    Made at the first save (collective, as saves are) of each world."""
    world = torch.distributed.group.WORLD
    if _SIDE_GROUP[0] is not world:
        _SIDE_GROUP[:] = [world, torch.distributed.new_group(backend="gloo")]
    return _SIDE_GROUP[1]


def _exchange(error: Optional[tuple]) -> List[Tuple[int, tuple]]:
    """Every rank's error (rank, (how telling, text, where)); collective in a multi-rank
    run."""
    world = runtime.world_size()
    if world > 1 and torch.distributed.is_initialized():
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, error, group=_side_group())
    else:
        gathered = [error]
    return [(r, e) for r, e in enumerate(gathered) if e is not None]


class _PeerFailureWatch:
    """Ends this rank with another rank's save error when it waits for that rank in vain.

    dist_checkpointing writes some files on rank 0 only (common.pt, .metadata,
    metadata.json), between collectives: when such a write fails, rank 0 leaves the save
    while the other ranks wait in the next collective, where no error can reach them. The
    failing rank posts its error in the job's key-value store (the one torch.distributed
    was set up with); a thread on every rank watches for it during the synchronous parts of
    a save and, once the save has not ended `PEER_FAILURE_GRACE_S` after the post, prints
    the error and exits with status 2 (the exit status of a one-line error).
    """

    def __init__(self, serial: int):
        self._key = f"megatron_anchor/save_failed/{serial}"
        self._store = None
        self._stop = threading.Event()
        self._thread = None
        if runtime.world_size() > 1 and torch.distributed.is_initialized():
            try:
                self._store = torch.distributed.distributed_c10d._get_default_store()
            except (AttributeError, RuntimeError, ValueError):
                self._store = None

    def __enter__(self):
        self._stop = threading.Event()
        if self._store is not None:
            self._thread = threading.Thread(target=self._watch, daemon=True,
                                            name="checkpoint-peer-failure-watch")
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def post(self, message: str) -> None:
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.set(self._key, message)

    def _watch(self) -> None:
        posted = None
        while not self._stop.wait(0.5):
            try:
                if not self._store.check([self._key]):
                    continue
            except Exception:  # noqa: BLE001 (the store went away: the job is ending)
                return
            posted = posted or time.monotonic()
            if time.monotonic() - posted < PEER_FAILURE_GRACE_S:
                continue
            try:
                message = self._store.get(self._key).decode("utf-8", "replace")
            except Exception:  # noqa: BLE001
                message = "another rank's save failed"
            print(f"megatron-anchor: error (rank {runtime.rank()}): {message}",
                  file=sys.stderr, flush=True)
            # os._exit runs no finalizers: end the helper processes ourselves (the results
            # queue manager dist_checkpointing spawned), or they outlive the job's rank.
            import multiprocessing

            for child in multiprocessing.active_children():
                with contextlib.suppress(Exception):
                    child.kill()
            os._exit(2)


# ----------------------------------------------------------------------------------------
# Saving: one iteration, collectively, complete or not at all
# ----------------------------------------------------------------------------------------

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


def _remove_tree(path: str) -> None:
    """Rename out of the way (atomic: a half-deleted directory never looks complete), then
    remove."""
    if not os.path.exists(path):
        return
    doomed = path + DELETING_SUFFIX
    if os.path.exists(doomed):
        shutil.rmtree(doomed)
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def _bytes_text(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


class _IterationWriter:
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
        self.watch = _PeerFailureWatch(_SAVES[0])
        self.logged = _LoggedErrors()
        if runtime.world_size() > 1 and torch.distributed.is_initialized():
            _side_group()  # before any rank can fail

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
            except _NOT_OURS:
                raise
            except BaseException as err:  # noqa: BLE001 (disk full, permission; torch's
                # CheckpointException derives from BaseException)
                telling, text, where = _describe(err, self.logged.lines())
                where = runtime.rank() if where is None else where
                error = (telling, text, where)
                self.watch.post(self._fail_text(where, text))
        failed = _exchange(error)
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
            if previous and _read_manifest(previous):
                needed = sum(_read_manifest(previous)["files"].values())
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
        target = _tracker_target(self.root)
        if target and os.path.abspath(target) == self.final:
            before = [i for i, _ in list_iterations(self.root)
                      if self.iteration in (None, "release") or i < int(self.iteration)]
            tracker = os.path.join(self.root, TRACKER_FILE)
            if before:
                files.write_text(tracker, f"{before[-1]}\n")
            else:
                os.remove(tracker)
        _remove_tree(self.final)


def _copy_tokenizer(source: Optional[str], root: str) -> None:
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

    writer = _IterationWriter(root, iteration, contents=("model",))
    with writer.watch:
        writer.begin()
        writer.phase(lambda: dist_checkpointing.save({"model": model.sharded_state_dict()},
                                                     writer.staging))

        def small_files(directory):
            _copy_tokenizer(tokenizer_dir, writer.root)
            files.write_text(os.path.join(directory, MODEL_CONFIG_FILE),
                             model_config.to_json() + "\n")
            for name, value in (extra_json or {}).items():
                files.write_json(os.path.join(directory, name), value)
        return writer.commit(small_files)


# ----------------------------------------------------------------------------------------
# Training runs: model, optimizer, scheduler, RNG and data position
# ----------------------------------------------------------------------------------------

def rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if not runtime.is_cpu():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and not runtime.is_cpu():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


# Megatron-LM's default layout of --use-distributed-optimizer state (reshardable over DP;
# ignored by the plain optimizer). megatron-core 0.16's own default needs flattened_range.
OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


@dataclasses.dataclass(frozen=True)
class SaveOptions:
    """What a trainer save holds and where it goes (Megatron-LM's flags)."""

    save_optim: bool = True      # --no-save-optim: model, scheduler and data position only
    save_rng: bool = True        # --no-save-rng


def save_training(root: str, iteration: int, components, train_config, train_state: dict,
                  tokenizer: Optional[str] = None, *, options: SaveOptions = SaveOptions(),
                  async_saves: Optional["AsyncSaves"] = None) -> str:
    """Model, optimizer, scheduler, RNG and train state; returns the iteration directory.
    Collective. With `async_saves` the shards are written in the background and the
    directory is complete (renamed, tracker updated) when `async_saves.wait()` or a `poll()`
    that finds every rank's writes done finalizes it."""
    from megatron.core import dist_checkpointing

    contents = ("model", "scheduler") + (("optimizer",) if options.save_optim else ()) + \
        (("rng",) if options.save_rng else ())
    if async_saves is not None:
        async_saves.wait()  # one save in flight at a time
    writer = _IterationWriter(root, iteration, contents)
    model_sd = components.module.sharded_state_dict()
    state = {"model": model_sd, "scheduler": components.scheduler.state_dict(),
             "iteration": iteration}
    if options.save_optim:
        state["optimizer"] = components.optimizer.sharded_state_dict(
            model_sd, metadata=OPTIM_METADATA)
    request = []

    def write():
        if async_saves is None:
            dist_checkpointing.save(state, writer.staging)
        else:
            request.append(dist_checkpointing.save(state, writer.staging,
                                                   async_sharded_save=True,
                                                   **async_saves.save_kwargs))
        if options.save_rng:
            os.makedirs(os.path.join(writer.staging, "rng"), exist_ok=True)
            torch.save({"world_size": runtime.world_size(), "state": rng_state()},
                       os.path.join(writer.staging, "rng", f"rank_{runtime.rank():05d}.pt"))

    def small_files(directory):
        _copy_tokenizer(tokenizer, writer.root)
        files.write_text(os.path.join(directory, MODEL_CONFIG_FILE),
                         train_config.model.to_json() + "\n")
        files.write_text(os.path.join(directory, TRAIN_CONFIG_FILE), train_config.to_json() + "\n")
        files.write_json(os.path.join(directory, TRAIN_STATE_FILE),
                         dict(train_state, iteration=iteration))

    with writer.watch:
        writer.begin()
        writer.phase(write)
        if async_saves is None:
            return writer.commit(small_files)
        async_saves.schedule(writer, request[0], small_files)
    return writer.final


class AsyncSaves:
    """`--async-save`: Megatron-Core's `AsyncCallsQueue` writes the shards in a forked
    process while training goes on; the save is finalized (dist_checkpointing's metadata,
    then our small files, manifest, rename and tracker) once every rank's writes are done.

    `poll()` is collective and is called by every rank once per iteration while a save is in
    flight; it returns the directory of a save it completed. On CPU the writer is a fork of
    the trainer: the tensors it writes are the trainer's own pages at the fork
    (copy-on-write), so pages the trainer changes while it writes are copied.
    """

    def __init__(self):
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._queue = AsyncCallsQueue(persistent=False)
        # megatron-core 0.19 defaults async saves to nvidia-resiliency-ext's writer (an
        # optional package, absent from a plain install); the requests scheduled here are
        # Megatron-Core's own, for its own queue. Its warning that this writer is deprecated
        # names a setting our users do not have.
        self.save_kwargs = {}
        if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
            self.save_kwargs = {"async_strategy": "mcore"}
            logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").addFilter(
                lambda record: not record.getMessage().startswith(
                    "MCore's async save is deprecated"))
        self._pending = None  # (writer, small_files)
        self.scheduled_at = None

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def schedule(self, writer: _IterationWriter, request, small_files) -> None:
        def start():
            self._queue.schedule_async_request(request)
        writer.phase(start)
        self._pending = (writer, small_files)
        self.scheduled_at = time.perf_counter()

    def poll(self, blocking: bool = False) -> Optional[str]:
        """Finalize the save in flight if every rank's writes are done (all ranks call this
        at the same points); returns its directory once complete."""
        if self._pending is None:
            return None
        writer, small_files = self._pending
        with writer.watch:
            done = []
            writer.phase(lambda: done.extend(
                self._queue.maybe_finalize_async_calls(blocking=blocking)))
            if not done:
                return None
            self._pending = None
            return writer.commit(small_files)

    def wait(self) -> Optional[str]:
        try:
            return self.poll(blocking=True)
        finally:
            self._pending = None

    def close(self) -> None:
        """At exit without finalizing (after an error): stop the writer; its partial
        directory keeps its `.incomplete` name."""
        if self._pending is not None:
            self._pending[0].abort()
            self._pending = None
        with contextlib.suppress(Exception):
            self._queue.close(abort=True)


def load_training(ckpt: Checkpoint, components, *, load_optim: bool = True,
                  load_rng: bool = True) -> Tuple[int, dict]:
    """Restore model, LR schedule, optimizer (unless `load_optim` is False: Megatron-LM's
    --no-load-optim, a fresh optimizer from the loaded weights) and RNG (unless `load_rng`
    is False); returns (iteration, train_state)."""
    from megatron.core import dist_checkpointing

    if not ckpt.has_training_state:
        raise CheckpointError(f"{ckpt.path} holds model weights only (no {TRAIN_STATE_FILE}): "
                              "start from it with --pretrained-checkpoint, not --load")
    if load_optim and not ckpt.has_optimizer_state:
        raise CheckpointError(
            f"{ckpt.path} was saved without optimizer state (--no-save-optim): resume from it "
            "with --no-load-optim (a fresh optimizer: the run is no longer an exact "
            f"continuation), or pick one saved with it; {_older_hint(ckpt.root, ckpt.iteration)}")
    with ckpt.reading():
        model_sd = components.module.sharded_state_dict()
        template = {"model": model_sd}
        if load_optim:
            template["optimizer"] = components.optimizer.sharded_state_dict(
                model_sd, is_loading=True, metadata=OPTIM_METADATA)
        loaded = dist_checkpointing.load(template, ckpt.path)
        components.module.load_state_dict(loaded["model"])
        if load_optim:
            components.optimizer.load_state_dict(loaded["optimizer"])
        else:
            # --bf16 keeps FP32 main copies, made when the optimizer was built: refresh them.
            components.optimizer.reload_model_params()
        components.scheduler.load_state_dict(loaded["scheduler"])
        rng_file = os.path.join(ckpt.path, "rng", f"rank_{runtime.rank():05d}.pt")
        if load_rng and os.path.isfile(rng_file):
            saved = torch.load(rng_file, weights_only=False)
            if saved["world_size"] == runtime.world_size():
                set_rng_state(saved["state"])
        iteration = int(loaded["iteration"])
    return iteration, ckpt.json_file(TRAIN_STATE_FILE)


# ----------------------------------------------------------------------------------------
# Retention
# ----------------------------------------------------------------------------------------

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
    tracker = _tracker_target(root)
    doomed = []  # leftovers first: removing an iteration reuses its ".deleting" name
    for name in sorted(os.listdir(root)):
        leftover = _LEFTOVER_DIR.match(name)
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
                _remove_tree(path)
            deleted.append(path)
        except OSError as err:
            problems.append(f"could not delete {path}: {err}")
    return deleted, problems

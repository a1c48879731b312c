"""Checkpoints: the one module that knows the on-disk layout. Every `--load` goes through it.

Layout of a checkpoint root (Megatron-LM's names, so its tools find their way)::

    ROOT/latest_checkpointed_iteration.txt    the newest complete checkpoint ("100", "release")
    ROOT/iter_0000100/ (or ROOT/release/)      Megatron-Core dist_checkpointing (torch_dist):
        model.*, optimizer.*                   sharded tensors with global shapes (TP/CP-free)
        common.pt                              LR scheduler state, iteration
        model_config.json                      ModelConfig: the architecture, always from here
        train_config.json, train_state.json    trainer runs: the run's config; data position
        rng/rank_00000.pt                      trainer runs: every rank's RNG states
    ROOT/tokenizer/                            the tokenizer files the model was trained with

A path given to a tool may be the root (its tracker names the iteration; `step` picks
another, Megatron-LM's `--ckpt-step`) or one iteration directory. `open(path)` resolves it
once into a `Checkpoint`, the handle every tool passes on: the iteration directory, the root,
the architecture (`model_config.json`, read once) and the tokenizer saved with it. Weights are global tensors, so a checkpoint saved at one TP/CP layout loads at
another: Megatron-Core reshards at load. RNG states are per rank and are restored only when
the world size is the same.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import random
import re
from typing import List, Optional, Tuple

import numpy as np
import torch

from megatron_anchor import files, runtime
from megatron_anchor.errors import UserError

TRACKER_FILE = "latest_checkpointed_iteration.txt"
MODEL_CONFIG_FILE = "model_config.json"
TRAIN_CONFIG_FILE = "train_config.json"
TRAIN_STATE_FILE = "train_state.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt")
_ITERATION_DIR = re.compile(r"^iter_(\d{7})$")

# ModelConfig fields a caller may change at load: they decide how, not what, is computed.
RUNTIME_FIELDS = ("attention_backend", "rope_fp32", "bf16", "sequence_parallel",
                  "cp_comm_type", "max_sequence_length", "recompute_granularity",
                  "recompute_method", "recompute_num_layers", "recompute_modules")


class CheckpointError(UserError):
    """A path that is not a usable checkpoint, or a flag that contradicts it."""


# ----------------------------------------------------------------------------------------
# Where things are
# ----------------------------------------------------------------------------------------

def iteration_dir(root: str, iteration) -> str:
    name = "release" if iteration in (None, "release") else f"iter_{int(iteration):07d}"
    return os.path.join(root, name)


def _is_iteration_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "metadata.json"))


def _tracker_target(root: str) -> Optional[str]:
    tracker = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(tracker):
        return None
    with io.open(tracker, encoding="utf-8") as f:
        text = f.read().strip()
    if text != "release" and not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration number or 'release', "
                              f"found {text[:40]!r}")
    return iteration_dir(root, text)


def _iteration_of(path: str) -> Optional[int]:
    match = _ITERATION_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def _root_of_iteration_dir(path: str) -> str:
    """The folder holding a standard iteration directory; a directory of another name is
    its own root."""
    path = os.path.abspath(path)
    standard = _iteration_of(path) is not None or os.path.basename(path) == "release"
    return os.path.dirname(path) if standard else path


def exists(path: Optional[str]) -> bool:
    """True when `path` holds a complete checkpoint (a --load that can resume)."""
    if not path:
        return False
    target = path if _is_iteration_dir(path) else _tracker_target(path)
    return target is not None and _is_iteration_dir(target)


def list_iterations(root: str) -> List[Tuple[int, str]]:
    """Complete saved iterations under a checkpoint root, ascending."""
    if not os.path.isdir(root):
        raise CheckpointError(f"{root}: no such checkpoint directory")
    found = []
    for name in os.listdir(root):
        match = _ITERATION_DIR.match(name)
        path = os.path.join(root, name)
        if match and _is_iteration_dir(path) and \
                os.path.isfile(os.path.join(path, MODEL_CONFIG_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def _resolve(path: str, step: Optional[int]) -> str:
    """The iteration directory for a root (its tracker, or `step`) or an iteration dir."""
    if not path or not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if step is not None:
        root = _root_of_iteration_dir(path) if _is_iteration_dir(path) else path
        target = iteration_dir(root, step)
        if not _is_iteration_dir(target):
            have = ", ".join(str(i) for i, _ in list_iterations(root)) or "none"
            raise CheckpointError(f"--ckpt-step {step}: {target} is missing or incomplete "
                                  f"(complete iterations under {root}: {have})")
        return target
    if _is_iteration_dir(path):
        return path
    target = _tracker_target(path)
    if target is None:
        raise CheckpointError(
            f"{path}: not a checkpoint (no {TRACKER_FILE} and no dist_checkpointing "
            "metadata.json); pass a --save directory of a run or one iter_NNNNNNN directory")
    if not _is_iteration_dir(target):
        raise CheckpointError(f"{path}: {TRACKER_FILE} points at {target}, which is missing "
                              "or incomplete")
    return target


def _read_json(path: str):
    try:
        with io.open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None


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


def with_runtime_fields(config, **overrides):
    """`config` with fields that do not touch the weights changed."""
    bad = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if bad:
        raise CheckpointError(f"cannot override {', '.join(bad)} at load: the architecture "
                              "comes from the checkpoint")
    return dataclasses.replace(config, **overrides)


# ----------------------------------------------------------------------------------------
# The handle
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One checkpoint iteration, resolved and read once (`open`); every tool carries this."""

    path: str                      # the iteration directory
    root: str                      # the folder holding it (and the tokenizer, the tracker)
    iteration: Optional[int]       # None for ROOT/release
    model_config: object           # ModelConfig: the architecture, always from here
    tokenizer_dir: Optional[str]   # ROOT/tokenizer, if the tokenizer was saved with it

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    @property
    def has_training_state(self) -> bool:
        return os.path.isfile(os.path.join(self.path, TRAIN_STATE_FILE))

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

    def load_weights(self, model) -> None:
        """Load the weights into `model` (built on the current TP/CP layout). Collective."""
        from megatron.core import dist_checkpointing

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


def open(path: str, step: Optional[int] = None) -> Checkpoint:  # noqa: A001 (checkpoint.open)
    """Resolve `path` (a root, or one iteration directory) once; `step` picks an iteration
    of the root other than the tracker's (Megatron-LM's --ckpt-step)."""
    resolved = os.path.abspath(_resolve(path, step))
    root = _root_of_iteration_dir(resolved)
    tokenizer = os.path.join(root, TOKENIZER_DIR)
    return Checkpoint(path=resolved, root=root, iteration=_iteration_of(resolved),
                      model_config=_read_model_config(resolved),
                      tokenizer_dir=tokenizer if os.path.isdir(tokenizer) and
                      os.listdir(tokenizer) else None)


def last(path: str, count: int) -> List[Checkpoint]:
    """The last `count` complete iterations under the root of `path`, oldest first."""
    root = _root_of_iteration_dir(path) if _is_iteration_dir(path) else path
    found = list_iterations(root)
    if len(found) < count:
        raise CheckpointError(f"{root} holds {len(found)} complete iteration(s), "
                              f"{count} asked for")
    return [open(p) for _, p in found[-count:]]


# ----------------------------------------------------------------------------------------
# Saving weights (importers, converters)
# ----------------------------------------------------------------------------------------

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
    The tracker is written last: a checkpoint is complete once it points there.
    """
    from megatron.core import dist_checkpointing

    path = iteration_dir(root, iteration)
    if runtime.is_rank0():
        os.makedirs(path, exist_ok=True)
    runtime.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, path)
    runtime.barrier()
    if runtime.is_rank0():
        _copy_tokenizer(tokenizer_dir, root)
        files.write_text(os.path.join(path, MODEL_CONFIG_FILE), model_config.to_json() + "\n")
        for name, value in (extra_json or {}).items():
            files.write_json(os.path.join(path, name), value)
        files.write_text(os.path.join(root, TRACKER_FILE),
                         "release\n" if iteration in (None, "release") else f"{int(iteration)}\n")
    runtime.barrier()
    return path


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


def save_training(root: str, iteration: int, components, train_config, train_state: dict,
                  tokenizer: Optional[str] = None) -> str:
    """Model, optimizer, scheduler, RNG and train state; returns the iteration directory."""
    from megatron.core import dist_checkpointing

    path = iteration_dir(root, iteration)
    if runtime.is_rank0():
        os.makedirs(path, exist_ok=True)
    runtime.barrier()
    model_sd = components.module.sharded_state_dict()
    state = {
        "model": model_sd,
        "optimizer": components.optimizer.sharded_state_dict(model_sd, metadata=OPTIM_METADATA),
        "scheduler": components.scheduler.state_dict(),
        "iteration": iteration,
    }
    dist_checkpointing.save(state, path)
    os.makedirs(os.path.join(path, "rng"), exist_ok=True)
    torch.save({"world_size": runtime.world_size(), "state": rng_state()},
               os.path.join(path, "rng", f"rank_{runtime.rank():05d}.pt"))
    runtime.barrier()
    if runtime.is_rank0():
        _copy_tokenizer(tokenizer, root)
        files.write_text(os.path.join(path, MODEL_CONFIG_FILE), train_config.model.to_json() + "\n")
        files.write_text(os.path.join(path, TRAIN_CONFIG_FILE), train_config.to_json() + "\n")
        files.write_json(os.path.join(path, TRAIN_STATE_FILE),
                         dict(train_state, iteration=iteration))
        files.write_text(os.path.join(root, TRACKER_FILE), f"{iteration}\n")
    runtime.barrier()
    return path


def load_training(ckpt: Checkpoint, components) -> Tuple[int, dict]:
    """Restore model, optimizer, scheduler and RNG; returns (iteration, train_state)."""
    from megatron.core import dist_checkpointing

    if not ckpt.has_training_state:
        raise CheckpointError(f"{ckpt.path} holds model weights only (no {TRAIN_STATE_FILE}): "
                              "start from it with --pretrained-checkpoint, not --load")
    model_sd = components.module.sharded_state_dict()
    template = {
        "model": model_sd,
        "optimizer": components.optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                             metadata=OPTIM_METADATA),
    }
    loaded = dist_checkpointing.load(template, ckpt.path)
    components.module.load_state_dict(loaded["model"])
    components.optimizer.load_state_dict(loaded["optimizer"])
    components.scheduler.load_state_dict(loaded["scheduler"])
    train_state = ckpt.json_file(TRAIN_STATE_FILE)
    rng_file = os.path.join(ckpt.path, "rng", f"rank_{runtime.rank():05d}.pt")
    if os.path.isfile(rng_file):
        saved = torch.load(rng_file, weights_only=False)
        if saved["world_size"] == runtime.world_size():
            set_rng_state(saved["state"])
    return int(loaded["iteration"]), train_state

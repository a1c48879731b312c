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

A path given to a tool may be the root (its tracker names the iteration) or one iteration
directory. Weights are global tensors, so a checkpoint saved at one TP/CP layout loads at
another: Megatron-Core reshards at load. RNG states are per rank and are restored only when
the world size is the same.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import random
import re
import shutil
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron_anchor import runtime

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


class CheckpointError(ValueError):
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
    with open(tracker, encoding="utf-8") as f:
        text = f.read().strip()
    if text != "release" and not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration number or 'release', "
                              f"found {text[:40]!r}")
    return iteration_dir(root, text)


def exists(path: Optional[str]) -> bool:
    """True when `path` holds a complete checkpoint (a --load that can resume)."""
    if not path:
        return False
    target = path if _is_iteration_dir(path) else _tracker_target(path)
    return target is not None and _is_iteration_dir(target)


def resolve(path: str) -> str:
    """The iteration directory for a checkpoint root or an iteration directory."""
    if not path or not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
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


def root_of(path: str) -> str:
    """The checkpoint root of `path` (the folder holding the iteration directories)."""
    resolved = os.path.abspath(resolve(path))
    name = os.path.basename(resolved)
    standard = _ITERATION_DIR.match(name) or name == "release"
    return os.path.dirname(resolved) if standard else resolved


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


def tokenizer_dir(path: str) -> Optional[str]:
    """The tokenizer files saved with a checkpoint, or None."""
    folder = os.path.join(root_of(path), TOKENIZER_DIR)
    return folder if os.path.isdir(folder) and os.listdir(folder) else None


# ----------------------------------------------------------------------------------------
# The model config
# ----------------------------------------------------------------------------------------

def read_model_config(path: str):
    from megatron_anchor.model import ModelConfig

    resolved = resolve(path)
    config_file = os.path.join(resolved, MODEL_CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise CheckpointError(f"{resolved}: no {MODEL_CONFIG_FILE}; it was not written by "
                              "megatron-anchor (the architecture cannot be known)")
    try:
        with open(config_file, encoding="utf-8") as f:
            return ModelConfig.from_dict(json.load(f))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise CheckpointError(f"{config_file}: {err}") from None


def read_train_config(path: str) -> Optional[dict]:
    config_file = os.path.join(resolve(path), TRAIN_CONFIG_FILE)
    if not os.path.isfile(config_file):
        return None
    with open(config_file, encoding="utf-8") as f:
        return json.load(f)


def check_flags_match(saved, flags: dict, source: str) -> None:
    """A one-line error for the first architecture flag that contradicts the checkpoint.

    `flags` maps ModelConfig field names to what the user asked for (None: not given).
    """
    for name, wanted in flags.items():
        if wanted is None or name in RUNTIME_FIELDS:
            continue
        have = getattr(saved, name)
        if have != wanted:
            flag = "--" + name.replace("_", "-")
            raise CheckpointError(f"{flag} {wanted} contradicts the checkpoint {source} "
                                  f"({name} = {have}); drop the flag, the architecture comes "
                                  "from the checkpoint")


def with_runtime_fields(config, **overrides):
    """`config` with fields that do not touch the weights changed."""
    bad = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if bad:
        raise CheckpointError(f"cannot override {', '.join(bad)} at load: the architecture "
                              "comes from the checkpoint")
    return dataclasses.replace(config, **overrides)


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


def _copy_tokenizer(source: Optional[str], root: str) -> None:
    """Copy a tokenizer (a file, with the known tokenizer files beside it, or a folder)."""
    if not source:
        return
    folder = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    files = [os.path.join(folder, n) for n in TOKENIZER_FILES]
    files += glob.glob(os.path.join(folder, "*.model"))
    if os.path.isfile(source):
        files = [source] + [f for f in files if os.path.basename(f) in TOKENIZER_FILES[1:3]]
    files = [f for f in dict.fromkeys(files) if os.path.isfile(f)]
    if not files:
        raise CheckpointError(f"{source}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    target = os.path.join(root, TOKENIZER_DIR)
    os.makedirs(target, exist_ok=True)
    for f in files:
        name = os.path.basename(f)
        if f == source and name.endswith(".json") and name not in TOKENIZER_FILES:
            name = "tokenizer.json"  # a tokenizers file under another name
        dest = os.path.join(target, name)
        if os.path.abspath(f) != os.path.abspath(dest):
            shutil.copyfile(f, dest + ".tmp")
            os.replace(dest + ".tmp", dest)


# ----------------------------------------------------------------------------------------
# Models: load anywhere, save weights
# ----------------------------------------------------------------------------------------

def load_weights(model, path: str) -> str:
    """Load a checkpoint's weights into `model` (built on the current TP/CP layout)."""
    from megatron.core import dist_checkpointing

    resolved = resolve(path)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, resolved)
    model.load_state_dict(loaded["model"])
    return resolved


def load_model(path: str, *, tp: Optional[int] = None, cp: Optional[int] = None,
               cpu: Optional[bool] = None, **overrides):
    """`(model, model_config)`: the checkpoint's architecture and weights, ready for eval.

    Built on the current TP/CP layout; if Megatron's parallel state is not initialised yet,
    a single-process one (or `tp`×`cp`) is set up, on CPU when no GPU is visible.
    `overrides` change only fields that do not touch the weights (`RUNTIME_FIELDS`).
    """
    from megatron.core import parallel_state

    from megatron_anchor.model import build_model

    config = with_runtime_fields(read_model_config(path), **overrides)
    if parallel_state.model_parallel_is_initialized() and tp is None and cp is None:
        runtime.decide_device(cpu)  # the caller's layout, on the device already chosen
    else:
        runtime.ensure_initialized(tp or 1, cp or 1, cpu=cpu)
    # No random init: every weight is overwritten by the checkpoint's.
    model = build_model(config, initialize=False).to(runtime.device())
    load_weights(model, path)
    model.eval()
    return model, config


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
        _write_text(os.path.join(path, MODEL_CONFIG_FILE), model_config.to_json())
        for name, value in (extra_json or {}).items():
            _write_text(os.path.join(path, name), json.dumps(value, indent=2))
        _write_text(os.path.join(root, TRACKER_FILE),
                    "release" if iteration in (None, "release") else str(int(iteration)))
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


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


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
               os.path.join(path, "rng", f"rank_{_rank():05d}.pt"))
    runtime.barrier()
    if runtime.is_rank0():
        _copy_tokenizer(tokenizer, root)
        _write_text(os.path.join(path, MODEL_CONFIG_FILE), train_config.model.to_json())
        _write_text(os.path.join(path, TRAIN_CONFIG_FILE), train_config.to_json())
        _write_text(os.path.join(path, TRAIN_STATE_FILE),
                    json.dumps(dict(train_state, iteration=iteration), indent=2))
        _write_text(os.path.join(root, TRACKER_FILE), str(iteration))
    runtime.barrier()
    return path


def load_training(path: str, components) -> Tuple[int, dict]:
    """Restore model, optimizer, scheduler and RNG; returns (iteration, train_state)."""
    from megatron.core import dist_checkpointing

    resolved = resolve(path)
    state_file = os.path.join(resolved, TRAIN_STATE_FILE)
    if not os.path.isfile(state_file):
        raise CheckpointError(f"{resolved} holds model weights only (no {TRAIN_STATE_FILE}): "
                              "start from it with --pretrained-checkpoint, not --load")
    model_sd = components.module.sharded_state_dict()
    template = {
        "model": model_sd,
        "optimizer": components.optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                             metadata=OPTIM_METADATA),
    }
    loaded = dist_checkpointing.load(template, resolved)
    components.module.load_state_dict(loaded["model"])
    components.optimizer.load_state_dict(loaded["optimizer"])
    components.scheduler.load_state_dict(loaded["scheduler"])
    with open(state_file, encoding="utf-8") as f:
        train_state = json.load(f)
    rng_file = os.path.join(resolved, "rng", f"rank_{_rank():05d}.pt")
    if os.path.isfile(rng_file):
        saved = torch.load(rng_file, weights_only=False)
        if saved["world_size"] == runtime.world_size():
            set_rng_state(saved["state"])
    return int(loaded["iteration"]), train_state

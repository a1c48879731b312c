"""Checkpoints with Megatron-Core's `dist_checkpointing`: exact resume, and reloading anywhere.

Layout of `--save DIR` (Megatron-LM's names, so its tools find their way):

    DIR/latest_checkpointed_iteration.txt     the newest complete checkpoint
    DIR/iter_0000100/                         dist_checkpointing (torch_dist) files:
        model.*, optimizer.*                  sharded tensors (global shapes: TP/CP-free)
        common.pt                             LR scheduler state, iteration
        model_config.json                     ModelConfig, enough to rebuild the model
        train_config.json, train_state.json   the run's config; iteration, consumed windows
        rng/rank_00000.pt                     every rank's RNG states

Model weights are stored as global tensors, so a checkpoint saved at one TP/CP layout loads
at another (Megatron-Core reshards at load). RNG states are per rank and are restored only
when the layout is the same. The data position is the iteration (see `training.data`).
"""

from __future__ import annotations

import json
import os
import random
from typing import Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

TRACKER_FILE = "latest_checkpointed_iteration.txt"
MODEL_CONFIG_FILE = "model_config.json"


def iteration_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------
# RNG states
# ----------------------------------------------------------------------------------------

def rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


# ----------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------

def save_checkpoint(save_dir: str, iteration: int, components, train_config,
                    train_state: dict) -> str:
    """Save model, optimizer, scheduler, RNG and train state; returns the iteration dir."""
    from megatron.core import dist_checkpointing

    path = iteration_dir(save_dir, iteration)
    if _rank() == 0:
        os.makedirs(path, exist_ok=True)
    _barrier()
    model_sd = components.module.sharded_state_dict()
    state = {
        "model": model_sd,
        "optimizer": components.optimizer.sharded_state_dict(model_sd),
        "scheduler": components.scheduler.state_dict(),
        "iteration": iteration,
    }
    dist_checkpointing.save(state, path)
    os.makedirs(os.path.join(path, "rng"), exist_ok=True)
    torch.save({"world_size": _world(), "state": rng_state()},
               os.path.join(path, "rng", f"rank_{_rank():05d}.pt"))
    _barrier()
    if _rank() == 0:
        _write_json(os.path.join(path, MODEL_CONFIG_FILE), train_config.model.to_json())
        _write_json(os.path.join(path, "train_config.json"), train_config.to_json())
        _write_json(os.path.join(path, "train_state.json"),
                    json.dumps(dict(train_state, iteration=iteration), indent=2))
        # The tracker is written last: a checkpoint is complete once it points there.
        _write_json(os.path.join(save_dir, TRACKER_FILE), str(iteration))
    _barrier()
    return path


def _write_json(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------

def resolve_checkpoint(path: str) -> Optional[str]:
    """The iteration directory for `path` (a --save dir with a tracker, or an iter_ dir)."""
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    tracker = os.path.join(path, TRACKER_FILE)
    if not os.path.isfile(tracker):
        return None
    with open(tracker, encoding="utf-8") as f:
        text = f.read().strip()
    if text == "release":
        return os.path.join(path, "release")
    return iteration_dir(path, int(text))


def load_checkpoint(load_dir: str, components) -> Tuple[int, dict]:
    """Restore model, optimizer, scheduler and RNG; returns (iteration, train_state)."""
    from megatron.core import dist_checkpointing

    path = resolve_checkpoint(load_dir)
    if path is None:
        raise FileNotFoundError(f"--load {load_dir}: no {TRACKER_FILE} and no checkpoint there; "
                                "point --load at a --save directory of an earlier run")
    model_sd = components.module.sharded_state_dict()
    template = {
        "model": model_sd,
        "optimizer": components.optimizer.sharded_state_dict(model_sd, is_loading=True),
    }
    loaded = dist_checkpointing.load(template, path)
    components.module.load_state_dict(loaded["model"])
    components.optimizer.load_state_dict(loaded["optimizer"])
    components.scheduler.load_state_dict(loaded["scheduler"])
    with open(os.path.join(path, "train_state.json"), encoding="utf-8") as f:
        train_state = json.load(f)
    rng_file = os.path.join(path, "rng", f"rank_{_rank():05d}.pt")
    if os.path.isfile(rng_file):
        saved = torch.load(rng_file, weights_only=False)
        if saved["world_size"] == _world():
            set_rng_state(saved["state"])
    return int(loaded["iteration"]), train_state


def load_pretrained_weights(path: str, components) -> str:
    """Model weights only (no optimizer, schedule or data position): continued pretraining."""
    from megatron.core import dist_checkpointing

    resolved = resolve_checkpoint(path) or path
    if not os.path.isdir(resolved):
        raise FileNotFoundError(f"--pretrained-checkpoint {path}: no such checkpoint")
    loaded = dist_checkpointing.load({"model": components.module.sharded_state_dict()}, resolved)
    components.module.load_state_dict(loaded["model"])
    return resolved


def read_model_config(path: str):
    from megatron_anchor.model import ModelConfig

    resolved = resolve_checkpoint(path)
    if resolved is None:
        raise FileNotFoundError(f"{path}: not a megatron-anchor checkpoint (no {TRACKER_FILE} "
                                "or metadata.json)")
    with open(os.path.join(resolved, MODEL_CONFIG_FILE), encoding="utf-8") as f:
        return ModelConfig.from_dict(json.load(f)), resolved


def load_model_from_checkpoint(path: str, tp: int = 1, cp: int = 1, cpu: Optional[bool] = None,
                               **overrides):
    """A GPTModel with the weights of a checkpoint, for parity checks, diagnostics, evaluation.

    `path` is a --save directory (its latest checkpoint) or one iter_ directory. Megatron's
    parallel state is initialised with (tp, cp) unless it already is (then they must match).
    The weights are resharded from whatever TP/CP layout saved them. `overrides` change
    ModelConfig fields that do not touch the weights (attention_backend, rope_fp32, bf16, ...).
    Returns ``(model, model_config)``.
    """
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_anchor import distributed
    from megatron_anchor.model import build_model

    config, resolved = read_model_config(path)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"unknown ModelConfig field {key!r}")
        setattr(config, key, value)
    if not parallel_state.model_parallel_is_initialized():
        distributed.initialize(tp, cp, cpu=not torch.cuda.is_available() if cpu is None else cpu)
    elif (parallel_state.get_tensor_model_parallel_world_size(),
          parallel_state.get_context_parallel_world_size()) != (tp, cp):
        raise ValueError(f"parallel state is already initialised with a different layout "
                         f"than tp={tp}, cp={cp}")
    model = build_model(config)
    if torch.cuda.is_available() and not (cpu or False):
        model = model.cuda(torch.cuda.current_device())
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, resolved)
    model.load_state_dict(loaded["model"])
    model.eval()
    return model, config

"""A training run's checkpoint: model, optimizer, LR scheduler, every rank's RNG states and
the data position, saved synchronously or with `--async-save`, and restored by `--load`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import random
import time
from typing import Optional, Tuple

import numpy as np
import torch

from megatron_anchor import files, runtime
from megatron_anchor.checkpoint.folder import (
    MODEL_CONFIG_FILE, TRAIN_CONFIG_FILE, TRAIN_STATE_FILE, CheckpointError, older_hint)
from megatron_anchor.checkpoint.handle import Checkpoint
from megatron_anchor.checkpoint.writer import IterationWriter, copy_tokenizer


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
    writer = IterationWriter(root, iteration, contents)
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
        copy_tokenizer(tokenizer, writer.root)
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

    def schedule(self, writer: IterationWriter, request, small_files) -> None:
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
            f"continuation), or pick one saved with it; {older_hint(ckpt.root, ckpt.iteration)}")
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

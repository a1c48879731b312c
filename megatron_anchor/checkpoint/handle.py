"""The handle: one checkpoint iteration resolved, checked and read once (`open`), and what
every tool does with it (its architecture, its weights, a model holding them). `--load` of a
trainer goes through `open_for_resume`, which skips saves that did not finish.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import List, Optional, Tuple

from megatron_anchor import runtime
from megatron_anchor.checkpoint.failures import NOT_OURS, describe
from megatron_anchor.checkpoint.folder import (
    LEFTOVER_DIR, MODEL_CONFIG_FILE, TOKENIZER_DIR, TRACKER_FILE, TRAIN_STATE_FILE,
    CheckpointError, check_files, is_complete, iteration_of, list_iterations,
    looks_like_iteration_dir, older_hint, read_json, resolve, root_of_iteration_dir,
    tracker_target, unfinished_saves)
from megatron_anchor.errors import UserError

# ModelConfig fields a caller may change at load: they decide how, not what, is computed.
RUNTIME_FIELDS = ("attention_backend", "rope_fp32", "bf16", "sequence_parallel",
                  "cp_comm_type", "max_sequence_length", "recompute_granularity",
                  "recompute_method", "recompute_num_layers", "recompute_modules")


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
        return ModelConfig.from_dict(read_json(config_file))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_file}: {err}") from None


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
        return read_json(path) if os.path.isfile(path) else None

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
        except (UserError,) + NOT_OURS:
            raise
        except BaseException as err:  # noqa: BLE001 (torch's CheckpointException is one)
            raise CheckpointError(
                f"{self.path}: cannot read the checkpoint ({describe(err)[1]}); "
                f"{older_hint(self.root, self.iteration)}") from None

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
    manifest = check_files(resolved)
    root = root_of_iteration_dir(resolved)
    tokenizer = os.path.join(root, TOKENIZER_DIR)
    return Checkpoint(path=resolved, root=root, iteration=iteration_of(resolved),
                      model_config=_read_model_config(resolved),
                      tokenizer_dir=tokenizer if os.path.isdir(tokenizer) and
                      os.listdir(tokenizer) else None,
                      manifest=manifest)


def open(path: str, step: Optional[int] = None) -> Checkpoint:  # noqa: A001 (checkpoint.open)
    """Resolve `path` (a root, or one iteration directory) once and check its files; `step`
    picks an iteration of the root other than the tracker's (Megatron-LM's --ckpt-step)."""
    return _handle(resolve(path, step))


def exists(path: Optional[str]) -> bool:
    """True when `path` holds a complete checkpoint to open (its files are not checked)."""
    if not path or not os.path.isdir(path):
        return False
    if looks_like_iteration_dir(path):
        return is_complete(path)
    try:
        target = tracker_target(path)
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
    if looks_like_iteration_dir(path) or LEFTOVER_DIR.match(os.path.basename(
            os.path.normpath(path))):
        return open(path), []
    notes, chosen = [], None
    target = tracker_target(path)
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
    root = root_of_iteration_dir(path) if looks_like_iteration_dir(path) else path
    found = list_iterations(root)
    if len(found) < count:
        raise CheckpointError(f"{root} holds {len(found)} complete iteration(s), "
                              f"{count} asked for")
    return [open(p) for _, p in found[-count:]]

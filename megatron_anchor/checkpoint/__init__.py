"""Checkpoints: the one package that knows the on-disk layout. Every `--load` goes through it.

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
exchanging their errors (`writer.IterationWriter`), so a disk that fills up on one rank is
the same one-line `CheckpointError` on all of them, the partial `*.incomplete` directory is
removed, and the previous checkpoints and the tracker are untouched. Where a rank fails
inside dist_checkpointing while the others wait in one of its collectives, a watcher thread
ends the waiting ranks with the same line (`failures.PeerFailureWatch`).

One job per module: `folder` (names, tracker; complete, unfinished, damaged), `handle` (the
`Checkpoint` every tool carries), `failures` (errors as one line, on every rank), `writer`
(one iteration saved collectively), `training_state` (a trainer's save and resume, async
saves), `retention` (what long runs keep). Callers use this package's names only.
"""

from megatron_anchor.checkpoint.folder import (
    DELETING_SUFFIX, INCOMPLETE_SUFFIX, MANIFEST_FILE, MODEL_CONFIG_FILE, TOKENIZER_DIR,
    TOKENIZER_FILES, TRACKER_FILE, TRAIN_CONFIG_FILE, TRAIN_STATE_FILE, CheckpointError,
    is_complete, iteration_dir, iteration_of, list_iterations, newest_complete,
    unfinished_saves)
from megatron_anchor.checkpoint.handle import (
    RUNTIME_FIELDS, Checkpoint, exists, last, open, open_for_resume, with_runtime_fields)
from megatron_anchor.checkpoint.retention import apply_retention, retained
from megatron_anchor.checkpoint.training_state import (
    OPTIM_METADATA, AsyncSaves, SaveOptions, load_training, rng_state, save_training,
    set_rng_state)
from megatron_anchor.checkpoint.writer import save_model

__all__ = [
    "DELETING_SUFFIX", "INCOMPLETE_SUFFIX", "MANIFEST_FILE", "MODEL_CONFIG_FILE", "OPTIM_METADATA",
    "RUNTIME_FIELDS", "TOKENIZER_DIR", "TOKENIZER_FILES", "TRACKER_FILE", "TRAIN_CONFIG_FILE",
    "TRAIN_STATE_FILE", "apply_retention", "AsyncSaves", "Checkpoint", "CheckpointError", "exists",
    "is_complete", "iteration_dir", "iteration_of", "last", "list_iterations", "load_training",
    "newest_complete", "open", "open_for_resume", "retained", "rng_state", "save_model",
    "save_training", "SaveOptions", "set_rng_state", "unfinished_saves", "with_runtime_fields",
]

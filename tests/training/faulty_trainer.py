"""The trainer with one fault injected at one save, for tests/training/test_faults.py.

    python -m tests.training.faulty_trainer FAULT ITERATION RANK -- <trainer flags>
    torchrun ... -m tests.training.faulty_trainer FAULT ITERATION RANK -- <trainer flags>

Patches the writer the fault hits (in this process, before the trainer starts), then runs
the trainer's own `main` on the flags after `--`. FAULT is one of:

* `enospc-shards`: dist_checkpointing's writer processes meet ENOSPC (a full disk) on rank
  RANK when they open the shard files of iteration ITERATION;
* `enospc-common`: rank RANK's write of the file dist_checkpointing writes on rank 0 alone,
  while the other ranks go on into the next collective, raises ENOSPC: common.pt up to
  megatron-core 0.16, metadata.json from 0.19 (which keeps the common state in the shards);
* `kill-after-shards`: SIGKILL to the whole process group (a node lost) right after
  dist_checkpointing wrote the shards of ITERATION;
* `kill-in-small-files`: SIGKILL to the process group when train_state.json of ITERATION
  is written.
"""

import errno
import os
import signal
import sys


def _hits(path, iteration, rank) -> bool:
    return f"iter_{iteration:07d}" in str(path) and int(os.environ.get("RANK", "0")) == rank


def _enospc(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def inject(fault: str, iteration: int, rank: int) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies import common, filesystem_async

    from megatron_anchor import files
    from megatron_anchor.checkpoint import failures

    # The test waits for a rank that lost its peer inside dist_checkpointing: not 30 s.
    failures.PEER_FAILURE_GRACE_S = 3.0
    if fault == "enospc-shards":
        # The writer processes open their shard files with the builtin `open`: shadowed in
        # their module, the failure happens where a full disk fails them, inside the writer's
        # own error handling.
        def full_open(path, *args, **kwargs):
            if _hits(path, iteration, rank):
                raise _enospc(path)
            return open(path, *args, **kwargs)

        filesystem_async.open = full_open
    elif fault == "enospc-common" and hasattr(common, "TorchCommonSaveStrategy"):
        save_common = common.TorchCommonSaveStrategy.save_common

        def full_common(self, state, checkpoint_dir):
            if _hits(checkpoint_dir, iteration, rank):
                raise _enospc(os.path.join(str(checkpoint_dir), "common.pt"))
            return save_common(self, state, checkpoint_dir)

        common.TorchCommonSaveStrategy.save_common = full_common
    elif fault == "enospc-common":
        save_config = serialization.save_config

        def full_config(config, checkpoint_dir):
            if _hits(checkpoint_dir, iteration, rank):
                raise _enospc(os.path.join(str(checkpoint_dir), "metadata.json"))
            return save_config(config, checkpoint_dir)

        serialization.save_config = full_config
    elif fault == "kill-after-shards":
        save = dist_checkpointing.save

        def save_then_die(state, directory, *args, **kwargs):
            result = save(state, directory, *args, **kwargs)
            if _hits(directory, iteration, rank):
                os.killpg(0, signal.SIGKILL)
            return result

        dist_checkpointing.save = save_then_die
    elif fault == "kill-in-small-files":
        write_json = files.write_json

        def die_at_train_state(path, *args, **kwargs):
            if path.endswith("train_state.json") and _hits(path, iteration, rank):
                os.killpg(0, signal.SIGKILL)
            return write_json(path, *args, **kwargs)

        files.write_json = die_at_train_state
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    split = sys.argv.index("--")
    fault, iteration, rank = sys.argv[1:split]
    inject(fault, int(iteration), int(rank))
    from megatron_anchor.training.pretrain import main

    sys.exit(main(sys.argv[split + 1:]))

"""What every command-line tool shares: one-line errors, exit status 2, one message per job.

A tool's `main(argv)` parses its flags, calls typed library functions, prints or plots, and
returns an exit status. `run_tool` turns the project's own error types (bad flags, bad data,
bad checkpoints, impossible layouts) into one line on stderr and status 2. Under torchrun
only rank 0 prints it; every rank exits 2. Any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, List, Optional

_OTHER_RANKS_WAIT_S = 5.0

class UsageError(ValueError):
    """A flag that argparse cannot accept (unknown, missing, wrong type, out of choices)."""


def user_errors() -> tuple:
    """The exception types that mean "the user asked for something that cannot be done"."""
    from megatron_anchor.backends import BackendError
    from megatron_anchor.checkpoint import CheckpointError
    from megatron_anchor.data.indexed import DatasetError
    from megatron_anchor.diagnostics.rope_precision import RopePrecisionError
    from megatron_anchor.evaluation.tasks import EvaluationError
    from megatron_anchor.layout import LayoutError
    from megatron_anchor.model import ModelLayoutError
    from megatron_anchor.parallel.te_cp import TEVersionError
    from megatron_anchor.parallel.parity_batch import ParityError
    from megatron_anchor.runtime import ParallelLayoutError
    from megatron_anchor.training.config import ConfigError

    return (BackendError, CheckpointError, ConfigError, DatasetError, EvaluationError,
            LayoutError, ModelLayoutError, ParallelLayoutError, ParityError,
            RopePrecisionError, TEVersionError, UsageError, FileNotFoundError)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def fail(prog: str, message: str) -> int:
    """One line on stderr, status 2; under torchrun, one line for the whole job.

    Every rank usually meets the same bad argument. Rank 0 says it and exits at once, and
    torchrun then stops the other ranks, which wait a moment before speaking: they are
    heard only when the error is theirs alone.
    """
    rank = _rank()
    if rank == 0:
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(_OTHER_RANKS_WAIT_S)
        print(f"{prog}: error (rank {rank}): {message}", file=sys.stderr, flush=True)
    return 2


def run_tool(prog: str, body: Callable[[Optional[List[str]]], int],
             argv: Optional[List[str]] = None, errors: tuple = ()) -> int:
    """Run a tool's body; the project's errors (and the tool's own `errors` types) become
    one line and exit status 2; `--help` is status 0. Any other exception is a bug and
    keeps its traceback."""
    try:
        return int(body(argv) or 0)
    except user_errors() + tuple(errors) as err:
        return fail(prog, " ".join(str(err).split("\n")) or type(err).__name__)
    except SystemExit as done:  # argparse's --help
        if done.code in (0, None):
            return 0
        raise
    except KeyboardInterrupt:
        return fail(prog, "interrupted")

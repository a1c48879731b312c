"""Why a run stops before `--train-iters`, and how every rank stops after the same iteration.

Megatron-LM's rules, under its flag names (docs/training.md, design §11):

* `--exit-signal-handler` (+ `--exit-signal`, SIGTERM by default): the signal only raises a
  flag; the iteration in progress finishes, a checkpoint of it is saved and the process
  exits 0. A scheduler signals the ranks one by one, so the ranks agree: a signal received
  by any rank stops all of them after the same iteration.
* `--exit-duration-in-mins`: minutes since the trainer started (its imports and set-up
  included, as Megatron-LM counts from the start of its process); the largest elapsed time
  over the ranks decides, so all stop together.
* `--exit-interval`: stop after an iteration that is a multiple of it.

The signal and the clock are agreed on in one all-reduce per iteration, only in multi-rank
runs that use them. The non-finite guard (`--no-check-for-nan-in-loss-and-grad` turns it
off) needs no collective: the loss and the gradient norm it checks are already reduced over
all ranks, so every rank takes the same decision; only when it fires do the ranks exchange
which of them saw a non-finite value locally, to name them.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_anchor import runtime
from megatron_anchor.errors import UserError

# Megatron-LM's SIGNAL_MAP: the signals a scheduler or a user sends to ask for a clean stop.
SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT,
           "SIGUSR1": signal.SIGUSR1, "SIGUSR2": signal.SIGUSR2}


class TrainingDiverged(UserError):
    """A non-finite loss or gradient norm: the run stops before anything is saved."""


class ExitSignal:
    """`--exit-signal-handler`: while entered, the signal sets `received` instead of ending
    the process; the previous handler comes back on exit."""

    def __init__(self, name: str):
        self.name = name
        self.signum = SIGNALS[name]
        self.received = False
        self._previous = None

    def _handler(self, signum, frame):  # noqa: ARG002 (signal handler signature)
        self.received = True

    def __enter__(self):
        self._previous = signal.signal(self.signum, self._handler)
        return self

    def __exit__(self, *exc):
        signal.signal(self.signum, self._previous)


@dataclasses.dataclass(frozen=True)
class Stop:
    reason: str
    urgent: bool  # a signal or the time limit: save and go, no final validation


class StopRules:
    """The reason to stop after an iteration, the same on every rank (`after`)."""

    def __init__(self, cfg, started_at: float, exit_signal: Optional[ExitSignal]):
        c = cfg.checkpoint
        self.train_iters = cfg.optim.train_iters
        self.exit_interval = c.exit_interval
        self.minutes = c.exit_duration_in_mins
        self.started_at = started_at
        self.exit_signal = exit_signal
        self._collective = dist.is_initialized() and dist.get_world_size() > 1 and \
            (exit_signal is not None or self.minutes is not None)

    def after(self, done: int) -> Optional[Stop]:
        """Why the run stops after iteration `done` (None: it goes on). Collective in a
        multi-rank run with the signal handler or a time limit."""
        received = bool(self.exit_signal and self.exit_signal.received)
        elapsed = time.time() - self.started_at
        if self._collective:
            votes = torch.tensor([float(received), elapsed], dtype=torch.float64)
            votes = runtime.all_reduce_host(votes, op=dist.ReduceOp.MAX)
            received, elapsed = bool(votes[0] > 0), float(votes[1])
        if received:
            return Stop(f"received {self.exit_signal.name} (--exit-signal-handler)", True)
        if self.minutes is not None and elapsed >= 60.0 * self.minutes:
            return Stop(f"--exit-duration-in-mins {self.minutes:g} reached ({elapsed / 60:.2f} "
                        "min since the trainer started)", True)
        if done >= self.train_iters:
            return Stop(f"--train-iters {self.train_iters} done", False)
        if self.exit_interval and done % self.exit_interval == 0:
            return Stop(f"--exit-interval {self.exit_interval}", False)
        return None


def ranks_where(local_flag: bool) -> List[int]:
    """The ranks whose `local_flag` is set. Collective: every rank must call it."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [0] if local_flag else []
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int32)
    flags[dist.get_rank()] = int(local_flag)
    flags = runtime.all_reduce_host(flags)
    return [r for r, f in enumerate(flags.tolist()) if f]


def is_finite(value: Optional[float]) -> bool:
    return value is None or math.isfinite(value)


def diverged(iteration: int, what: str, ranks: List[int], where: str,
             newest_checkpoint: Optional[str], load_hint: Optional[str]) -> TrainingDiverged:
    """The one line of a non-finite stop: `what` ("the loss is nan") and on which ranks
    (`where` says how they saw it)."""
    on = (f"rank(s) {', '.join(map(str, ranks))} ({where})" if ranks else
          "every rank (no rank saw it locally: it arose in the reduction over ranks)")
    if newest_checkpoint:
        good = f"the newest good checkpoint is {newest_checkpoint}" + \
            (f" (--load {load_hint} resumes from it)" if load_hint else "")
    else:
        good = "no checkpoint was saved"
    return TrainingDiverged(
        f"iteration {iteration}: {what} on {on}; stopped before saving "
        f"anything: {good}. Lower --lr, or --clip-grad; "
        "--no-check-for-nan-in-loss-and-grad turns this check off")

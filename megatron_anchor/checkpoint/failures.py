"""Save errors as one line, on every rank: from wherever torch and dist_checkpointing raise
them (`describe`), from the log where megatron-core 0.19's writer leaves them
(`LoggedErrors`), exchanged between the ranks (`exchange`), and from a rank that left a
collective the others still wait in (`PeerFailureWatch`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import weakref
from typing import List, Optional, Tuple

import torch

from megatron_anchor import runtime
from megatron_anchor.errors import UserError

# How long a rank waits inside dist_checkpointing after another rank's save failed before it
# gives up with that rank's error (the failed rank is no longer in the collective it waits in).
PEER_FAILURE_GRACE_S = 30.0

# What a checkpoint failure never swallows. torch.distributed.checkpoint's
# CheckpointException derives from BaseException, so the handlers below catch that and let
# only these through.
NOT_OURS = (KeyboardInterrupt, SystemExit, GeneratorExit)


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


def describe(err: BaseException, logged: List[str] = ()) -> Tuple[int, str, Optional[int]]:
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


class LoggedErrors(logging.Handler):
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


def side_group():
    """A gloo group of its own for the error exchange: a rank that left dist_checkpointing
    early must not meet, in the exchange, a collective the other ranks still wait in there.
    Made at the first save (collective, as saves are) of each world."""
    world = torch.distributed.group.WORLD
    if _SIDE_GROUP[0] is not world:
        _SIDE_GROUP[:] = [world, torch.distributed.new_group(backend="gloo")]
    return _SIDE_GROUP[1]


def exchange(error: Optional[tuple]) -> List[Tuple[int, tuple]]:
    """Every rank's error (rank, (how telling, text, where)); collective in a multi-rank
    run."""
    world = runtime.world_size()
    if world > 1 and torch.distributed.is_initialized():
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, error, group=side_group())
    else:
        gathered = [error]
    return [(r, e) for r, e in enumerate(gathered) if e is not None]


class PeerFailureWatch:
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

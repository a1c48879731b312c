"""Helpers for multi-process gloo tests: run a function on N CPU ranks and collect results."""

from __future__ import annotations

import io
import os
import queue as queue_module
import time
import traceback

import torch
import torch.multiprocessing as mp

from megatron_anchor.runtime import free_port


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        # Tensors are sent as bytes: shared-memory handles die with the child process.
        buffer = io.BytesIO()
        torch.save(fn(rank, world_size, *args), buffer)
        queue.put((rank, buffer.getvalue(), None))
    except BaseException:  # report every failure to the parent, with its traceback
        queue.put((rank, None, traceback.format_exc()))


def run_on_ranks(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """Run `fn(rank, world_size, *args)` in `world_size` spawned processes; return results by rank.

    `fn` must be importable (module level) and its return value picklable.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    deadline = time.monotonic() + timeout
    while len(results) < world_size and not errors:
        try:
            rank, value, error = queue.get(timeout=1.0)
        except queue_module.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                errors.append(f"rank(s) {dead} died without reporting (exit codes "
                              f"{[procs[r].exitcode for r in dead]})")
            elif time.monotonic() > deadline:
                errors.append(f"no answer from every rank within {timeout:.0f}s (hung?)")
            continue
        if error:
            errors.append(f"rank {rank}:\n{error}")
        results[rank] = torch.load(io.BytesIO(value), weights_only=False) if value else None
    for p in procs:
        p.join(timeout=30 if not errors else 2)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("distributed test failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def run_command(command, timeout: float, cwd=None, env=None):
    """Run a command line as a user would; on timeout kill its whole process group
    (torchrun's workers too) and raise TimeoutError with what it printed.

    Returns (returncode, stdout, stderr).
    """
    import os
    import signal
    import subprocess

    process = subprocess.Popen([str(c) for c in command], cwd=cwd, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise TimeoutError(f"{command} timed out after {timeout:.0f}s\n{stdout}\n"
                           f"{stderr[-3000:]}") from None
    return process.returncode, stdout, stderr


def fresh_launch_env(**extra) -> dict:
    """The environment for a launch from a test: without the test process's own one-rank
    world (RANK, MASTER_PORT, ...), which a child would otherwise try to join."""
    import os

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(extra)
    return env

"""The runtime: the one place that decides CPU or GPU and sets up the process groups.

Launch like any Megatron job (`torchrun`, SLURM's srun with torchrun, or a single process):
the usual RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT variables are read by
`torch.distributed`. On CPU the backend is gloo and the shims of `megatron_anchor.cpu` are
installed; on GPU it is NCCL on the local device.

The device is decided once per process (`decide_device`): `--cpu` forces the CPU, and with
no CUDA device visible the CPU is chosen automatically, said in one line. Every other
module asks `is_cpu()` / `device()`; none looks at CUDA itself.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from megatron_anchor.errors import UserError


class ParallelLayoutError(UserError):
    """A world size or parallel layout that cannot be set up; the message says what to run."""


_CPU: Optional[bool] = None
_WHY = ""
_ANNOUNCED = False


def _announce() -> None:
    """One line, once per process, on rank 0, when the process groups are set up on CPU."""
    global _ANNOUNCED
    if _CPU and not _ANNOUNCED and rank() == 0:
        print(f"megatron-anchor: running on CPU ({_WHY}): gloo process groups, Megatron-Core's "
              "PyTorch fallbacks for Transformer Engine/Apex kernels", file=sys.stderr,
              flush=True)
    _ANNOUNCED = True


def decide_device(cpu: Optional[bool] = None) -> bool:
    """True for CPU. `cpu=None`: automatic (CPU when no CUDA device is visible).

    The first decision of the process sticks; a later explicit request for the other
    device is an error, because Megatron's state (RNG tracker, buffers) is already set up.
    """
    global _CPU, _WHY
    wanted = (not torch.cuda.is_available()) if cpu is None else bool(cpu)
    if _CPU is not None:
        if cpu is not None and wanted != _CPU:
            raise ParallelLayoutError(
                f"this process already runs on {'CPU' if _CPU else 'GPU'}; cannot switch")
        return _CPU
    if not wanted and not torch.cuda.is_available():
        raise ParallelLayoutError("no CUDA device is visible: run with --cpu (gloo) instead")
    if wanted:
        # A GPU-only tuning hint (overlap of TP communication with CUDA streams).
        warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    _CPU = wanted
    _WHY = "no CUDA device visible" if cpu is None else "--cpu"
    return _CPU


def is_cpu() -> bool:
    return decide_device(None) if _CPU is None else _CPU


def device() -> torch.device:
    if is_cpu():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


@dataclass(frozen=True)
class Runtime:
    """Where this process runs and its place in Megatron's parallel groups."""

    cpu: bool
    rank: int
    world_size: int
    tp: int
    cp: int
    dp: int
    tp_rank: int
    cp_rank: int
    dp_rank: int

    @property
    def device(self) -> torch.device:
        return device()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_env() -> None:
    """Single-process runs (python script.py) get a one-rank world on loopback."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())


def rank() -> int:
    """This process's global rank: torch.distributed's once it is set up, else the
    launcher's RANK (torchrun, srun), else 0. Usable before any process group exists
    (one-line errors are printed by rank 0 only)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def check_world_size(world: int, *layouts) -> int:
    """The data-parallel size for TP×CP `layouts` ((tp, cp) pairs); refuses a bad world."""
    bad = [(tp, cp) for tp, cp in layouts if world % (tp * cp)]
    if bad:
        need = math.lcm(*(tp * cp for tp, cp in layouts))
        names = ", ".join(f"TP×CP = {tp}×{cp}" for tp, cp in bad)
        raise ParallelLayoutError(
            f"{world} process(es) do not divide into {names}: launch a multiple of {need} "
            f"processes (torchrun --nproc-per-node {need})")
    tp, cp = layouts[0]
    return world // (tp * cp)


def initialize(tp: int = 1, cp: int = 1, *, cpu: Optional[bool] = None, seed: int = 1234,
               timeout_minutes: int = 10) -> Runtime:
    """torch.distributed, Megatron-Core's model-parallel groups and RNG seeds for (tp, cp).

    Re-entrant: an existing world is kept and Megatron's groups are rebuilt for this layout
    (the parity tool runs several layouts in one world).
    """
    from megatron.core import parallel_state

    _default_env()
    use_cpu = decide_device(cpu)
    check_world_size(world_size(), (tp, cp))
    _announce()
    if use_cpu:
        from megatron_anchor.cpu import enable_cpu_mode

        enable_cpu_mode()
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group("gloo" if use_cpu else "nccl",
                                timeout=timedelta(minutes=timeout_minutes))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, context_parallel_size=cp)
    manual_seed(seed)
    return current()


def ensure_initialized(tp: int = 1, cp: int = 1, *, cpu: Optional[bool] = None,
                       seed: int = 1234) -> Runtime:
    """Use the caller's process groups if they exist (they must match), else set them up."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return initialize(tp, cp, cpu=cpu, seed=seed)
    have = current()
    if (have.tp, have.cp) != (tp, cp):
        raise ParallelLayoutError(
            f"process groups already exist with TP={have.tp}, CP={have.cp}; this asks for "
            f"TP={tp}, CP={cp}")
    decide_device(cpu)
    if have.cpu:
        from megatron_anchor.cpu import enable_cpu_mode

        enable_cpu_mode()
    return have


def current() -> Runtime:
    from megatron.core import parallel_state

    return Runtime(
        cpu=is_cpu(),
        rank=rank(),
        world_size=world_size(),
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        cp=parallel_state.get_context_parallel_world_size(),
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
    )


def manual_seed(seed: int) -> None:
    """Seed torch and Megatron's model-parallel RNG tracker (CPU or CUDA)."""
    if is_cpu():
        from megatron_anchor.cpu import model_parallel_manual_seed

        model_parallel_manual_seed(seed)
    else:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_host(values: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """All-reduce a small host tensor (losses, token counts, votes) and return it on the host.
    NCCL reduces only CUDA tensors ("No backend type associated with device type cpu", found
    on the first H200 run), so on a GPU the values travel through the device."""
    if not dist.is_initialized():
        return values
    on_device = values.to(device())
    dist.all_reduce(on_device, op=op, group=group)
    return on_device.cpu()

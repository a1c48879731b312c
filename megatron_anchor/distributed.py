"""Process groups: torch.distributed plus Megatron-Core's `parallel_state`, CPU or GPU.

Launch like any Megatron job (`torchrun`, SLURM's srun with torchrun, or a single
process): the usual RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT variables
are read by `torch.distributed`. With `cpu=True` the backend is gloo and the CPU shims of
`megatron_anchor.cpu` are installed; otherwise NCCL on the local GPU.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron.core import parallel_state


def _default_env() -> None:
    """Single-process runs (python script.py) get a one-rank world on loopback."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(tensor_model_parallel_size: int = 1, context_parallel_size: int = 1,
               cpu: bool = False, seed: int = 1234, timeout_minutes: int = 10) -> None:
    """Initialise torch.distributed, Megatron-Core's model-parallel groups and RNG seeds."""
    _default_env()
    world = int(os.environ["WORLD_SIZE"])
    model_parallel = tensor_model_parallel_size * context_parallel_size
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not divisible by TP×CP = {tensor_model_parallel_size}×"
            f"{context_parallel_size}; launch a multiple of {model_parallel} processes"
        )
    if cpu:
        from megatron_anchor.cpu import enable_cpu_mode

        enable_cpu_mode()
    elif not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is visible: pass --cpu to run on CPU over gloo")
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group("gloo" if cpu else "nccl",
                                timeout=timedelta(minutes=timeout_minutes))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        context_parallel_size=context_parallel_size,
    )
    manual_seed(seed, cpu)


def manual_seed(seed: int, cpu: bool) -> None:
    if cpu:
        from megatron_anchor.cpu import model_parallel_manual_seed

        model_parallel_manual_seed(seed)
    else:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0

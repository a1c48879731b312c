"""Megatron's tensor-parallel split of full tensors, and its inverse for gradients.

Every TP-sharded Megatron parameter carries `tensor_model_parallel`, `partition_dim` and
`partition_stride` (set by ColumnParallelLinear, RowParallelLinear and
VocabParallelEmbedding). The split is Megatron's own `_initialize_affine_weight_cpu`:
cut the full tensor along `partition_dim` into TP·stride equal chunks and give rank r
chunks r, r+TP, r+2·TP, ... Stride 2 is SwiGLU's fused fc1 (each rank holds
[gate_r; up_r]); the fused QKV weight is grouped per query group, so a plain contiguous
split hands each rank whole groups. Reading the attributes instead of matching names
keeps this correct for every layer Megatron shards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from megatron_anchor import runtime


def _tp_attributes(param):
    if not getattr(param, "tensor_model_parallel", False):
        return None
    return int(param.partition_dim), int(getattr(param, "partition_stride", 1))


def split_for_rank(full: torch.Tensor, dim: int, stride: int, tp_size: int,
                   tp_rank: int) -> torch.Tensor:
    """Rank `tp_rank`'s shard of `full` (Megatron's strided split)."""
    if full.shape[dim] % (tp_size * stride):
        raise ValueError(f"dimension {dim} of size {full.shape[dim]} does not split into "
                         f"TP={tp_size} × stride {stride} equal chunks")
    chunks = torch.chunk(full, tp_size * stride, dim=dim)
    return torch.cat(chunks[tp_rank::tp_size], dim=dim)


def join_shards(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of `split_for_rank` over all ranks' shards (in TP rank order)."""
    per_rank = [torch.chunk(s, stride, dim=dim) for s in shards]
    return torch.cat([per_rank[r][s] for s in range(stride) for r in range(len(shards))],
                     dim=dim)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """A TP=1 model's parameters, detached copies on the CPU in FP32 (the master weights)."""
    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise RuntimeError("full_state_dict reads a TP=1 model; build it under tp1cpN")
    return {name: p.detach().float().cpu().clone() for name, p in model.named_parameters()}


@torch.no_grad()
def load_full_state_dict(model, full: dict[str, torch.Tensor]) -> None:
    """Copy full (TP=1) parameters into `model`, keeping this rank's TP shard of each."""
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    names = dict(model.named_parameters())
    if set(names) != set(full):
        missing, extra = sorted(set(names) - set(full)), sorted(set(full) - set(names))
        raise ValueError(f"state dict does not match the model: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    for name, param in names.items():
        value = full[name]
        attributes = _tp_attributes(param)
        if attributes is not None:
            value = split_for_rank(value, *attributes, tp_size, tp_rank)
        if value.shape != param.shape:
            raise ValueError(f"{name}: shard of shape {tuple(value.shape)} for a parameter "
                             f"of shape {tuple(param.shape)}")
        param.copy_(value.to(param.device))


def _all_gather(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, tensor.contiguous(), group=group)
    return pieces


def full_gradients(model) -> dict[str, torch.Tensor]:
    """Full (TP-joined) FP32 gradients, on every rank of the TP group, on the CPU.

    Call after gradients have been summed over the CP group (`reduce_gradients_over_cp`).
    """
    group = parallel_state.get_tensor_model_parallel_group()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        attributes = _tp_attributes(param)
        if attributes is not None and dist.get_world_size(group) > 1:
            grad = join_shards(_all_gather(grad, group), *attributes)
        grads[name] = grad.detach().float().cpu()
    return grads


def reduce_gradients_over_cp(model) -> None:
    """Sum gradients over the CP group, as Megatron's DDP does over DP×CP.

    Every CP rank holds the same weights but sees only its share of the tokens.
    """
    if parallel_state.get_context_parallel_world_size() == 1:
        return
    group = parallel_state.get_context_parallel_group()
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, group=group)


def gradient_norm(model) -> float:
    """L2 norm of the full gradient: TP shards summed, TP duplicates counted once."""
    squares = torch.zeros((), dtype=torch.float64)
    for param in model.parameters():
        if param.grad is not None and param_is_not_tensor_parallel_duplicate(param):
            squares += param.grad.detach().double().pow(2).sum().cpu()
    squares = runtime.all_reduce_host(
        squares, group=parallel_state.get_tensor_model_parallel_group())
    return float(squares.sqrt())

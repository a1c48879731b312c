"""Full logits from one model replica: join the vocab shards (TP), then the token shards (CP)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core import parallel_state

from megatron_anchor.layout import unshard_cp


def _all_gather(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, tensor.contiguous(), group=group)
    return pieces


def gather_full_logits(local_logits: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[T_local, V/tp] vocab-parallel logits of this CP share -> [T, V] in window order.

    Collective over the replica's TP and CP groups; every rank of the replica gets the
    result (rank 0 of the world is in replica 0, so it always holds one).
    """
    logits = local_logits.detach()
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        tp_group = parallel_state.get_tensor_model_parallel_group()
        logits = torch.cat(_all_gather(logits, tp_group), dim=-1)
    cp_size = parallel_state.get_context_parallel_world_size()
    if cp_size > 1:
        cp_group = parallel_state.get_context_parallel_group()
        logits = unshard_cp(_all_gather(logits, cp_group), cu_seqlens.cpu(), cp_size)
    return logits


def sum_over_cp(value: torch.Tensor) -> torch.Tensor:
    """A per-rank partial sum (loss, token count) summed over the CP group."""
    value = value.detach().clone()
    if parallel_state.get_context_parallel_world_size() > 1:
        dist.all_reduce(value, group=parallel_state.get_context_parallel_group())
    return value

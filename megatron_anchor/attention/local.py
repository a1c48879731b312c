"""Exact packed (THD) causal attention in pure PyTorch, on any device.

Segments of similar length are grouped into buckets, right-padded to the bucket's
longest segment and run through one batched `scaled_dot_product_attention` call. Right
padding is exact under a causal mask: a real query never sees a later (padded) key, and
padded queries are dropped. Cost is Σ_bucket n·L_max², within `PADDED_COST_SLACK` of
Σ L_i², and no tensor ever spans two segments, so nothing of size S×S is built.

Under context parallelism each rank holds chunks r and 2cp-1-r of every segment. K and V
are all-gathered over the CP group (gradients are reduced back in the backward pass) and
each local query chunk attends the keys of its own segment up to its global position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_anchor.layout import check_cp_divisibility, cp_partition_indices, unshard_cp

# A bucket accepts a shorter segment while its padded cost stays within this factor of
# the real cost; larger saves kernel launches, smaller saves padded FLOPs.
PADDED_COST_SLACK = 1.15


@dataclass
class _Bucket:
    q_index: torch.Tensor   # [n, Lq] rows of local q (clamped inside each segment)
    k_index: torch.Tensor   # [n, Lk] rows of the full K/V (clamped inside each segment)
    q_valid: torch.Tensor   # [n, Lq] bool, real query rows
    mask: Optional[torch.Tensor]  # [n, 1, Lq, Lk] bool, or None for plain causal
    # A segment alone in its bucket needs no gather: ((q0, q1), (k0, k1), mask or None)
    single: Optional[tuple] = None


def plan_buckets(lengths: list[int], slack: float = PADDED_COST_SLACK) -> list[list[int]]:
    """Group segment indices so each group's padded cost n·max² ≤ slack·Σ len²."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets, current, real_cost = [], [], 0
    for i in order:
        cost = lengths[i] ** 2
        if current:
            longest = lengths[current[0]]
            if (len(current) + 1) * longest ** 2 <= slack * (real_cost + cost):
                current.append(i)
                real_cost += cost
                continue
            buckets.append(current)
        current, real_cost = [i], cost
    if current:
        buckets.append(current)
    return buckets


def _padded_rows(starts, lengths, width):
    """[n, width] row indices start+j, clamped to the segment's last row, and validity."""
    j = torch.arange(width)
    starts = torch.as_tensor(starts, dtype=torch.int64)[:, None]
    lengths = torch.as_tensor(lengths, dtype=torch.int64)[:, None]
    return starts + torch.minimum(j[None, :], lengths - 1), j[None, :] < lengths


def _build_buckets(cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int) -> list[_Bucket]:
    bounds = cu_seqlens.to(torch.int64).tolist()
    seg_lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    local_lengths = [n // cp_size for n in seg_lengths]
    local_starts = [0]
    for n in local_lengths[:-1]:
        local_starts.append(local_starts[-1] + n)

    buckets = []
    for members in plan_buckets(seg_lengths):
        lk = max(seg_lengths[i] for i in members)
        lq = lk // cp_size
        q_index, q_valid = _padded_rows([local_starts[i] for i in members],
                                        [local_lengths[i] for i in members], lq)
        k_index, _ = _padded_rows([bounds[i] for i in members],
                                  [seg_lengths[i] for i in members], lk)
        mask = None
        if cp_size > 1:
            q_pos = torch.stack([_local_positions(seg_lengths[i], cp_size, cp_rank, lq)
                                 for i in members])
            mask = (torch.arange(lk)[None, None, :] <= q_pos[:, :, None])[:, None]
        single = None
        if len(members) == 1:
            i = members[0]
            single = ((local_starts[i], local_starts[i] + local_lengths[i]),
                      (bounds[i], bounds[i + 1]), None if mask is None else mask[0, 0])
        buckets.append(_Bucket(q_index, k_index, q_valid, mask, single))
    return buckets


def _local_positions(length: int, cp_size: int, cp_rank: int, width: int) -> torch.Tensor:
    """In-segment positions of this rank's two chunks, padded to `width` with the last one."""
    chunk = length // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk)
    pos = torch.cat([first, second])
    if pos.numel() < width:
        pos = torch.cat([pos, pos[-1:].expand(width - pos.numel())])
    return pos


def packed_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    softmax_scale: Optional[float] = None,
    cp_group=None,
) -> torch.Tensor:
    """Causal attention within each THD segment.

    q: [T, Hq, D], k/v: [T, Hkv, D] (Hq a multiple of Hkv, GQA); returns [T, Hq, D].
    With a CP group of size > 1, T is this rank's share and `cu_seqlens` is global.
    """
    cp_size = dist.get_world_size(cp_group) if cp_group is not None else 1
    cp_rank = dist.get_rank(cp_group) if cp_group is not None else 0
    check_cp_divisibility(cu_seqlens, cp_size)
    total = int(cu_seqlens[-1])
    if q.shape[0] * cp_size != total:
        raise ValueError(
            f"packed attention got {q.shape[0]} local tokens but cu_seqlens covers {total} "
            f"tokens over {cp_size} CP rank(s)"
        )
    if cp_size > 1:
        k = gather_cp(k, cu_seqlens, cp_group)
        v = gather_cp(v, cu_seqlens, cp_group)
    gqa = q.shape[1] != k.shape[1]
    cu_cpu = cu_seqlens.detach().cpu()

    if cp_size == 1 and cu_cpu.numel() == 2:  # one segment: no gathering at all
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            is_causal=True, scale=softmax_scale, enable_gqa=gqa)
        return out[0].transpose(0, 1)

    out = q.new_empty(q.shape)
    for bucket in _build_buckets(cu_cpu, cp_size, cp_rank):
        if bucket.single is not None:
            _attend_slices(q, k, v, out, bucket.single, softmax_scale, gqa)
            continue
        device = q.device
        qi, ki = bucket.q_index.to(device), bucket.k_index.to(device)
        mask = bucket.mask.to(device) if bucket.mask is not None else None
        ob = F.scaled_dot_product_attention(
            q[qi].transpose(1, 2), k[ki].transpose(1, 2), v[ki].transpose(1, 2),
            attn_mask=mask, is_causal=mask is None, scale=softmax_scale, enable_gqa=gqa)
        valid = bucket.q_valid.to(device)
        out.index_copy_(0, qi[valid], ob.transpose(1, 2)[valid])
    return out


def _attend_slices(q, k, v, out, single, softmax_scale, gqa):
    """A segment alone in its bucket: zero-copy views in, one slice written out."""
    (q_start, q_end), (k_start, k_end), mask = single
    view = lambda x, a, b: x[a:b].transpose(0, 1)[None]
    o = F.scaled_dot_product_attention(
        view(q, q_start, q_end), view(k, k_start, k_end), view(v, k_start, k_end),
        attn_mask=None if mask is None else mask.to(q.device), is_causal=mask is None,
        scale=softmax_scale, enable_gqa=gqa)
    out[q_start:q_end] = o[0].transpose(0, 1)


class _GatherCP(torch.autograd.Function):
    """All-gather a CP-sharded THD tensor into full order; backward all-reduces and slices.

    Plain all_gather + all_reduce keeps this working on gloo, which has no reduce_scatter.
    """

    @staticmethod
    def forward(ctx, local, cu_seqlens, group):
        world = dist.get_world_size(group)
        pieces = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(pieces, local.contiguous(), group=group)
        ctx.group, ctx.cu_seqlens = group, cu_seqlens
        return unshard_cp(pieces, cu_seqlens, world)

    @staticmethod
    def backward(ctx, grad_full):
        grad_full = grad_full.contiguous()
        dist.all_reduce(grad_full, group=ctx.group)
        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        index = cp_partition_indices(ctx.cu_seqlens, world, rank).to(grad_full.device)
        return grad_full.index_select(0, index), None, None


def gather_cp(local: torch.Tensor, cu_seqlens: torch.Tensor, group) -> torch.Tensor:
    return _GatherCP.apply(local, cu_seqlens.detach().cpu(), group)

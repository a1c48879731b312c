"""Exact packed (THD) causal attention in pure PyTorch, on any device.

Every THD segment is a *query sequence*: query rows of this rank's q against a range of key
rows of the segment, causal with the two ranges aligned at their ends (query i sees keys
up to i + len_k - len_q). Without CP that is the whole segment against itself; under CP it
is each of the rank's two chunks (`layout.cp_chunk_ranges`) against the keys of its segment
up to the chunk's end, which makes the causal offset of the late chunk exact.

Query sequences of similar size are grouped into buckets, right-padded to the bucket's
largest one and run through one batched `scaled_dot_product_attention` call. Cost is
Σ_bucket n·Lq·Lk, within `PADDED_COST_SLACK` of Σ len_q·len_k, and no tensor ever spans two
segments, so nothing of size S×S is built.

The plan (rows to gather, bucket shapes, masks) depends only on `cu_seqlens`, so it is
built once per batch on the host (`plan_attention`, cached on the batch's packed-seq
params by `batch_plan`) and every layer reuses its device tensors: a layer does no host
sync. All rows of a layer are gathered with one `index_select` per tensor and written back
with one, so the backward is one `index_add` per tensor, not one full-size zero-filled
gradient per segment.

Masks: a bucket whose members all start their keys at their queries' start is plain causal
(`is_causal`, no mask). Under CP the other buckets need the offset: on the CPU a boolean
mask; on CUDA no boolean mask is ever passed (torch 2.11's cuDNN backward returns NaN
grad_q for masked calls at seq_len % 128 == 64, pytorch#196678, float masks included), so
a bucket of one uses a lower-right causal bias (no mask tensor) and a larger bucket an
additive float mask on the memory-efficient kernel, which does not have that bug.

Under context parallelism K and V are all-gathered over the CP group (gradients are
all-reduced back in the backward pass).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from megatron_anchor.layout import check_cp_divisibility, cp_chunk_ranges, cp_partition_indices

# A bucket accepts a smaller query sequence while its padded cost stays within this factor
# of the real cost; larger saves kernel launches, smaller saves padded FLOPs. On the CPU a
# call costs tens of microseconds and a padded FLOP as much as a real one, so only
# sequences of equal size share a call (benchmarks/attention.py's `alone` case is the
# one-call-per-segment floor this stays close to).
PADDED_COST_SLACK = 1.15
CPU_PADDED_COST_SLACK = 1.0

# Kernels for masked calls on CUDA: not cuDNN (pytorch#196678, see the module docstring).
_MASKED_CUDA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class QuerySequence:
    """Rows [q_start, q_start+len_q) of local q against rows [k_start, k_start+len_k) of
    the full K/V; query i sees keys j <= i + len_k - len_q."""

    q_start: int
    k_start: int
    len_q: int
    len_k: int

    @property
    def offset(self) -> int:
        return self.len_k - self.len_q


def host_bounds(cu_seqlens: torch.Tensor) -> List[int]:
    return cu_seqlens.detach().to("cpu", torch.int64).tolist()


def query_sequences(bounds: List[int], cp_size: int = 1, cp_rank: int = 0) -> List[QuerySequence]:
    """This rank's query sequences, in local-row order (the order of `shard_for_cp`)."""
    seqs, q_start = [], 0
    for start, end in zip(bounds[:-1], bounds[1:]):
        for a, b in cp_chunk_ranges(end - start, cp_size, cp_rank):
            seqs.append(QuerySequence(q_start, start, b - a, b))
            q_start += b - a
    return seqs


def plan_buckets(lengths: List[int], slack: float = PADDED_COST_SLACK,
                 key_lengths: Optional[List[int]] = None) -> List[List[int]]:
    """Group indices so each group's padded cost n·max(len_q)·max(len_k) ≤ slack·Σ len_q·len_k.

    `lengths` are query lengths; `key_lengths` default to them (self-attention segments).
    """
    keys = lengths if key_lengths is None else key_lengths
    order = sorted(range(len(lengths)), key=lambda i: (-keys[i], -lengths[i]))
    buckets, current = [], []
    real_cost = widest_q = 0
    for i in order:
        cost = lengths[i] * keys[i]
        if current:
            longest_k = keys[current[0]]
            wq = max(widest_q, lengths[i])
            if (len(current) + 1) * wq * longest_k <= slack * (real_cost + cost):
                current.append(i)
                real_cost += cost
                widest_q = wq
                continue
            buckets.append(current)
        current, real_cost, widest_q = [i], cost, lengths[i]
    if current:
        buckets.append(current)
    return buckets


@dataclass
class _Bucket:
    n: int
    width_q: int
    width_k: int
    kind: str                      # "causal" | "lower_right" | "mask"
    mask: Optional[torch.Tensor]   # [n, 1, Wq, Wk]: bool (CPU) or additive float (CUDA)


@dataclass
class AttentionPlan:
    """Everything a layer needs for one batch, on its device; built once per batch."""

    cp_size: int
    cp_rank: int
    total_tokens: int              # all ranks (what cu_seqlens covers)
    local_tokens: int
    whole: bool                    # one segment, no CP: one SDPA call on q/k/v as they are
    cuda_kernels: bool             # the CUDA formulation (no boolean masks)
    buckets: List[_Bucket] = field(default_factory=list)
    q_rows: Optional[torch.Tensor] = None    # rows of local q, bucket by bucket; None = as is
    k_rows: Optional[torch.Tensor] = None    # rows of K (CP: of the rank-major all-gather)
    out_rows: Optional[torch.Tensor] = None  # each local token's row in the padded output
    q_splits: List[int] = field(default_factory=list)
    k_splits: List[int] = field(default_factory=list)


def _rows(start: int, length: int, width: int) -> torch.Tensor:
    """start + j for j < width, clamped to the sequence's last row (padding repeats it)."""
    return start + torch.arange(width).clamp(max=length - 1)


def cp_gather_positions(bounds: List[int], cp_size: int) -> torch.Tensor:
    """For every token of the window, its row in the rank-major all-gather of the shards."""
    cu = torch.tensor(bounds, dtype=torch.int64)
    local = bounds[-1] // cp_size
    position = torch.empty(bounds[-1], dtype=torch.int64)
    for rank in range(cp_size):
        position[cp_partition_indices(cu, cp_size, rank)] = rank * local + torch.arange(local)
    return position


def plan_attention(cu_seqlens: torch.Tensor, cp_size: int = 1, cp_rank: int = 0,
                   device=None, dtype: torch.dtype = torch.float32,
                   cuda_kernels: Optional[bool] = None,
                   slack: Optional[float] = None) -> AttentionPlan:
    """The bucket plan of a batch (host work; one device copy of each index tensor).

    `cuda_kernels` (default: whether `device` is CUDA) picks the formulation without boolean
    masks; tests run it on the CPU too. `dtype` is that of q (for additive masks). `slack`
    defaults to the formulation's (`PADDED_COST_SLACK`, `CPU_PADDED_COST_SLACK`).
    """
    device = torch.device(device if device is not None else "cpu")
    cuda = device.type == "cuda" if cuda_kernels is None else bool(cuda_kernels)
    if slack is None:
        slack = PADDED_COST_SLACK if cuda else CPU_PADDED_COST_SLACK
    bounds = host_bounds(cu_seqlens)
    check_cp_divisibility(torch.tensor(bounds), cp_size)
    total = bounds[-1]
    plan = AttentionPlan(cp_size, cp_rank, total, total // cp_size,
                         whole=cp_size == 1 and len(bounds) == 2, cuda_kernels=cuda)
    if plan.whole:
        return plan

    seqs = query_sequences(bounds, cp_size, cp_rank)
    groups = plan_buckets([s.len_q for s in seqs], slack, [s.len_k for s in seqs])
    # Buckets in row order, so a window of lone segments needs no gather at all.
    groups = sorted((sorted(g, key=lambda i: seqs[i].q_start) for g in groups),
                    key=lambda g: seqs[g[0]].q_start)
    gather_positions = cp_gather_positions(bounds, cp_size) if cp_size > 1 else None

    q_rows, k_rows, out_rows = [], [], torch.empty(plan.local_tokens, dtype=torch.int64)
    padded = 0
    for members in groups:
        ms = [seqs[i] for i in members]
        wq, wk = max(s.len_q for s in ms), max(s.len_k for s in ms)
        for slot, s in enumerate(ms):
            q_rows.append(_rows(s.q_start, s.len_q, wq))
            k_rows.append(_rows(s.k_start, s.len_k, wk))
            base = padded + slot * wq
            out_rows[s.q_start:s.q_start + s.len_q] = torch.arange(base, base + s.len_q)
        padded += len(ms) * wq
        plan.q_splits.append(len(ms) * wq)
        plan.k_splits.append(len(ms) * wk)
        plan.buckets.append(_bucket(ms, wq, wk, cuda, device, dtype))

    q_rows, k_rows = torch.cat(q_rows), torch.cat(k_rows)
    if gather_positions is not None:
        k_rows = gather_positions[k_rows]
    identity = torch.arange(plan.local_tokens)
    if not (q_rows.numel() == plan.local_tokens and torch.equal(q_rows, identity)):
        plan.q_rows = q_rows.to(device)
    if not (k_rows.numel() == plan.local_tokens and torch.equal(k_rows, identity)
            and cp_size == 1):
        plan.k_rows = k_rows.to(device)
    if not torch.equal(out_rows, identity) or padded != plan.local_tokens:
        plan.out_rows = out_rows.to(device)
    return plan


def _bucket(ms: List[QuerySequence], wq: int, wk: int, cuda: bool, device, dtype) -> _Bucket:
    if all(s.offset == 0 for s in ms) and wq == wk:
        return _Bucket(len(ms), wq, wk, "causal", None)
    if cuda and len(ms) == 1:
        return _Bucket(1, wq, wk, "lower_right", None)
    offsets = torch.tensor([s.offset for s in ms])[:, None, None]
    visible = torch.arange(wk)[None, None, :] <= torch.arange(wq)[None, :, None] + offsets
    if cuda:
        additive = torch.zeros(visible.shape, dtype=dtype)
        mask = additive.masked_fill_(~visible, float("-inf"))
    else:
        mask = visible
    return _Bucket(len(ms), wq, wk, "mask", mask[:, None].to(device))


def batch_plan(packed_seq_params, key: tuple, build: Callable[[], object]):
    """A per-batch object cached on the batch's packed-seq params (they live for one batch
    and reach every layer), so each layer reuses what the first one built."""
    cache = packed_seq_params.__dict__.setdefault("_attention_plans", {})
    if key not in cache:
        cache[key] = build()
    return cache[key]


def host_cu_seqlens(packed_seq_params) -> torch.Tensor:
    """cu_seqlens on the host: the CPU copy `model.packed_seq_params` keeps, else one copy."""
    cu = getattr(packed_seq_params, "cu_seqlens_cpu", None)
    return cu if cu is not None else packed_seq_params.cu_seqlens_q.detach().cpu()


def cp_size_and_rank(cp_group) -> tuple:
    if cp_group is None:
        return 1, 0
    return dist.get_world_size(cp_group), dist.get_rank(cp_group)


def local_plan(packed_seq_params, query: torch.Tensor, cp_group=None) -> AttentionPlan:
    """This batch's plan for the `local` backend (built by the first layer that asks)."""
    cp_size, cp_rank = cp_size_and_rank(cp_group)
    key = ("local", cp_size, cp_rank, str(query.device), query.dtype)
    return batch_plan(packed_seq_params, key, lambda: plan_attention(
        host_cu_seqlens(packed_seq_params), cp_size, cp_rank, query.device, query.dtype))


def packed_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    softmax_scale: Optional[float] = None,
    cp_group=None,
    plan: Optional[AttentionPlan] = None,
) -> torch.Tensor:
    """Causal attention within each THD segment.

    q: [T, Hq, D], k/v: [T, Hkv, D] (Hq a multiple of Hkv, GQA); returns [T, Hq, D].
    With a CP group of size > 1, T is this rank's share and `cu_seqlens` is global.
    `plan` (from `plan_attention`/`local_plan`) skips the host work; without one it is
    built here, which reads `cu_seqlens` on the host.
    """
    cp_size, cp_rank = cp_size_and_rank(cp_group)
    if plan is None:
        plan = plan_attention(cu_seqlens, cp_size, cp_rank, q.device, q.dtype)
    if (plan.cp_size, plan.cp_rank) != (cp_size, cp_rank):
        raise ValueError(f"attention plan made for CP rank {plan.cp_rank} of {plan.cp_size}, "
                         f"used on rank {cp_rank} of {cp_size}")
    if q.shape[0] != plan.local_tokens:
        raise ValueError(
            f"packed attention got {q.shape[0]} local tokens but cu_seqlens covers "
            f"{plan.total_tokens} tokens over {cp_size} CP rank(s)")
    if plan.whole:
        out = _sdpa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                    _Bucket(1, q.shape[0], k.shape[0], "causal", None), softmax_scale)
        return out[0].transpose(0, 1)

    if cp_size > 1:
        k, v = gather_cp(k, plan.k_rows, cp_group), gather_cp(v, plan.k_rows, cp_group)
    elif plan.k_rows is not None:
        k, v = k.index_select(0, plan.k_rows), v.index_select(0, plan.k_rows)
    return attend_planned(q, k, v, plan, softmax_scale)


def attend_planned(q, k, v, plan: AttentionPlan, softmax_scale=None) -> torch.Tensor:
    """The kernel calls: this rank's q [T_local, Hq, D] against k/v already gathered into
    the plan's key rows (`plan.k_rows` applied; under CP, of the rank-major all-gather)."""
    if plan.q_rows is not None:
        q = q.index_select(0, plan.q_rows)
    outs = []
    pieces = zip(plan.buckets, q.split(plan.q_splits), k.split(plan.k_splits),
                 v.split(plan.k_splits))
    for bucket, qb, kb, vb in pieces:
        n = bucket.n
        ob = _sdpa(qb.view(n, bucket.width_q, *qb.shape[1:]).transpose(1, 2),
                   kb.view(n, bucket.width_k, *kb.shape[1:]).transpose(1, 2),
                   vb.view(n, bucket.width_k, *vb.shape[1:]).transpose(1, 2),
                   bucket, softmax_scale)
        outs.append(ob.transpose(1, 2).reshape(n * bucket.width_q, ob.shape[1], ob.shape[3]))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out if plan.out_rows is None else out.index_select(0, plan.out_rows)


def _sdpa(q, k, v, bucket: _Bucket, scale):
    """One SDPA call on [n, H, L, D] views, in the formulation the bucket asks for."""
    gqa = q.shape[1] != k.shape[1]
    if gqa and q.is_cuda and (bucket.kind != "causal" or q.dtype == torch.float32):
        # What these calls reach on CUDA may not take enable_gqa (the memory-efficient kernel,
        # FP32; torch's lower-right bias drops the flag), and SDPA would then fall back to
        # its S² math path: repeat the K/V heads instead.
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        gqa = False
    if bucket.kind == "causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=gqa)
    if bucket.kind == "lower_right":
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=causal_lower_right(q.shape[-2], k.shape[-2]), scale=scale,
            enable_gqa=gqa)
    if bucket.mask.dtype == torch.bool:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bucket.mask, scale=scale,
                                              enable_gqa=gqa)
    with sdpa_kernel(_MASKED_CUDA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bucket.mask, scale=scale,
                                              enable_gqa=gqa)


class _GatherCP(torch.autograd.Function):
    """All-gather CP shards (rank-major) and pick `rows`; backward all-reduces and slices.

    Plain all_gather + all_reduce keeps this working on gloo, which has no reduce_scatter.
    """

    @staticmethod
    def forward(ctx, local, rows, group):
        world = dist.get_world_size(group)
        gathered = local.new_empty((world * local.shape[0],) + tuple(local.shape[1:]))
        dist.all_gather(list(gathered.chunk(world)), local.contiguous(), group=group)
        ctx.save_for_backward(rows)
        ctx.group, ctx.local_rows = group, local.shape[0]
        return gathered.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        world = dist.get_world_size(ctx.group)
        full = grad.new_zeros((world * ctx.local_rows,) + tuple(grad.shape[1:]))
        full.index_add_(0, rows, grad)
        dist.all_reduce(full, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        return full[rank * ctx.local_rows:(rank + 1) * ctx.local_rows], None, None


def gather_cp(local: torch.Tensor, rows: torch.Tensor, group) -> torch.Tensor:
    """Rows `rows` of the rank-major all-gather of `local` over `group` (differentiable)."""
    return _GatherCP.apply(local, rows, group)

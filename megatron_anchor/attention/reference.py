"""Dense-mask FP64 attention: the yardstick every backend is checked against.

Builds the full [S, S] visibility matrix, so it is for tests and tools on short windows
only, never for the packed training path. Works on any device (the mask is built where
`cu_seqlens` lives; move it to q's device for CUDA checks).
"""

from __future__ import annotations

import math

import torch


def dense_reference_attention(q, k, v, visible: torch.Tensor, softmax_scale=None):
    """q [T, Hq, D], k/v [T, Hkv, D], visible [T, T] bool (query, key) -> [T, Hq, D] in FP64."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~visible.to(scores.device)[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def segment_causal_visibility(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[T, T] bool on cu_seqlens' device: same THD segment and key not after query."""
    device = cu_seqlens.device
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    idx = torch.arange(seg.numel(), device=device)
    return (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])


def reference_with_grads(q, k, v, cu_seqlens, grad_out, softmax_scale=None):
    """FP64 output and q/k/v gradients of causal attention within each THD segment."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = dense_reference_attention(*leaves, segment_causal_visibility(cu_seqlens),
                                    softmax_scale)
    grads = torch.autograd.grad(out, leaves, grad_out.double())
    return (out.detach(),) + tuple(grads)


def simulated_cp(attend, q, k, v, cu_seqlens, grad_out, cp_size):
    """Every CP rank's share in one process, reassembled in window order.

    `attend(rank, q_local, k_gathered, v_gathered)` gets the rank's rows of q
    (`cp_partition_indices`) and the rank-major concatenation of every rank's K/V shard (what
    the all-gather hands a rank), and returns the rank's output rows. Returns output and
    q/k/v gradients (K/V gradients summed over ranks, as the all-reduce does), so a CP
    backend's bookkeeping is checked without a process group, on any device.
    """
    from megatron_anchor.layout import cp_partition_indices

    cu = cu_seqlens.detach().cpu()
    shards = [cp_partition_indices(cu, cp_size, r).to(q.device) for r in range(cp_size)]
    order = torch.cat(shards)
    out, dq = torch.zeros_like(q), torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for rank, rows in enumerate(shards):
        q_local = q.detach()[rows].requires_grad_()
        k_all = k.detach()[order].requires_grad_()
        v_all = v.detach()[order].requires_grad_()
        o = attend(rank, q_local, k_all, v_all)
        o.backward(grad_out[rows].to(o.dtype))
        out[rows] = o.detach().to(out.dtype)
        dq[rows] = q_local.grad.to(dq.dtype)
        dk.index_add_(0, order, k_all.grad.to(dk.dtype))
        dv.index_add_(0, order, v_all.grad.to(dv.dtype))
    return out, dq, dk, dv


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    """max |result - reference| / max |reference| (in FP64)."""
    reference = reference.double()
    return float((result.double() - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def dense_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                      scale=None, window_size=(-1, -1), enable_gqa=False):
    """What `torch.nn.attention.varlen.varlen_attn` computes, densely in FP64, per sequence.

    The yardstick for callers of the kernel (and a CPU stand-in for it): sequence b is
    queries [cu_seq_q[b], cu_seq_q[b+1]) against keys [cu_seq_k[b], cu_seq_k[b+1]); causal
    (`window_size=(-1, 0)`) is aligned at the bottom right, as in FlashAttention: query i
    sees keys j <= i + Lk - Lq. Reads cu_seqlens on the host: a reference, not a kernel.
    """
    if tuple(window_size) not in ((-1, -1), (-1, 0)):
        raise ValueError(f"dense_varlen_attn models full or causal windows, got {window_size}")
    if key.shape[1] != query.shape[1] and not enable_gqa:
        raise ValueError(f"{query.shape[1]} query heads on {key.shape[1]} key/value heads "
                         "without enable_gqa")
    bounds_q, bounds_k = cu_seq_q.tolist(), cu_seq_k.tolist()
    lengths_q = [b - a for a, b in zip(bounds_q[:-1], bounds_q[1:])]
    lengths_k = [b - a for a, b in zip(bounds_k[:-1], bounds_k[1:])]
    if max(lengths_q) > max_q or max(lengths_k) > max_k:
        raise ValueError(f"max_q/max_k {max_q}/{max_k} below the longest sequences "
                         f"{max(lengths_q)}/{max(lengths_k)}")
    outs = []
    for (qa, qb), (ka, kb) in zip(zip(bounds_q[:-1], bounds_q[1:]),
                                  zip(bounds_k[:-1], bounds_k[1:])):
        lq, lk = qb - qa, kb - ka
        visible = torch.ones(lq, lk, dtype=torch.bool, device=query.device)
        if tuple(window_size) == (-1, 0):
            visible = (torch.arange(lk, device=query.device)[None, :]
                       <= torch.arange(lq, device=query.device)[:, None] + (lk - lq))
        q, k, v = query[qa:qb].double(), key[ka:kb].double(), value[ka:kb].double()
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        scores = torch.einsum("qhd,khd->hqk", q, k) * s
        probs = torch.softmax(scores.masked_fill(~visible[None], float("-inf")), dim=-1)
        outs.append(torch.einsum("hqk,khd->qhd", probs, v))
    return torch.cat(outs).to(query.dtype)

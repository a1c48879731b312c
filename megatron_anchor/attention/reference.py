"""Dense-mask FP64 attention: the yardstick every backend is checked against.

Builds the full [S, S] visibility matrix, so it is for tests and tools on short windows
only, never for the packed training path.
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
    scores = scores.masked_fill(~visible[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def segment_causal_visibility(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[T, T] bool: same THD segment and key not after query."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    seg = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    idx = torch.arange(seg.numel())
    return (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])

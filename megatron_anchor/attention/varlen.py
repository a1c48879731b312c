"""The `varlen` core attention: PyTorch's own `torch.nn.attention.varlen.varlen_attn`.

FlashAttention-2 inside torch (torch >= 2.10), for GPUs without Transformer Engine: a whole
THD window in one kernel call, BF16/FP16, RoPE applied by us in FP32 at the window
positions (`core.rotate_query_key`).

What the kernel is given (the contract tests/attention/test_varlen_contract.py checks with
a dense stand-in):

* q [Tq, Hq, D] and k/v [Tk, Hkv, D] in THD layout, `cu_seq_q`/`cu_seq_k` int32 on q's
  device, `max_q`/`max_k` Python ints, `scale`, causal as `window_size=(-1, 0)` (torch >=
  2.11; `is_causal=True` on 2.10).
* GQA: `enable_gqa=True` where varlen_attn has it (torch >= 2.13); torch 2.10-2.12's wrapper
  takes no such flag and documents equal head counts, so there K/V heads are repeated.
* Causal alignment: FlashAttention aligns the causal mask to the bottom-right corner when a
  query sequence is shorter than its key sequence (query i sees keys j <= i + Lk - Lq);
  torch's own lower-right causal bias dispatches to the same kernel for that reason
  (torch/nn/attention/bias.py).
* Without CP the query and key sequences are the THD segments themselves. Under CP each
  rank's two chunks of a segment (`layout.cp_chunk_ranges`) are two query sequences, and
  each one's key sequence is its segment's keys from the segment start up to the chunk's
  end, taken from the all-gathered K/V. A chunk ending at in-segment position p thus sees
  keys [0, p] of its segment, bottom-right aligned: exactly causal. The two key prefixes
  of a segment overlap, and cu_seqlens cannot express overlap, so the gathered rows
  repeat them: (2·CP+1)/(2·CP) of the window's K/V per rank.

The plan (cu_seqlens, maxima, key rows) is built once per batch on the host and cached on
the batch's packed-seq params, so a layer does no host sync.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch


from megatron_anchor.attention.core import PackedCoreAttention
from megatron_anchor.attention.local import (
    batch_plan, cp_gather_positions, cp_size_and_rank, gather_cp, host_bounds, host_cu_seqlens,
    query_sequences,
)
from megatron_anchor.attention import BackendError
from megatron_anchor.layout import check_cp_divisibility

KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def varlen_kernel() -> Optional[Callable]:
    """torch's `varlen_attn`, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_unavailable_reason() -> Optional[str]:
    """Why the `varlen` backend cannot run here (None: it can)."""
    if varlen_kernel() is None:
        return (f"needs torch.nn.attention.varlen.varlen_attn (torch >= 2.10); this torch "
                f"{torch.__version__} has none")
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (varlen_attn is FlashAttention; no CPU kernel)"
    return None


@functools.lru_cache(maxsize=None)
def _kernel_options(kernel) -> tuple:
    """(causal keyword arguments, whether the kernel takes enable_gqa) for this torch."""
    params = inspect.signature(kernel).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return causal, "enable_gqa" in params


@dataclass
class VarlenPlan:
    """The kernel's sequence description for one batch on one CP rank (device tensors)."""

    cp_size: int
    cp_rank: int
    total_tokens: int
    local_tokens: int
    cu_seqlens_q: torch.Tensor          # int32, over this rank's q rows
    cu_seqlens_k: torch.Tensor          # int32, over the key rows handed to the kernel
    max_q: int
    max_k: int
    key_rows: Optional[torch.Tensor]    # CP: rows of the rank-major all-gather of K/V


def plan_varlen(cu_seqlens: torch.Tensor, cp_size: int = 1, cp_rank: int = 0,
                device=None) -> VarlenPlan:
    """Host work once per batch: query/key cu_seqlens, their maxima, the CP key rows."""
    device = torch.device(device if device is not None else "cpu")
    bounds = host_bounds(cu_seqlens)
    check_cp_divisibility(torch.tensor(bounds), cp_size)
    seqs = query_sequences(bounds, cp_size, cp_rank)
    cu_q = torch.tensor([0] + [s.len_q for s in seqs]).cumsum(0)
    cu_k = torch.tensor([0] + [s.len_k for s in seqs]).cumsum(0)
    key_rows = None
    if cp_size > 1:
        window_rows = torch.cat([torch.arange(s.k_start, s.k_start + s.len_k) for s in seqs])
        key_rows = cp_gather_positions(bounds, cp_size)[window_rows].to(device)
    return VarlenPlan(
        cp_size, cp_rank, bounds[-1], bounds[-1] // cp_size,
        cu_q.to(device=device, dtype=torch.int32), cu_k.to(device=device, dtype=torch.int32),
        max(s.len_q for s in seqs), max(s.len_k for s in seqs), key_rows)


def varlen_plan(packed_seq_params, query: torch.Tensor, cp_group=None) -> VarlenPlan:
    """This batch's plan (built by the first layer that asks, then reused)."""
    cp_size, cp_rank = cp_size_and_rank(cp_group)
    key = ("varlen", cp_size, cp_rank, str(query.device))
    return batch_plan(packed_seq_params, key, lambda: plan_varlen(
        host_cu_seqlens(packed_seq_params), cp_size, cp_rank, query.device))


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: VarlenPlan,
                     softmax_scale: Optional[float] = None, kernel: Optional[Callable] = None):
    """The kernel call: q [Tq, Hq, D] against k/v already laid out as the plan's key
    sequences ([Tk, Hkv, D]); returns [Tq, Hq, D]."""
    kernel = kernel or varlen_kernel()
    if kernel is None:
        raise BackendError(f"attention backend 'varlen' {varlen_unavailable_reason()}")
    causal, takes_gqa = _kernel_options(kernel)
    options = dict(causal, scale=softmax_scale)
    if q.shape[1] != k.shape[1]:
        if takes_gqa:
            options["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return kernel(q, k, v, plan.cu_seqlens_q, plan.cu_seqlens_k, plan.max_q, plan.max_k,
                  **options)


def varlen_packed_attention(q, k, v, plan: VarlenPlan, softmax_scale=None, cp_group=None,
                            kernel: Optional[Callable] = None):
    """Causal attention within each THD segment through varlen_attn; CP by K/V all-gather.

    q/k/v: this rank's rows ([T_local, heads, D]); returns [T_local, Hq, D].
    """
    cp_size, cp_rank = cp_size_and_rank(cp_group)
    if (plan.cp_size, plan.cp_rank) != (cp_size, cp_rank):
        raise ValueError(f"varlen plan made for CP rank {plan.cp_rank} of {plan.cp_size}, "
                         f"used on rank {cp_rank} of {cp_size}")
    if q.shape[0] != plan.local_tokens:
        raise ValueError(
            f"packed attention got {q.shape[0]} local tokens but cu_seqlens covers "
            f"{plan.total_tokens} tokens over {cp_size} CP rank(s)")
    if cp_size > 1:
        k, v = gather_cp(k, plan.key_rows, cp_group), gather_cp(v, plan.key_rows, cp_group)
    return varlen_attention(q, k, v, plan, softmax_scale, kernel)


class VarlenAnchorAttention(PackedCoreAttention):
    """Megatron core attention on torch's varlen_attn (FlashAttention-2), THD, CP by
    K/V all-gather. BF16/FP16 only, like the kernel."""

    backend_name = "varlen"

    def __init__(self, config, layer_number: int, *args, **kwargs):
        super().__init__(config, layer_number, *args, **kwargs)
        if config.params_dtype not in KERNEL_DTYPES:
            raise BackendError(f"attention backend 'varlen' runs BF16/FP16 only "
                               f"(FlashAttention has no {config.params_dtype} kernel): add "
                               "--bf16, or use --attention-backend local")

    def attend(self, query, key, value, packed_seq_params, cp_group):
        return varlen_packed_attention(query, key, value,
                                       varlen_plan(packed_seq_params, query, cp_group),
                                       self.softmax_scale, cp_group)

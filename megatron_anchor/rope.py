"""Rotary position embedding at explicit per-token positions.

Megatron-Core's THD RoPE restarts positions at every segment and casts cos/sin to
the activation dtype before rotating. The anchor layout needs neither: anchor copies
sit at position 0 and every other token keeps its offset in the window, and the
rotation runs in FP32 by default because BF16 rotation is one source of the
relative-position error this project exists to remove. `rope_fp32=False` reproduces
the BF16 behaviour (cos/sin and the products in the input dtype) for diagnostics.
"""

from __future__ import annotations

import torch


def rope_inv_freq(head_dim: int, rotary_base: float, device=None) -> torch.Tensor:
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    return 1.0 / (float(rotary_base) ** exponents)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, rotary_base: float):
    """FP32 cos/sin of shape [T, head_dim] for positions [T] (non-interleaved halves).

    Angles are formed in FP64: at position 1e5 an FP32 product is off by ~1e-2 rad, which
    would itself break the relative-position property at long context. The tables are
    built once per forward ([T, head_dim/2] elements), so the cost is negligible.
    """
    inv_freq = rope_inv_freq(head_dim, rotary_base, device=position_ids.device)
    angles = position_ids.to(torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(
    x: torch.Tensor,
    position_ids: torch.Tensor,
    rotary_base: float,
    rope_fp32: bool = True,
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] (or [T, 1, heads, head_dim]) at positions [T].

    `cos_sin` lets a caller reuse the FP32 tables across layers.
    """
    head_dim = x.shape[-1]
    if position_ids.dim() != 1 or position_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"position_ids must be 1-D with one entry per token: got {tuple(position_ids.shape)}"
            f" for {x.shape[0]} tokens"
        )
    cos, sin = cos_sin if cos_sin is not None else rope_cos_sin(position_ids, head_dim, rotary_base)
    view = (x.shape[0],) + (1,) * (x.dim() - 2) + (head_dim,)
    cos, sin = cos.view(view), sin.view(view)
    if rope_fp32:
        xf = x.float()
        return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)
    # BF16 reproduction: tables cast to the activation dtype, products in that dtype,
    # as Megatron-Core and most training stacks do.
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin

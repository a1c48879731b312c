"""Rotary position embedding at explicit per-token positions.

Megatron-Core's THD RoPE restarts positions at every segment and casts cos/sin to
the activation dtype before rotating. The anchor layout needs neither: anchor copies
sit at position 0 and every other token keeps its offset in the window, and the
rotation runs in FP32 by default because BF16 rotation is one source of the
relative-position error this project exists to remove. `rope_fp32=False` reproduces
the BF16 behaviour (cos/sin and the products in the input dtype) for diagnostics.

Frequency scaling: Llama-3.1/3.2's `llama3` scheme (`rope_scaling`, below) rescales the
inverse frequencies once; positions stay explicit, so it composes with the anchor layout.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

# The one scaling scheme modelled, with the keys it needs (Hugging Face names).
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings")


def check_rope_scaling(rope_scaling: Optional[dict]) -> Optional[dict]:
    """The canonical `rope_scaling` dict (or None); ValueError naming what is wrong.

    Only ``{"rope_type": "llama3", factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings}`` is modelled (Llama-3.1/3.2).
    """
    if not rope_scaling:
        return None
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ValueError(f"rope_scaling rope_type {kind!r} is not modelled (only 'llama3')")
    missing = [k for k in LLAMA3_KEYS if rope_scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling of type llama3 lacks {', '.join(missing)}")
    out = {"rope_type": "llama3"}
    for k in LLAMA3_KEYS:
        out[k] = float(rope_scaling[k])
    out["original_max_position_embeddings"] = int(out["original_max_position_embeddings"])
    if out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError("rope_scaling high_freq_factor must exceed low_freq_factor")
    return out


def rope_inv_freq(head_dim: int, rotary_base: float, device=None,
                  rope_scaling: Optional[dict] = None) -> torch.Tensor:
    """FP64 inverse frequencies [head_dim/2], with `llama3` scaling when given.

    The llama3 rule (as Meta's reference and transformers): wavelengths shorter than
    `original/high_freq_factor` keep their frequency, those longer than
    `original/low_freq_factor` are divided by `factor`, and the band in between is
    interpolated linearly in `original/wavelength`.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    inv_freq = 1.0 / (float(rotary_base) ** exponents)
    scaling = check_rope_scaling(rope_scaling)
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, rotary_base: float,
                 rope_scaling: Optional[dict] = None):
    """FP32 cos/sin of shape [T, head_dim] for positions [T] (non-interleaved halves).

    Angles are formed in FP64: at position 1e5 an FP32 product is off by ~1e-2 rad, which
    would itself break the relative-position property at long context. The tables are
    built once per forward ([T, head_dim/2] elements), so the cost is negligible.
    """
    inv_freq = rope_inv_freq(head_dim, rotary_base, device=position_ids.device,
                             rope_scaling=rope_scaling)
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
    rope_scaling: Optional[dict] = None,
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
    cos, sin = (cos_sin if cos_sin is not None
                else rope_cos_sin(position_ids, head_dim, rotary_base, rope_scaling))
    view = (x.shape[0],) + (1,) * (x.dim() - 2) + (head_dim,)
    cos, sin = cos.view(view), sin.view(view)
    if rope_fp32:
        xf = x.float()
        return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)
    # BF16 reproduction: tables cast to the activation dtype, products in that dtype,
    # as Megatron-Core and most training stacks do.
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin

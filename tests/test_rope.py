"""RoPE at explicit positions: the rotation, its relative property, and the BF16 switch."""

import torch

from megatron_anchor.rope import apply_rope


def complex_rope_reference(x, positions, base):
    """Rotate-half RoPE as a complex multiplication, in FP64."""
    d = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions.double()[:, None] * inv[None]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double())
    z = z * torch.polar(torch.ones_like(angle), angle)[:, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


def test_matches_complex_rotation():
    x = torch.randn(50, 3, 16)
    pos = torch.randint(0, 100000, (50,))
    torch.testing.assert_close(apply_rope(x, pos, 1e6).double(),
                               complex_rope_reference(x, pos, 1e6), rtol=1e-4, atol=1e-4)


def test_scores_depend_only_on_relative_position_in_fp32():
    q, k = torch.randn(1, 1, 64), torch.randn(1, 1, 64)
    score = lambda pq, pk: (apply_rope(q, torch.tensor([pq]), 1e4)
                            * apply_rope(k, torch.tensor([pk]), 1e4)).sum()
    torch.testing.assert_close(score(10, 3), score(1010, 1003), rtol=1e-4, atol=1e-4)


def test_bf16_rotation_switch_changes_rounding():
    x = torch.randn(256, 4, 64).bfloat16()
    pos = torch.arange(3000, 3256)
    fp32_rot = apply_rope(x, pos, 1e4, rope_fp32=True)
    bf16_rot = apply_rope(x, pos, 1e4, rope_fp32=False)
    exact = complex_rope_reference(x.float(), pos, 1e4)
    err32 = (fp32_rot.double() - exact).abs().mean()
    err16 = (bf16_rot.double() - exact).abs().mean()
    assert fp32_rot.dtype == bf16_rot.dtype == torch.bfloat16
    assert err16 > 1.5 * err32  # FP32 math then one rounding beats BF16 tables and products


def test_anchor_positions_are_used_as_given():
    x = torch.randn(3, 1, 8)
    out = apply_rope(x, torch.tensor([0, 7, 0]), 1e4)
    torch.testing.assert_close(out[0], x[0])
    torch.testing.assert_close(out[2], x[2])
    assert not torch.allclose(out[1], x[1])

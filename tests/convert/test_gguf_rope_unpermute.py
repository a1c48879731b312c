"""llama.cpp's Q/K permutation and its inverse, checked on the RoPE maths itself."""

import torch

from megatron_anchor.convert.gguf import permute_rope_rows, unpermute_rope_rows
from megatron_anchor.rope import apply_rope, rope_inv_freq


def interleaved_rope(x, positions, base):
    """llama.cpp's rotation: pairs (2i, 2i+1) rotated by angle pos * inv_freq[i]."""
    angles = positions.double()[:, None] * rope_inv_freq(x.shape[-1], base).double()[None]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def test_unpermute_inverts_permute():
    w = torch.randn(3 * 8, 5)
    assert torch.equal(unpermute_rope_rows(permute_rope_rows(w, 3), 3), w)
    assert not torch.equal(permute_rope_rows(w, 3), w)


def test_interleaved_rope_on_gguf_rows_equals_rotate_half_on_unpermuted_rows():
    torch.manual_seed(0)
    heads, head_dim, d, T, base = 3, 8, 16, 6, 10000.0
    wq_hf = torch.randn(heads * head_dim, d, dtype=torch.float64)
    x = torch.randn(T, d, dtype=torch.float64)
    positions = torch.arange(T) + 11
    wq_gguf = permute_rope_rows(wq_hf, heads)  # what the GGUF file stores
    # llama.cpp: interleaved RoPE on the stored rows.
    q_cpp = interleaved_rope((x @ wq_gguf.T).view(T, heads, head_dim), positions, base)
    # Us: un-permute, then Megatron's rotate-half RoPE.
    q_ours = apply_rope((x @ unpermute_rope_rows(wq_gguf, heads).T).view(T, heads, head_dim),
                        positions, base)
    # Same vectors up to the fixed row permutation, hence identical q.k scores.
    assert torch.allclose(permute_rope_rows(q_ours.reshape(T, -1).T, heads).T,
                          q_cpp.reshape(T, -1), atol=1e-6)
    scores_cpp = torch.einsum("thd,shd->hts", q_cpp, q_cpp)
    scores_ours = torch.einsum("thd,shd->hts", q_ours, q_ours)
    assert torch.allclose(scores_cpp, scores_ours, atol=1e-5)

"""A plain PyTorch Llama forward at explicit position ids, for diagnostics and tests.

Why a separate model instead of Megatron-Core's GPTModel: the shift experiment needs the
attention matrices of every layer for several position shifts at once, layer by layer,
without ever holding 30 layers x 9 heads x L^2 probabilities. Here the attention step is a
hook (`attention_fn`) that sees q/k/v of one layer for a whole batch of shifted copies of the
same window, so a caller can measure and discard. The Megatron model is checked against
this forward (tests/diagnostics), so the two agree on the same weights.

Precision. `Precision.dtype=torch.bfloat16` keeps weights and activations in BF16 and
emulates a GPU BF16 stack: every matmul takes BF16 inputs, accumulates in FP32 and rounds
its output to BF16 (what tensor cores and cuBLAS do); RMSNorm computes in FP32 and casts
back; residual adds round to BF16. Attention follows the fused kernels (FlashAttention,
cuDNN): q.k scores accumulate in FP32 from the BF16 q/k, softmax runs in FP32, and the
probabilities are cast to BF16 before multiplying V. `bf16_scores=True` instead rounds the
scores to BF16 before the softmax, as eager/unfused attention does. `rope_fp32` selects
where the rotation runs (see `megatron_anchor.rope.apply_rope`); its output is cast to the
activation dtype either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, asdict
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megatron_anchor.rope import apply_rope, rope_cos_sin


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where sums accumulate: FP32 for BF16/FP16/FP32 tensors, FP64 for FP64 ones."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class LlamaConfig:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    rotary_base: float
    norm_epsilon: float
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Precision:
    dtype: torch.dtype = torch.float32
    rope_fp32: bool = True
    bf16_scores: bool = False

    @property
    def name(self) -> str:
        if self.dtype == torch.float32:
            return "fp32"
        rope = "rope-fp32" if self.rope_fp32 else "rope-bf16"
        return f"bf16-{rope}" + ("-bf16-scores" if self.bf16_scores else "")


# Weight names (HF/Llama style, one tensor per projection, [out, in]):
#   embedding [V, d], output [V, d], final_norm [d], and per layer i "layers.{i}.<name>" with
#   attn_norm, wq [H*D, d], wk [G*D, d], wv [G*D, d], wo [d, H*D], ffn_norm, w_gate, w_up, w_down.


def random_init_weights(cfg: LlamaConfig, seed: int = 1234, init_std: float = 0.02) -> dict:
    """Seeded random weights like Megatron's default init (normal(0, 0.02); the two
    residual-output projections scaled by 1/sqrt(2*num_layers); norms at 1)."""
    gen = torch.Generator().manual_seed(seed)
    d, D, H, G = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    out_std = init_std / math.sqrt(2.0 * cfg.num_layers)

    def normal(shape, std):
        return torch.randn(shape, generator=gen) * std

    weights = {
        "embedding": normal((cfg.vocab_size, d), init_std),
        "final_norm": torch.ones(d),
        "output": normal((cfg.vocab_size, d), init_std),
    }
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        weights[p + "attn_norm"] = torch.ones(d)
        weights[p + "wq"] = normal((H * D, d), init_std)
        weights[p + "wk"] = normal((G * D, d), init_std)
        weights[p + "wv"] = normal((G * D, d), init_std)
        weights[p + "wo"] = normal((d, H * D), out_std)
        weights[p + "ffn_norm"] = torch.ones(d)
        weights[p + "w_gate"] = normal((cfg.ffn_hidden_size, d), init_std)
        weights[p + "w_up"] = normal((cfg.ffn_hidden_size, d), init_std)
        weights[p + "w_down"] = normal((d, cfg.ffn_hidden_size), out_std)
    return weights


@dataclass
class LayerAttentionInputs:
    """What the attention hook receives for one layer (B = batch of shifted copies)."""

    layer: int
    q: torch.Tensor  # [B, H, T, D] rotated, activation dtype
    k: torch.Tensor  # [B, G, T, D] rotated, activation dtype
    v: torch.Tensor  # [B, G, T, D]
    cu_seqlens: torch.Tensor  # int segment boundaries over T (causal within each segment)
    precision: Precision


AttentionFn = Callable[[LayerAttentionInputs], torch.Tensor]  # -> [B, H, T, D]


class ReferenceLlama:
    """Llama forward over a batch of copies of one packed window at different positions."""

    def __init__(self, cfg: LlamaConfig, weights: dict, precision: Precision = Precision()):
        self.cfg = cfg
        self.precision = precision
        self.weights = {name: w.to(precision.dtype) for name, w in weights.items()}
        # FP32 copies of the (BF16-rounded) matrices: CPU FP32 GEMMs are faster than BF16
        # ones and give the same FP32-accumulated products. (FP64 models stay FP64.)
        self._matrices = {name: w.to(compute_dtype(w.dtype)) for name, w in self.weights.items()
                          if w.dim() == 2}

    # -- building blocks -----------------------------------------------------------------

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x @ W^T with FP32 accumulation and the output rounded to the activation dtype."""
        return (x.to(compute_dtype(x.dtype)) @ self._matrices[name].T).to(x.dtype)

    def _rmsnorm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.to(compute_dtype(x.dtype))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.norm_epsilon)
        return (xf * weight.to(xf.dtype)).to(x.dtype)

    def rope_tables(self, position_ids: torch.Tensor) -> list:
        """FP32 cos/sin per copy, computed once per forward and shared by all layers."""
        return [rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rotary_base) for pos in position_ids]

    def _rope(self, x: torch.Tensor, position_ids: torch.Tensor, tables: list) -> torch.Tensor:
        """Rotate x [B, T, heads, D] at position_ids [B, T] with the project's apply_rope."""
        rotated = [
            apply_rope(x[b], position_ids[b], self.cfg.rotary_base,
                       rope_fp32=self.precision.rope_fp32, cos_sin=tables[b])
            for b in range(x.shape[0])
        ]
        return torch.stack(rotated)

    def attention_inputs(self, layer: int, hidden: torch.Tensor, position_ids, cu_seqlens,
                         tables: list | None = None):
        """Normed hidden [B, T, d] -> rotated q/k and v, heads first."""
        cfg, p = self.cfg, f"layers.{layer}."
        B, T, _ = hidden.shape
        tables = tables if tables is not None else self.rope_tables(position_ids)
        q = self._linear(hidden, p + "wq").view(B, T, cfg.num_attention_heads, -1)
        k = self._linear(hidden, p + "wk").view(B, T, cfg.num_query_groups, -1)
        v = self._linear(hidden, p + "wv").view(B, T, cfg.num_query_groups, -1)
        q, k = self._rope(q, position_ids, tables), self._rope(k, position_ids, tables)
        return LayerAttentionInputs(
            layer=layer, q=q.transpose(1, 2), k=k.transpose(1, 2), v=v.transpose(1, 2),
            cu_seqlens=cu_seqlens, precision=self.precision,
        )

    def _mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        p = f"layers.{layer}."
        gate = self._linear(x, p + "w_gate")
        up = self._linear(x, p + "w_up")
        return self._linear(F.silu(gate) * up, p + "w_down")

    # -- forward --------------------------------------------------------------------------

    def hidden_states(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: Optional[torch.Tensor] = None,
        attention_fn: Optional[AttentionFn] = None,
        num_layers: Optional[int] = None,
    ) -> torch.Tensor:
        """Final-normed hidden states [B, T, d].

        tokens [T] or [B, T]; position_ids [T] or [B, T] (one row per shifted copy).
        cu_seqlens: segment boundaries; attention is causal within each segment.
        """
        tokens, position_ids = self._batched(tokens, position_ids)
        T = tokens.shape[1]
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, T], dtype=torch.int32)
        attention_fn = attention_fn or segment_causal_attention
        hidden = self.weights["embedding"][tokens]
        tables = self.rope_tables(position_ids)
        for layer in range(num_layers if num_layers is not None else self.cfg.num_layers):
            p = f"layers.{layer}."
            inputs = self.attention_inputs(
                layer, self._rmsnorm(hidden, self.weights[p + "attn_norm"]), position_ids,
                cu_seqlens, tables)
            context = attention_fn(inputs)  # [B, H, T, D]
            context = context.transpose(1, 2).reshape(hidden.shape[0], T, -1)
            hidden = hidden + self._linear(context, p + "wo")
            hidden = hidden + self._mlp(layer, self._rmsnorm(hidden, self.weights[p + "ffn_norm"]))
        return self._rmsnorm(hidden, self.weights["final_norm"])

    def logits(self, tokens, position_ids, cu_seqlens=None, attention_fn=None) -> torch.Tensor:
        """Logits [B, T, V] in FP32."""
        hidden = self.hidden_states(tokens, position_ids, cu_seqlens, attention_fn)
        return self._linear(hidden.to(compute_dtype(hidden.dtype)), "output")

    @staticmethod
    def _batched(tokens, position_ids):
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        if tokens.dim() == 1:
            tokens = tokens[None].expand(position_ids.shape[0], -1)
        return tokens, position_ids


# ---------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------

def expand_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, G, T, D] -> [B, H, T, D]: query head h uses group h // (H/G) (Megatron and HF)."""
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)


def attention_scores(q: torch.Tensor, k: torch.Tensor, precision: Precision) -> torch.Tensor:
    """Scaled q.k^T in FP32 (FP32 accumulation of the q/k values; see module docstring)."""
    acc = compute_dtype(q.dtype)
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if precision.bf16_scores and q.dtype == torch.bfloat16:
        scores = scores.to(torch.bfloat16).float()
    return scores


def weighted_values(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs @ v, with probs cast to the activation dtype first as fused kernels do."""
    acc = compute_dtype(v.dtype)
    return (probs.to(v.dtype).to(acc) @ v.to(acc)).to(v.dtype)


def causal_block_mask(rows: slice, num_keys: int) -> torch.Tensor:
    """[rows, num_keys] bool, True where the key lies after the query (local indices)."""
    q_idx = torch.arange(rows.start, rows.stop)[:, None]
    return torch.arange(num_keys)[None, :] > q_idx


def segment_causal_attention(inputs: LayerAttentionInputs, block_rows: int = 1024) -> torch.Tensor:
    """Plain attention, causal within each segment of cu_seqlens -> [B, H, T, D]."""
    q, H = inputs.q, inputs.q.shape[1]
    k, v = expand_kv_heads(inputs.k, H), expand_kv_heads(inputs.v, H)
    out = torch.empty_like(q)
    bounds = inputs.cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        for r0 in range(0, end - start, block_rows):
            rows = slice(r0, min(r0 + block_rows, end - start))
            keys = slice(start, start + rows.stop)
            scores = attention_scores(q[:, :, start + rows.start:start + rows.stop], k[:, :, keys],
                                      inputs.precision)
            scores.masked_fill_(causal_block_mask(rows, rows.stop), float("-inf"))
            out[:, :, start + rows.start:start + rows.stop] = weighted_values(
                torch.softmax(scores, dim=-1), v[:, :, keys])
    return out


class AttentionCapture:
    """Attention hook that keeps pre-softmax scores S and probabilities A of chosen layers and
    heads (dense [copies, heads, T, T] per layer, FP32). For short windows and a few layers;
    the shift metrics use `shift_metrics.ShiftMetricAccumulator` instead, which never keeps
    them. Masked entries are -inf in S and 0 in A."""

    def __init__(self, layers, heads=None):
        self.layers, self.heads = set(layers), heads
        self.scores: dict = {}
        self.probs: dict = {}

    def __call__(self, inputs: LayerAttentionInputs) -> torch.Tensor:
        if inputs.layer in self.layers:
            H = inputs.q.shape[1]
            heads = list(range(H)) if self.heads is None else list(self.heads)
            k = expand_kv_heads(inputs.k, H)[:, heads]
            scores = attention_scores(inputs.q[:, heads], k, inputs.precision)
            bounds = inputs.cu_seqlens.to(torch.int64)
            seg = torch.repeat_interleave(torch.arange(bounds.numel() - 1), bounds[1:] - bounds[:-1])
            idx = torch.arange(seg.numel())
            visible = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
            scores = scores.masked_fill(~visible, float("-inf"))
            self.scores[inputs.layer] = scores
            self.probs[inputs.layer] = torch.softmax(scores, dim=-1)
        return segment_causal_attention(inputs)


def perplexity(model: "ReferenceLlama", token_ids: torch.Tensor) -> float:
    """exp(mean next-token NLL) of a ReferenceLlama over one causal window."""
    positions = torch.arange(token_ids.numel())
    with torch.no_grad():
        logits = model.logits(token_ids, positions)[0]
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), token_ids[1:])
    return math.exp(float(nll))

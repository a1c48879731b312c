"""Model FLOPs of a training step, counted the way Megatron-LM counts them.

Only matrix multiplications count (2 FLOPs per multiply-add); a training step is three
forward passes' worth (forward, and a backward that costs two), whatever activation
recomputation adds (that is hardware FLOPs; model FLOPs give MFU). Per token and layer of a
Llama-style model (h = hidden, n query heads, g query groups, d = kv channels, f = SwiGLU
width), forward:

* QKV projection ``2·h·(n + 2g)·d``, output projection ``2·n·d·h``;
* SwiGLU MLP ``2·h·2f + 2·f·h``;
* logits ``2·h·V`` once per token (V = padded vocabulary, as Megatron counts it).

Core attention (QKᵀ and the product with V, ``2·2·n·d`` per query-key pair) is counted per THD
segment, as Transformer Engine computes it: a causal segment of L tokens has L²/2 pairs
(Megatron's causal convention, S²/2 for a window of S tokens). The `full` variant has one
segment per window (S²/2); the document-masked variants (`intra-doc`, `intra-doc-reset`,
`anchor`) have one segment per document, Σ Lᵢ²/2 -- the saving the method is about.

MFU = achieved model FLOP/s per GPU / the GPU's dense peak for the training dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

# Dense (no sparsity) BF16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets (SXM
# parts). A GPU whose name contains the key uses that peak unless --peak-tflops is given.
PEAK_TFLOPS_BF16 = {
    "H100": 989.0,   # H100 SXM5; H100 PCIe is 756: pass --peak-tflops 756
    "H200": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "B200": 2250.0,
    "GB200": 2500.0,
    "L40S": 362.0,
}


@dataclass(frozen=True)
class FlopsShape:
    """What the FLOP count needs of a model."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    ffn_hidden_size: int
    vocab_size: int          # padded, as the output layer computes it
    gated_linear_unit: bool = True

    @classmethod
    def from_model_config(cls, cfg) -> "FlopsShape":
        """From `megatron_anchor.model.ModelConfig`."""
        heads = cfg.num_attention_heads
        return cls(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                   num_attention_heads=heads, num_query_groups=cfg.num_query_groups or heads,
                   kv_channels=getattr(cfg, "kv_channels", None) or cfg.hidden_size // heads,
                   ffn_hidden_size=cfg.ffn_size, vocab_size=cfg.padded_vocab_size,
                   gated_linear_unit=True)

    def dense_forward_flops_per_token(self) -> int:
        """Forward FLOPs of the projections, MLP and logits for one token (no attention core)."""
        h, n, g, d, f = (self.hidden_size, self.num_attention_heads, self.num_query_groups,
                         self.kv_channels, self.ffn_hidden_size)
        qkv = 2 * h * (n + 2 * g) * d
        proj = 2 * n * d * h
        mlp = 2 * h * f * (2 if self.gated_linear_unit else 1) + 2 * f * h
        return self.num_layers * (qkv + proj + mlp) + 2 * h * self.vocab_size

    def attention_forward_flops(self, pairs: float) -> float:
        """Forward FLOPs of core attention over `pairs` query-key pairs, all layers."""
        return self.num_layers * 4 * self.num_attention_heads * self.kv_channels * pairs


def causal_pairs(segment_lengths: Iterable[int]) -> float:
    """Query-key pairs of causal attention over these segments: Σ L²/2."""
    return sum(float(n) * float(n) for n in segment_lengths) / 2.0


def training_flops(shape: FlopsShape, num_tokens: int,
                   segment_lengths: Sequence[int]) -> float:
    """Model FLOPs of forward + backward over `num_tokens` slots whose causal THD segments
    have these lengths (their sum is `num_tokens`)."""
    forward = (shape.dense_forward_flops_per_token() * num_tokens
               + shape.attention_forward_flops(causal_pairs(segment_lengths)))
    return 3.0 * forward


def batch_training_flops(shape: FlopsShape, batch) -> float:
    """Training FLOPs of one packed (possibly collated) batch, all of it: `cu_seqlens` stays
    global under context parallelism, so a CP rank counts the whole micro-batch (divide by
    the CP size for its share)."""
    lengths = batch.segment_lengths.tolist()
    return training_flops(shape, int(sum(lengths)), lengths)


def default_peak_tflops(device_name: Optional[str] = None, bf16: bool = True) -> Optional[float]:
    """Dense BF16 peak of the current (or named) GPU; None on CPU, for FP32 runs or for an
    unknown GPU (then MFU needs --peak-tflops)."""
    if not bf16:
        return None
    if device_name is None:
        from megatron_anchor import runtime

        if runtime.is_cpu():
            return None
        device_name = torch.cuda.get_device_name()
    name = device_name.upper()
    for key in sorted(PEAK_TFLOPS_BF16, key=len, reverse=True):  # GB200 before B200
        if key in name:
            return PEAK_TFLOPS_BF16[key]
    return None


def throughput(flops: float, seconds: float, world_size: int,
               peak_tflops: Optional[float]) -> dict:
    """Model TFLOP/s per rank (GPU) and MFU (None without a peak)."""
    per_rank = flops / max(seconds, 1e-12) / max(world_size, 1) / 1e12
    return {"tflops_per_rank": per_rank,
            "mfu": per_rank / peak_tflops if peak_tflops else None}

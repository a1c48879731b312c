"""Per-GPU memory estimate of a training layout (the numbers behind examples/README.md).

BF16 mixed precision as Megatron-Core runs it, per rank:

* weights: 2 bytes per parameter of this rank (parameters / TP; norms are negligible);
* gradients: 4 bytes per parameter (DDP's FP32 `main_grad` buffers, grad_reduce_in_fp32);
* optimizer: FP32 main weights + Adam's two moments, 12 bytes per parameter, divided by the
  data-parallel x context-parallel size with `--use-distributed-optimizer` (Megatron shards
  it over the DP group with CP, whose ranks hold the same weights);
* activations per layer (Korthikanti et al., "Reducing Activation Recomputation in Large
  Transformer Models", with flash attention, so no s² term, and sequence parallelism):
  ``34·s·h / TP`` bytes for a stored layer, s = tokens per CP rank (here extended for GQA and
  SwiGLU: 2 bytes for every stored activation element); with full recomputation a layer keeps
  only its input, ``2·s·h / TP``, and one layer at a time is rebuilt in the backward;
  selective recomputation (core attention) saves nothing more once flash attention is used;
* the output layer: the BF16 logits, ``2·s·V / TP`` bytes, whose gradient the cross entropy
  writes in place (`model.vocab_parallel_cross_entropy`), plus its FP32 working chunk
  (two tensors of `CROSS_ENTROPY_CHUNK_ELEMENTS`).

It is an estimate (no allocator fragmentation, no communication buffers, no TE workspaces);
leave ~10 GB of an 80 GB GPU for those.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from megatron_anchor.model import CROSS_ENTROPY_CHUNK_ELEMENTS

GB = 1e9

# The cross entropy's FP32 working set: one upcast chunk of the logits and its exponentials.
CROSS_ENTROPY_WORKSPACE = 2 * 4.0 * CROSS_ENTROPY_CHUNK_ELEMENTS


@dataclass(frozen=True)
class Architecture:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int

    @property
    def parameters(self) -> int:
        h, f = self.hidden_size, self.ffn_hidden_size
        kv = h // self.num_attention_heads * self.num_query_groups
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h  # q, o, k, v, SwiGLU, norms
        return self.num_layers * per_layer + 2 * self.vocab_size * h + h  # untied emb/output

    @classmethod
    def from_model_config(cls, cfg) -> "Architecture":
        return cls(cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads,
                   cfg.num_query_groups or cfg.num_attention_heads, cfg.ffn_size,
                   cfg.padded_vocab_size)


def stored_layer_activation_bytes(arch: Architecture, tokens: int, tp: int) -> float:
    """Bytes one transformer layer keeps for its backward (BF16, flash attention, SP).

    Counted per token: the layer input and its norm (2h), Q, K, V (h + 2·kv), the attention
    output and its softmax statistics (h), the projection input (h), the residual and the MLP
    norm (2h), the SwiGLU inputs, gate, up and product (4f), all 2 bytes, sharded by TP.
    For Llama-2-7B shapes (f = 2.7h, MHA) this is 39.5·s·h/TP, a little above the 34·s·h/TP
    of the paper's GPT layer (4h GeLU MLP)."""
    h, f = arch.hidden_size, arch.ffn_hidden_size
    kv = h // arch.num_attention_heads * arch.num_query_groups
    per_token = 2 * h + (h + 2 * kv) + h + h + 2 * h + 4 * f
    return 2.0 * per_token * tokens / tp


@dataclass
class MemoryEstimate:
    parameters_per_rank: float
    weights: float
    gradients: float
    optimizer: float
    activations_per_layer: float
    activations_all_layers: float
    recompute_working_layer: float
    logits: float

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.activations_all_layers
                + self.recompute_working_layer + self.logits)

    def as_gb(self) -> dict:
        values = {k: v / GB for k, v in asdict(self).items() if k != "parameters_per_rank"}
        return dict(values, total=self.total / GB,
                    parameters_per_rank_billion=self.parameters_per_rank / 1e9)


def estimate(arch: Architecture, seq_length: int, tp: int, cp: int, dp: int = 1,
             recompute: Optional[str] = None, distributed_optimizer: bool = False,
             micro_batch_size: int = 1) -> MemoryEstimate:
    """Per-rank memory of one micro-batch of `micro_batch_size` windows of `seq_length`."""
    params = arch.parameters / tp
    tokens = seq_length * micro_batch_size / cp
    stored = stored_layer_activation_bytes(arch, tokens, tp)
    layer_input = 2.0 * tokens * arch.hidden_size / tp
    if recompute == "full":
        per_layer, working = layer_input, stored
    else:  # none, or selective (core attention: nothing stored with flash attention)
        per_layer, working = stored, 0.0
    shards = dp * cp if distributed_optimizer else 1
    return MemoryEstimate(
        parameters_per_rank=params,
        weights=2.0 * params,
        gradients=4.0 * params,
        optimizer=12.0 * params / shards,
        activations_per_layer=per_layer,
        activations_all_layers=per_layer * arch.num_layers,
        recompute_working_layer=working,
        logits=2.0 * tokens * arch.vocab_size / tp + CROSS_ENTROPY_WORKSPACE,
    )


# The paper's models (docs/design.md §8), vocabularies as the launch scripts pad them.
MODELS = {
    "llama2_7b": Architecture(32, 4096, 32, 32, 11008, 32000),
    "llama3_8b": Architecture(32, 4096, 32, 8, 14336, 128256),
    "mistral_7b_v0.3": Architecture(32, 4096, 32, 8, 14336, 32768),
    "qwen1.5_1.8b": Architecture(24, 2048, 16, 16, 5504, 151936),
}

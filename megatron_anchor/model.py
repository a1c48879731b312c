"""A Llama-style Megatron-Core `GPTModel` with AnchorAttention, and its packed forward.

The architecture is data (`ModelConfig`); parallel sizes come from Megatron-Core's
`parallel_state`, so the same config builds TP=1 and TP=2/CP=2 replicas.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_anchor.layout import PackedBatch
from megatron_anchor.spec import get_anchor_layer_spec


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None      # GQA; None = multi-head
    ffn_hidden_size: Optional[int] = None       # None = Llama's 8/3·h rounded to 64
    vocab_size: int = 256
    make_vocab_size_divisible_by: int = 128     # padding must not depend on TP size
    max_sequence_length: int = 131072
    rotary_base: float = 10000.0
    rope_fp32: bool = True
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    attention_backend: str = "local"
    bf16: bool = False
    sequence_parallel: bool = False
    cp_comm_type: str = "p2p"

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // m) * m

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        return 64 * -(-int(8 * self.hidden_size / 3) // 64)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**values)


def transformer_config(cfg: ModelConfig, use_cpu_initialization: Optional[bool] = None):
    tp = parallel_state.get_tensor_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    if cfg.padded_vocab_size % tp:
        raise ValueError(f"padded vocab {cfg.padded_vocab_size} is not divisible by TP={tp}")
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=tp,
        context_parallel_size=cp,
        sequence_parallel=cfg.sequence_parallel and tp > 1,
        cp_comm_type=cfg.cp_comm_type if cp > 1 else None,
        bf16=cfg.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=use_cpu_initialization,
        # Fused kernels are CUDA-only; the unfused paths are numerically the reference ones.
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def build_model(cfg: ModelConfig, use_cpu_initialization: Optional[bool] = None) -> GPTModel:
    """GPTModel with RMSNorm, SwiGLU, GQA, untied embeddings and AnchorAttention."""
    if cfg.sequence_parallel and cfg.attention_backend != "te":
        raise ValueError("--sequence-parallel needs the te attention backend "
                         "(it shards activations along the THD token axis)")
    config = transformer_config(cfg, use_cpu_initialization)
    return GPTModel(
        config=config,
        transformer_layer_spec=get_anchor_layer_spec(
            cfg.attention_backend, rotary_base=cfg.rotary_base, rope_fp32=cfg.rope_fp32),
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.max_sequence_length,
        position_embedding_type="none",
        share_embeddings_and_output_weights=False,
        parallel_output=True,
    )


def forward_packed(model, batch: PackedBatch, return_logits: bool = True):
    """Logits [T, V/tp] (vocab-parallel, this rank's CP share) and per-token loss [T].

    `batch` is a (possibly CP-sharded, possibly collated) PackedBatch already on the
    model's device. The loss is unmasked; apply `batch.loss_mask` when reducing.
    """
    params = batch.to_packed_seq_params()
    logits = model(batch.tokens[None], batch.position_ids[None], None,
                   packed_seq_params=params)[0]  # [T, V/tp]
    # Megatron's vocab-parallel cross entropy works in place on FP32 logits.
    ce_input = logits.float()
    if return_logits and ce_input.data_ptr() == logits.data_ptr():
        ce_input = ce_input.clone()
    loss = tensor_parallel.vocab_parallel_cross_entropy(ce_input[:, None],
                                                        batch.labels[:, None])[:, 0]
    return (logits if return_logits else None), loss


def masked_mean_loss(loss: torch.Tensor, loss_mask: torch.Tensor):
    """Sum of trained-token losses and their count (reduce both across ranks, then divide)."""
    mask = loss_mask.to(loss.dtype)
    return (loss * mask).sum(), mask.sum()

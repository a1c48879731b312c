"""A Llama-style Megatron-Core `GPTModel` with AnchorAttention, and its packed forward.

The architecture is data (`ModelConfig`); parallel sizes come from Megatron-Core's
`parallel_state`, so the same config builds TP=1 and TP=2/CP=2 replicas.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.utils import VocabUtility
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_anchor.errors import UserError
from megatron_anchor import backends, runtime
from megatron_anchor.layout import PackedBatch
from megatron_anchor.spec import get_anchor_layer_spec


class ModelLayoutError(UserError):
    """An architecture that cannot be split over the requested TP/CP layout."""


@dataclass
class AnchorPackedSeqParams(PackedSeqParams):
    """Megatron-Core THD params plus the explicit per-token RoPE positions.

    Megatron-Core's attention passes `packed_seq_params` through to the core attention
    untouched, so this is how positions that do not restart per segment reach it. It lives
    for one batch, so the attention backends cache their per-batch plans on it (the first
    layer builds them from `cu_seqlens_cpu`; no layer reads a device tensor on the host).
    """

    position_ids: Optional[torch.Tensor] = None
    cu_seqlens_cpu: Optional[torch.Tensor] = None   # the same cu_seqlens, on the host

    def as_megatron(self) -> PackedSeqParams:
        """A plain PackedSeqParams (what TE-facing code in Megatron-Core expects)."""
        names = {f.name for f in dataclasses.fields(PackedSeqParams)}
        return PackedSeqParams(**{n: getattr(self, n) for n in names})


def packed_seq_params(batch: PackedBatch, cp_group=None) -> AnchorPackedSeqParams:
    """The THD description of a packed batch (cu_seqlens == cu_seqlens_padded, see layout).

    The host copy of cu_seqlens is taken here, once per batch (one small device-to-host
    copy when the batch is on a GPU).
    """
    cu_seqlens = batch.cu_seqlens.to(device=batch.tokens.device, dtype=torch.int32)
    return AnchorPackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        cu_seqlens_q_padded=cu_seqlens,
        cu_seqlens_kv_padded=cu_seqlens,
        max_seqlen_q=int(batch.max_seqlen),
        max_seqlen_kv=int(batch.max_seqlen),
        cp_group=cp_group,
        position_ids=batch.position_ids,
        cu_seqlens_cpu=batch.cu_seqlens.detach().to("cpu", torch.int32),
    )


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
    # Activation recomputation (TransformerConfig's fields; not architecture): None, "full"
    # (whole layers, with recompute_method "uniform"|"block" and recompute_num_layers) or
    # "selective" (core attention only).
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    recompute_modules: Optional[List[str]] = None  # selective: None = ["core_attn"]
    # Hugging Face families (megatron_anchor.convert): Qwen's QKV bias, tied embeddings
    # (SmolLM2, Qwen2-0.5B), Llama-3.1's RoPE frequency scaling (megatron_anchor.rope).
    add_qkv_bias: bool = False
    share_embeddings_and_output_weights: bool = False
    rope_scaling: Optional[dict] = None

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
    check_parallel_layout(cfg, tp)
    if use_cpu_initialization is None:
        use_cpu_initialization = runtime.is_cpu()
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
        add_qkv_bias=cfg.add_qkv_bias,
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
        recompute_granularity=cfg.recompute_granularity,
        recompute_method=cfg.recompute_method,
        recompute_num_layers=cfg.recompute_num_layers,
        recompute_modules=list(cfg.recompute_modules) if cfg.recompute_modules else None,
    )


def check_parallel_layout(cfg: ModelConfig, tp: int) -> None:
    """Heads, key/value groups and the padded vocabulary must split evenly over TP."""
    groups = cfg.num_query_groups or cfg.num_attention_heads
    for flag, count in (("--num-attention-heads", cfg.num_attention_heads),
                        ("--num-query-groups", groups),
                        ("the padded vocabulary", cfg.padded_vocab_size)):
        if count % tp:
            raise ModelLayoutError(f"{flag} {count} does not divide by "
                                   f"--tensor-model-parallel-size {tp}")


def build_model(cfg: ModelConfig, use_cpu_initialization: Optional[bool] = None,
                initialize: bool = True) -> GPTModel:
    """GPTModel with RMSNorm, SwiGLU, GQA, (un)tied embeddings and AnchorAttention.

    `initialize=False` leaves the weights uninitialised (importers overwrite every one).
    """
    backend = backends.get(cfg.attention_backend).validate(
        cpu=runtime.is_cpu(), tp=parallel_state.get_tensor_model_parallel_world_size(),
        cp=parallel_state.get_context_parallel_world_size(),
        sequence_parallel=cfg.sequence_parallel, cp_comm_type=cfg.cp_comm_type,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups)
    config = transformer_config(cfg, use_cpu_initialization)
    config.perform_initialization = initialize
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_anchor_layer_spec(
            backend, rotary_base=cfg.rotary_base, rope_fp32=cfg.rope_fp32,
            rope_scaling=cfg.rope_scaling),
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.max_sequence_length,
        position_embedding_type="none",
        share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
        parallel_output=True,
    )
    # The local spec's torch norms ignore params_dtype; Megatron-LM's Float16Module casts the
    # whole model, so that every weight has an FP32 main copy in the mixed-precision optimizer.
    return model.bfloat16() if cfg.bf16 else model


# FP32 elements of one cross-entropy chunk: 2**25 is 128 MiB, 256 tokens of a 128K vocabulary
# (each chunk holds about two such FP32 temporaries; 64 MiB of BF16 logits per chunk).
CROSS_ENTROPY_CHUNK_ELEMENTS = 2 ** 25


def _local_targets(target, start, end):
    """Targets outside this TP rank's vocabulary slice, and the targets as local columns."""
    outside = (target < start) | (target >= end)
    return outside, (target - start).masked_fill(outside, 0)


class _ChunkedVocabParallelCrossEntropy(torch.autograd.Function):
    """Megatron-Core's vocab-parallel cross entropy, a chunk of tokens at a time.

    Megatron's `vocab_parallel_cross_entropy` upcasts the whole [T, V/tp] logits to FP32 and
    keeps the FP32 softmax for the backward: 16 GiB at 32K tokens x 128K vocabulary, on top
    of the logits. Here each chunk is upcast, reduced with Megatron's
    `VocabParallelCrossEntropy` steps, and dropped; the backward rebuilds the softmax chunk
    by chunk from the logits (in their own dtype) and the FP32 log-sum-exp per token. Same
    FP32 arithmetic, so the same loss and gradients to rounding; two all-reduces in all.
    With `grad_in_place` the gradient overwrites the logits (nothing else reads them).
    """

    @staticmethod
    def forward(ctx, logits, target, grad_in_place, chunk):
        group = parallel_state.get_tensor_model_parallel_group()
        rank = parallel_state.get_tensor_model_parallel_rank()
        world = parallel_state.get_tensor_model_parallel_world_size()
        vocab = logits.shape[-1]
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(vocab, rank, world)
        spans = [(s, min(s + chunk, logits.shape[0])) for s in range(0, logits.shape[0], chunk)]

        logits_max = torch.cat([logits[a:b].float().max(dim=-1)[0] for a, b in spans])
        torch.distributed.all_reduce(logits_max, op=torch.distributed.ReduceOp.MAX, group=group)
        predicted, sum_exp = [], []
        for a, b in spans:
            # Megatron's calculate_predicted_logits, with masked_fill for its boolean-index
            # writes (a host sync per chunk on CUDA).
            shifted = logits[a:b].float() - logits_max[a:b, None]
            target_mask, masked_target = _local_targets(target[a:b], start, end)
            predicted.append(shifted.gather(1, masked_target[:, None])[:, 0]
                             .masked_fill_(target_mask, 0.0))
            sum_exp.append(shifted.exp_().sum(dim=-1))
        stats = torch.cat([torch.cat(predicted), torch.cat(sum_exp)])
        torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.SUM, group=group)
        predicted_logits, sum_exp_logits = stats.chunk(2)
        log_sum_exp = torch.log(sum_exp_logits)
        ctx.save_for_backward(logits, target, logits_max + log_sum_exp)
        ctx.spans, ctx.vocab_range, ctx.grad_in_place = spans, (start, end), grad_in_place
        return log_sum_exp - predicted_logits

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, log_sum_exp = ctx.saved_tensors
        start, end = ctx.vocab_range
        grad = logits if ctx.grad_in_place else torch.empty_like(logits)
        for a, b in ctx.spans:
            softmax = (logits[a:b].float() - log_sum_exp[a:b, None]).exp_()
            target_mask, masked_target = _local_targets(target[a:b], start, end)
            grad_2d, arange_1d, update, grad_input = \
                VocabParallelCrossEntropy.prepare_gradient_calculation_operands(softmax,
                                                                                 target_mask)
            grad[a:b] = VocabParallelCrossEntropy.calculate_gradients(
                grad_2d, arange_1d, masked_target, update, grad_input, grad_loss[a:b])
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                                 grad_in_place: bool = False,
                                 chunk_elements: int = CROSS_ENTROPY_CHUNK_ELEMENTS):
    """Per-token FP32 loss [T] of vocab-parallel logits [T, V/tp] in any dtype, without an
    FP32 copy of the logits (see `_ChunkedVocabParallelCrossEntropy`)."""
    chunk = max(1, chunk_elements // logits.shape[-1])
    return _ChunkedVocabParallelCrossEntropy.apply(logits, labels, grad_in_place, chunk)


def forward_packed(model, batch: PackedBatch, return_logits: bool = True):
    """Logits [T, V/tp] (vocab-parallel, this rank's CP share) and per-token loss [T].

    `batch` is a (possibly CP-sharded, possibly collated) PackedBatch already on the
    model's device. The loss is unmasked, in FP32; apply `batch.loss_mask` when reducing.
    The logits stay in the model's dtype (BF16 under --bf16): the cross entropy needs no
    FP32 copy of them, so a 32K x 128K-vocabulary step holds one [T, V/tp] tensor, and
    without `return_logits` its gradient is written over it.
    """
    # The positions reach the core attention once, inside `params`; the model's own
    # position argument feeds only Megatron's position embeddings, of which it has none.
    params = packed_seq_params(batch)
    logits = model(batch.tokens[None], None, None, packed_seq_params=params)[0]  # [T, V/tp]
    loss = vocab_parallel_cross_entropy(logits, batch.labels,
                                        grad_in_place=not return_logits)
    return (logits if return_logits else None), loss


def masked_mean_loss(loss: torch.Tensor, loss_mask: torch.Tensor):
    """Sum of trained-token losses and their count (reduce both across ranks, then divide)."""
    mask = loss_mask.to(loss.dtype)
    return (loss * mask).sum(), mask.sum()

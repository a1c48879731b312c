"""The BF16-RoPE shift metrics of docs/design.md §1, dense (definitions) and streaming (at scale).

With positions Δ..Δ+L-1, RoPE attention depends only on relative positions, so A(Δ) must
not depend on Δ. The metrics measure how much it does:

* attention difference  D(Δ1, Δ2) = Σ_layers Σ_heads Σ_j n_j Σ_i |A_ij(Δ1) − A_ij(Δ2)|,
  n_j = 1 / (number of queries that see key j)  (= 1/(L−j+1), 1-based, for causal attention);
* per-key-position difference: the summand of D for each key j;
* first-token logit difference  Σ_layers Σ_heads (1/L) Σ_i |S_i,first(Δ1) − S_i,first(Δ2)|,
  S the pre-softmax logit (scaled q·k, the softmax input) against the first key.

Under document masks (intra-doc, anchor) "first key" means the first key of the query's
segment (its document's first token, or its anchor copy), and n_j counts the queries that
really see key j, so the definitions reduce to the causal ones for a single segment.

The dense functions take whole matrices and are the definitions the tests check by hand.
`ShiftMetricAccumulator` computes the same sums inside the model's attention (as the
`attention_fn` hook of `ReferenceLlama`) for a batch [reference Δ2, Δ1 shifts...], block by
block, so no L x L matrix outlives one block of query rows of one layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from megatron_anchor.attention.reference import segment_causal_visibility
from megatron_anchor.convert.reference_llama import (
    LayerAttentionInputs, attention_scores, causal_block_mask, expand_kv_heads, weighted_values,
)


# ---------------------------------------------------------------------------------------
# Dense definitions
# ---------------------------------------------------------------------------------------

def key_weights(visible: torch.Tensor) -> torch.Tensor:
    """n_j = 1 / (number of queries that see key j), from a [L, L] (query, key) mask."""
    counts = visible.sum(dim=0).to(torch.float64)
    return torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))


def per_key_difference(a1: torch.Tensor, a2: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """n_j Σ_i |A1_ij − A2_ij| per key j, summed over any leading (layer, head) axes."""
    diff = (a1.double() - a2.double()).abs()
    column_sums = diff.sum(dim=-2)
    while column_sums.dim() > 1:
        column_sums = column_sums.sum(dim=0)
    return column_sums * key_weights(visible)


def attention_difference(a1: torch.Tensor, a2: torch.Tensor, visible: torch.Tensor) -> float:
    """D(Δ1, Δ2) for attention matrices [..., L, L] (leading axes: layers, heads)."""
    return float(per_key_difference(a1, a2, visible).sum())


def first_token_logit_difference(s1: torch.Tensor, s2: torch.Tensor,
                                 first_key: torch.Tensor | None = None) -> float:
    """(1/L) Σ_i |S1_i,f(i) − S2_i,f(i)| summed over leading axes; f(i)=first_key[i] (default 0)."""
    L = s1.shape[-1]
    if first_key is None:
        first_key = torch.zeros(L, dtype=torch.long)
    rows = torch.arange(L)
    diff = (s1.double()[..., rows, first_key] - s2.double()[..., rows, first_key]).abs()
    return float(diff.sum()) / L


def segment_visibility(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[T, T] bool (query, key): same segment and key not after query (the attention tests'
    dense reference mask)."""
    return segment_causal_visibility(cu_seqlens)


def segment_key_weights(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """n_j for segment-causal attention without the dense mask: 1/(segment_end − j)."""
    bounds = cu_seqlens.to(torch.int64)
    lengths = bounds[1:] - bounds[:-1]
    seg_end = torch.repeat_interleave(bounds[1:], lengths)
    return 1.0 / (seg_end - torch.arange(int(bounds[-1]))).to(torch.float64)


def segment_first_keys(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Index of the first key of each token's segment, [T]."""
    bounds = cu_seqlens.to(torch.int64)
    return torch.repeat_interleave(bounds[:-1], bounds[1:] - bounds[:-1])


# ---------------------------------------------------------------------------------------
# Streaming computation inside the model
# ---------------------------------------------------------------------------------------

@dataclass
class ShiftMetricAccumulator:
    """Attention hook: runs attention for copies [ref, shifted...] and sums the metrics.

    Copy 0 is the reference (positions + Δ2); copies 1.. are compared with it. Sums kept:
    `column_sums[layer, copy-1, j]` = Σ_heads Σ_i |A_ij − A_ref,ij| and
    `first_logit_rows[layer, copy-1, i]` = Σ_heads |S_i,first − S_ref,i,first|.
    """

    num_layers: int
    num_copies: int
    num_tokens: int
    # FP32 elements of one score block (all copies). Kept under glibc's 32 MB mmap ceiling:
    # larger blocks are mmapped afresh and page-faulted on every allocation, which cost a
    # quarter of the run time at L=4096.
    block_elements: int = 6 * 1024 * 1024
    column_sums: torch.Tensor = field(init=False)
    first_logit_rows: torch.Tensor = field(init=False)

    def __post_init__(self):
        shape = (self.num_layers, self.num_copies - 1, self.num_tokens)
        self.column_sums = torch.zeros(shape, dtype=torch.float64)
        self.first_logit_rows = torch.zeros(shape, dtype=torch.float64)

    def __call__(self, inputs: LayerAttentionInputs) -> torch.Tensor:
        q, H = inputs.q, inputs.q.shape[1]
        k, v = expand_kv_heads(inputs.k, H), expand_kv_heads(inputs.v, H)
        out = torch.empty_like(q)
        bounds = inputs.cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            rows_per_block = max(1, self.block_elements // (q.shape[0] * H * (end - start)))
            for r0 in range(0, end - start, rows_per_block):
                rows = slice(r0, min(r0 + rows_per_block, end - start))
                out[:, :, start + rows.start:start + rows.stop] = self._block(
                    inputs, q, k, v, start, rows)
        return out

    def _block(self, inputs, q, k, v, start, rows):
        layer, query_slots = inputs.layer, slice(start + rows.start, start + rows.stop)
        keys = slice(start, start + rows.stop)
        scores = attention_scores(q[:, :, query_slots], k[:, :, keys], inputs.precision)
        # Column 0 of the block is the segment's first key: the first-token logit.
        first = scores[:, :, :, 0]
        self.first_logit_rows[layer, :, query_slots] += (first[1:] - first[:1]).abs().sum(1).double()
        scores.masked_fill_(causal_block_mask(rows, rows.stop), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        del scores
        diff = torch.sub(probs[1:], probs[:1]).abs_()
        self.column_sums[layer, :, keys] += diff.sum(dim=(1, 2)).double()
        del diff
        return weighted_values(probs, v[:, :, keys])


@dataclass
class ShiftResult:
    """Per-copy metrics for one window, one precision setting, one layout."""

    shifts: list  # Δ1 of copies 1..
    reference_shift: int  # Δ2
    per_layer_D: torch.Tensor  # [layers, copies-1]
    per_key: torch.Tensor  # [copies-1, T]  n_j Σ_layers Σ_heads Σ_i |ΔA_ij|
    per_layer_first_logit: torch.Tensor  # [layers, copies-1]  (1/T) Σ_heads Σ_i |ΔS_i,first|
    first_logit_rows: torch.Tensor  # [copies-1, T]  Σ_layers Σ_heads |ΔS_i,first|
    first_key_slots: torch.Tensor  # [T] bool: slot is the first key of its segment

    @property
    def D(self) -> torch.Tensor:
        return self.per_layer_D.sum(0)

    @property
    def first_logit_difference(self) -> torch.Tensor:
        return self.per_layer_first_logit.sum(0)

    def first_key_share(self) -> torch.Tensor:
        """Fraction of D carried by the first keys of segments (key 0 for `full`)."""
        return self.per_key[:, self.first_key_slots].sum(1) / self.per_key.sum(1)

    def D_excluding_first_keys(self) -> torch.Tensor:
        return self.per_key[:, ~self.first_key_slots].sum(1)


def summarize(acc: ShiftMetricAccumulator, cu_seqlens: torch.Tensor, shifts, reference_shift,
              ) -> ShiftResult:
    n = segment_key_weights(cu_seqlens)
    T = acc.num_tokens
    first_key_slots = torch.zeros(T, dtype=torch.bool)
    first_key_slots[cu_seqlens[:-1].long()] = True
    return ShiftResult(
        shifts=list(shifts),
        reference_shift=reference_shift,
        per_layer_D=(acc.column_sums * n).sum(-1),
        per_key=(acc.column_sums * n).sum(0),
        per_layer_first_logit=acc.first_logit_rows.sum(-1) / T,
        first_logit_rows=acc.first_logit_rows.sum(0),
        first_key_slots=first_key_slots,
    )


def shifted_positions(position_ids: torch.Tensor, shifts, reference_shift: int) -> torch.Tensor:
    """[1 + len(shifts), T]: row 0 at Δ2, then one row per Δ1 (positions + Δ)."""
    offsets = torch.tensor([reference_shift] + list(shifts), dtype=torch.long)
    return position_ids[None, :].long() + offsets[:, None]


def measure_shifts(model, tokens: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                   shifts, reference_shift: int, block_elements: int | None = None,
                   return_hidden: bool = False):
    """Run `model` (a ReferenceLlama) once on copies [Δ2, Δ1...] of one window, in one batch.

    With return_hidden, also the final hidden states [copies, T, d] (e.g. for perplexity).
    """
    acc = ShiftMetricAccumulator(model.cfg.num_layers, len(shifts) + 1, tokens.numel())
    if block_elements:
        acc.block_elements = block_elements
    with torch.no_grad():
        hidden = model.hidden_states(tokens, shifted_positions(position_ids, shifts, reference_shift),
                                     cu_seqlens, attention_fn=acc)
    result = summarize(acc, cu_seqlens, shifts, reference_shift)
    return (result, hidden) if return_hidden else result


# ---------------------------------------------------------------------------------------
# First-token logits only (long windows)
# ---------------------------------------------------------------------------------------

@dataclass
class FirstTokenAccumulator:
    """Attention hook for long windows: fused attention, plus |ΔS_i,first| per query.

    The first-token metric needs only q_i . k_first, so the attention itself can run in
    PyTorch's fused scaled_dot_product_attention (FlashAttention-style CPU kernel in the
    activation dtype, like GPU training) instead of the explicit matrices. Copy 0 is the
    reference, as in `ShiftMetricAccumulator`.
    """

    num_layers: int
    num_copies: int
    num_tokens: int
    first_logit_rows: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.first_logit_rows = torch.zeros(
            (self.num_layers, self.num_copies - 1, self.num_tokens), dtype=torch.float64)

    def __call__(self, inputs: LayerAttentionInputs) -> torch.Tensor:
        q, H = inputs.q, inputs.q.shape[1]
        k, v = expand_kv_heads(inputs.k, H), expand_kv_heads(inputs.v, H)
        out = torch.empty_like(q)
        bounds = inputs.cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            seg = slice(start, end)
            first = attention_scores(q[:, :, seg], k[:, :, start:start + 1], inputs.precision)[..., 0]
            self.first_logit_rows[inputs.layer, :, seg] += (first[1:] - first[:1]).abs().sum(1).double()
            out[:, :, seg] = F.scaled_dot_product_attention(q[:, :, seg], k[:, :, seg], v[:, :, seg],
                                                            is_causal=True)
        return out


def first_token_rows(model, tokens: torch.Tensor, shifts, reference_shift: int) -> torch.Tensor:
    """Σ_heads |ΔS_i,first| per layer, copy and query, [layers, copies-1, T], one causal window.

    For a causal model the first L queries of a longer window are exactly a window of
    length L, so prefix means of these rows give the metric for every length <= T.
    """
    T = tokens.numel()
    acc = FirstTokenAccumulator(model.cfg.num_layers, len(shifts) + 1, T)
    with torch.no_grad():
        model.hidden_states(tokens, shifted_positions(torch.arange(T), shifts, reference_shift),
                            torch.tensor([0, T], dtype=torch.int32), attention_fn=acc)
    return acc.first_logit_rows


def first_token_difference_by_length(rows: torch.Tensor, lengths) -> dict:
    """{L: Σ_layers Σ_heads (1/L) Σ_{i<L} |ΔS_i,1|} for each copy, from `first_token_rows`."""
    per_query = rows.sum(0)  # [copies-1, T]
    return {int(L): (per_query[:, :L].sum(-1) / L).tolist() for L in lengths}

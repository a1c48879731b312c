"""The shift metrics on tiny hand-checkable inputs, and the streaming code against them."""

import math

import pytest
import torch

from megatron_anchor.diagnostics import shift_metrics as sm
from megatron_anchor.convert.reference_llama import (
    LlamaConfig, Precision, ReferenceLlama, random_init_weights,
)


def causal(L):
    return torch.tril(torch.ones(L, L, dtype=torch.bool))


def test_identical_matrices_give_zero():
    a = torch.softmax(torch.randn(2, 3, 5, 5).masked_fill(~causal(5), -math.inf), -1)
    assert sm.attention_difference(a, a.clone(), causal(5)) == 0.0
    assert sm.first_token_logit_difference(a, a.clone()) == 0.0


def test_key_weights_count_queries_that_see_each_key():
    # Causal L=4: key j (1-based) is seen by L-j+1 queries -> n = 1/4, 1/3, 1/2, 1.
    assert sm.key_weights(causal(4)).tolist() == [0.25, 1 / 3, 0.5, 1.0]


def test_n_j_weighting_by_hand():
    a1 = torch.tensor([[1.0, 0.0, 0.0],
                       [0.5, 0.5, 0.0],
                       [0.2, 0.3, 0.5]])
    a2 = torch.tensor([[1.0, 0.0, 0.0],
                       [0.4, 0.6, 0.0],
                       [0.2, 0.2, 0.6]])
    # key 0: |0.1| seen by 3 queries -> 0.1/3; key 1: 0.1 + 0.1 over 2 -> 0.1; key 2: 0.1 / 1.
    per_key = sm.per_key_difference(a1, a2, causal(3))
    assert per_key.tolist() == pytest.approx([0.1 / 3, 0.1, 0.1])
    assert sm.attention_difference(a1, a2, causal(3)) == pytest.approx(0.1 / 3 + 0.2)
    # Leading (layer, head) axes are summed.
    stacked = sm.attention_difference(torch.stack([a1, a1]), torch.stack([a2, a1]), causal(3))
    assert stacked == pytest.approx(0.1 / 3 + 0.2)


def test_first_token_logit_difference_by_hand():
    s1 = torch.zeros(4, 4)
    s2 = torch.zeros(4, 4)
    s2[:, 0] = torch.tensor([1.0, -2.0, 3.0, 0.0])  # against key 1 (index 0)
    s2[:, 1] = 100.0  # other keys do not count
    assert sm.first_token_logit_difference(s1, s2) == pytest.approx(6.0 / 4)
    # Per-segment first keys: queries 2,3 belong to a segment starting at key 2.
    s2[2:, 2] = torch.tensor([1.0, 1.0])
    first = torch.tensor([0, 0, 2, 2])
    assert sm.first_token_logit_difference(s1, s2, first) == pytest.approx((1 + 2 + 1 + 1) / 4)


def test_segment_helpers_match_dense_mask():
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    visible = sm.segment_visibility(cu)
    assert torch.equal(sm.segment_key_weights(cu), sm.key_weights(visible))
    assert sm.segment_first_keys(cu).tolist() == [0, 0, 0, 3, 4, 4, 4, 4, 4]


TINY = LlamaConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                   num_query_groups=2, vocab_size=50, rotary_base=10000.0, norm_epsilon=1e-5)


class DenseRecorder:
    """Attention hook that keeps dense FP64 probability/score matrices (tiny models only)
    computed from the same q/k as the wrapped streaming accumulator, which does the
    forward (so both see identical inputs in every layer)."""

    def __init__(self, accumulator):
        self.accumulator = accumulator
        self.probs, self.scores = [], []

    def __call__(self, inputs):
        H = inputs.q.shape[1]
        k = inputs.k.repeat_interleave(H // inputs.k.shape[1], dim=1).double()
        scores = inputs.q.double() @ k.transpose(-1, -2) / math.sqrt(inputs.q.shape[-1])
        visible = sm.segment_visibility(inputs.cu_seqlens)
        probs = torch.softmax(scores.masked_fill(~visible, -math.inf), -1)
        self.scores.append(scores)
        self.probs.append(probs)
        return self.accumulator(inputs)


@pytest.mark.parametrize("cu", [[0, 12], [0, 5, 12]])
def test_streaming_accumulator_matches_dense_definition(cu):
    torch.manual_seed(0)
    weights = random_init_weights(TINY, seed=3, init_std=0.3)  # peaked attention
    # BF16 so that shifts really change attention (D well above FP32 rounding).
    model = ReferenceLlama(TINY, weights, Precision(torch.bfloat16, rope_fp32=False))
    tokens = torch.randint(0, TINY.vocab_size, (12,))
    cu = torch.tensor(cu, dtype=torch.int32)
    positions = torch.arange(12)
    shifts, ref = [0, 700], 3
    # Tiny blocks force several query blocks per segment.
    acc = sm.ShiftMetricAccumulator(TINY.num_layers, len(shifts) + 1, 12, block_elements=100)
    recorder = DenseRecorder(acc)
    model.hidden_states(tokens, sm.shifted_positions(positions, shifts, ref), cu, recorder)
    result = sm.summarize(acc, cu, shifts, ref)
    visible = sm.segment_visibility(cu)
    first = sm.segment_first_keys(cu)
    for c in range(len(shifts)):
        dense_D = sum(sm.attention_difference(p[c + 1], p[0], visible) for p in recorder.probs)
        dense_first = sum(sm.first_token_logit_difference(s[c + 1], s[0], first)
                          for s in recorder.scores)
        assert dense_D > 1e-3
        assert float(result.D[c]) == pytest.approx(dense_D, rel=1e-4)
        assert float(result.first_logit_difference[c]) == pytest.approx(dense_first, rel=1e-4)


def test_first_token_rows_prefix_means_match_full_measurement():
    weights = random_init_weights(TINY, seed=4, init_std=0.3)
    # FP64 so that the fused (SDPA) and explicit attention paths agree far below the metric.
    model = ReferenceLlama(TINY, weights, Precision(torch.float64))
    tokens = torch.randint(0, TINY.vocab_size, (16,))
    rows = sm.first_token_rows(model, tokens, [0], 5)
    by_length = sm.first_token_difference_by_length(rows, [8, 16])
    for L in (8, 16):
        result = sm.measure_shifts(model, tokens[:L], torch.arange(L),
                                   torch.tensor([0, L], dtype=torch.int32), [0], 5)
        assert by_length[L][0] == pytest.approx(float(result.first_logit_difference[0]),
                                                rel=1e-6)


def test_fp32_shift_difference_is_tiny_bf16_is_not():
    """RoPE is relative: in FP64 a shift changes almost nothing (only the FP32 cos/sin
    tables round), in BF16 it changes attention by orders of magnitude more."""
    weights = random_init_weights(TINY, seed=5, init_std=0.3)
    tokens = torch.randint(0, TINY.vocab_size, (32,))
    args = (tokens, torch.arange(32), torch.tensor([0, 32], dtype=torch.int32), [0, 500], 16)
    d64 = sm.measure_shifts(ReferenceLlama(TINY, weights, Precision(torch.float64)), *args).D
    d16 = sm.measure_shifts(ReferenceLlama(TINY, weights, Precision(torch.bfloat16, False)),
                            *args).D
    assert float(d64.max()) < 1e-4
    assert float(d16.min()) > 100 * float(d64.max())


def test_attention_capture_returns_chosen_layers_and_heads():
    from megatron_anchor.convert.reference_llama import AttentionCapture

    model = ReferenceLlama(TINY, random_init_weights(TINY, seed=6), Precision(torch.float32))
    tokens = torch.randint(0, TINY.vocab_size, (10,))
    capture = AttentionCapture(layers=[1], heads=[0, 3])
    plain = model.hidden_states(tokens, torch.arange(10))
    captured = model.hidden_states(tokens, torch.arange(10), attention_fn=capture)
    assert torch.equal(plain, captured)  # capturing does not change the forward
    assert set(capture.probs) == {1}
    probs = capture.probs[1]
    assert probs.shape == (1, 2, 10, 10)
    assert torch.allclose(probs.sum(-1), torch.ones(1, 2, 10))
    assert float(probs.triu(1).abs().max()) == 0.0  # causal

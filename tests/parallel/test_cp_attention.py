"""The `local` backend under context parallelism (2 gloo ranks over Megatron's CP group):
outputs and q/k/v gradients equal the unsharded computation, for every variant and the
edge cases of the CP layout; and the divisibility guard fires inside a real CP forward."""

import pytest
import torch

from megatron_anchor.layout import VARIANTS, pack_documents
from megatron_anchor.testing import run_on_ranks

pytestmark = pytest.mark.distributed

CP = 2
SEQ_LENGTH = 128
CASES = {
    # lengths that are not multiples of 2·CP, so the packer pads every segment
    "odd lengths": [[2 + i % 50 for i in range(n)] for n in (7, 13, 1, 22, 9, 31, 3, 5, 11)],
    "one-token docs": [[9]] * 80,
    "doc filling the window": [[2 + i % 50 for i in range(300)]],
}


def _attention_case(batch, seed):
    """Unsharded vs CP-sharded packed attention on this rank; returns the full-order results."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_anchor.attention.local import packed_causal_attention
    from megatron_anchor.layout import cp_partition_indices, unshard_cp

    group = parallel_state.get_context_parallel_group()
    rank = parallel_state.get_context_parallel_rank()
    generator = torch.Generator().manual_seed(seed)  # same tensors on both ranks
    T = batch.seq_length
    q, k, v = (torch.randn(T, heads, 16, generator=generator) for heads in (4, 2, 2))
    grad_out = torch.randn(T, 4, 16, generator=generator)

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    full = packed_causal_attention(*leaves, batch.cu_seqlens)
    full.backward(grad_out)
    reference = [full.detach()] + [x.grad for x in leaves]

    index = cp_partition_indices(batch.cu_seqlens, CP, rank)
    local = [x[index].clone().requires_grad_() for x in (q, k, v)]
    out = packed_causal_attention(*local, batch.cu_seqlens, cp_group=group)
    out.backward(grad_out[index])
    sharded = []
    for tensor in [out.detach()] + [x.grad for x in local]:
        pieces = [torch.empty_like(tensor) for _ in range(CP)]
        dist.all_gather(pieces, tensor.contiguous(), group=group)
        sharded.append(unshard_cp(pieces, batch.cu_seqlens, CP))
    return [float((a - b).abs().max()) for a, b in zip(reference, sharded)]


def _guard_messages():
    """A THD batch whose segments are not multiples of 2·CP, fed to a CP forward."""
    from megatron.core import parallel_state

    from megatron_anchor.attention.local import packed_causal_attention
    from megatron_anchor.model import ModelConfig, build_model, forward_packed

    group = parallel_state.get_context_parallel_group()
    bad = pack_documents([[3] * 6, [4] * 2], 8, "intra-doc")  # segments 6 and 2
    local = bad.__class__(**{**bad.__dict__, **{n: getattr(bad, n)[:4] for n in bad.PER_SLOT}})
    messages = []
    try:
        packed_causal_attention(*(torch.randn(4, 2, 8) for _ in range(3)), bad.cu_seqlens,
                                cp_group=group)
    except ValueError as error:
        messages.append(str(error))
    model = build_model(ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2,
                                    vocab_size=64))
    try:
        forward_packed(model, local)
    except ValueError as error:
        messages.append(str(error))
    return messages


def _worker(rank, world_size, batches):
    from megatron_anchor import runtime

    runtime.initialize(1, CP, cpu=True, seed=5)
    try:
        diffs = {key: _attention_case(batch, seed=i) for i, (key, batch) in enumerate(batches.items())}
        return {"diffs": diffs, "guard": _guard_messages()}
    finally:
        runtime.destroy()


@pytest.fixture(scope="module")
def results():
    batches = {(variant, case): pack_documents(docs, SEQ_LENGTH, variant, anchor_token_id=1,
                                               cp_size=CP)
               for variant in VARIANTS for case, docs in CASES.items()}
    for batch in batches.values():  # the cases really exercise padding and odd segments
        assert batch.segment_lengths.remainder(2 * CP).eq(0).all()
    return run_on_ranks(_worker, CP, batches)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_cp_output_and_qkv_grads_equal_unsharded(results, variant, case):
    for rank_result in results:
        out, dq, dk, dv = rank_result["diffs"][(variant, case)]
        assert out <= 1e-6, f"output differs by {out}"
        # K/V gradients are summed over the CP ranks: only the summation order changes.
        for name, diff in (("dq", dq), ("dk", dk), ("dv", dv)):
            assert diff <= 1e-5, f"{name} differs by {diff}"


def test_cp_forward_refuses_segments_not_divisible_by_2cp(results):
    for rank_result in results:
        messages = rank_result["guard"]
        assert len(messages) == 2, messages  # the attention call and the whole model
        for message in messages:
            assert "multiple of 4" in message and "segment 0 has length 6" in message

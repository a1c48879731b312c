"""Context-parallel layout, single process: TE's chunk convention, the divisibility guard,
tensor-parallel splitting, and the parity tool's argument checks."""

import random

import pytest
import torch

from megatron_anchor.layout import (
    VARIANTS, PackedBatch, check_cp_divisibility, cp_partition_indices, pack_documents,
    shard_for_cp, unshard_cp,
)
from megatron_anchor.parallel.sharding import join_shards, split_for_rank
from megatron_anchor.attention.te_cp import check_te_cp_comm_type
from megatron_anchor.cli.verify_parity import main as verify_parity_main
from megatron_anchor.parallel.parity_batch import (
    parse_length_distribution, synthetic_documents,
)


def te_thd_partitioned_indices(cu_seqlens, world_size, rank):
    """A line-by-line port of Transformer Engine's `thd_partition_src_index` (context_parallel.cu)."""
    cu_local = [int(c) // world_size for c in cu_seqlens]
    out = []
    for token_id in range(cu_local[-1]):
        seq_id = max(i for i in range(len(cu_local) - 1) if cu_local[i] <= token_id)
        seq_len = cu_local[seq_id + 1] - cu_local[seq_id]
        index = token_id - cu_local[seq_id]
        offset = rank if index < seq_len // 2 else (world_size - 1) * 2 - rank
        out.append(index + cu_local[seq_id] * world_size + seq_len // 2 * offset)
    return torch.tensor(out, dtype=torch.int64)


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_partition_indices_match_transformer_engine(cp):
    rng = random.Random(cp)
    lengths = [2 * cp * rng.randint(1, 9) for _ in range(12)]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    for rank in range(cp):
        assert torch.equal(cp_partition_indices(cu, cp, rank), te_thd_partitioned_indices(cu, cp, rank))


def test_partition_indices_small_example():
    """Rank r holds chunks r and 2·CP−1−r of every segment."""
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    assert cp_partition_indices(cu, 2, 0).tolist() == [0, 1, 6, 7, 8, 9, 14, 15]
    assert cp_partition_indices(cu, 2, 1).tolist() == [2, 3, 4, 5, 10, 11, 12, 13]


EDGE_DOCUMENTS = {
    "odd lengths": [[5 + i % 90 for i in range(n)] for n in (7, 13, 1, 22, 9, 31, 3)],
    "one-token docs": [[9]] * 40,
    "doc filling the window": [list(range(2, 200))],
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", sorted(EDGE_DOCUMENTS))
@pytest.mark.parametrize("cp", [2, 4])
def test_shards_carry_every_per_slot_field_and_round_trip(variant, case, cp):
    batch = pack_documents(EDGE_DOCUMENTS[case], 64, variant, anchor_token_id=1, cp_size=cp)
    check_cp_divisibility(batch.cu_seqlens, cp)
    shards = [shard_for_cp(batch, cp, r) for r in range(cp)]
    for rank, shard in enumerate(shards):
        index = cp_partition_indices(batch.cu_seqlens, cp, rank)
        for name in PackedBatch.PER_SLOT:  # positions, labels, loss masks travel with tokens
            assert torch.equal(getattr(shard, name), getattr(batch, name)[index]), name
        assert shard.tokens.numel() == 64 // cp
        assert torch.equal(shard.cu_seqlens, batch.cu_seqlens)  # stays global, as TE wants
    for name in PackedBatch.PER_SLOT:
        joined = unshard_cp([getattr(s, name) for s in shards], batch.cu_seqlens, cp)
        assert torch.equal(joined, getattr(batch, name))
    assert sum(float(s.loss_mask.sum()) for s in shards) == float(batch.loss_mask.sum())


def test_divisibility_guard_in_every_entry_point():
    # Packed without CP padding: segment 0 has 6 slots, not a multiple of 2·CP = 4.
    batch = pack_documents([[3] * 6, [4] * 2], 8, "intra-doc")
    cu = batch.cu_seqlens
    assert cu.tolist() == [0, 6, 8]
    calls = {
        "check_cp_divisibility": lambda: check_cp_divisibility(cu, 2),
        "cp_partition_indices": lambda: cp_partition_indices(cu, 2, 0),
        "shard_for_cp": lambda: shard_for_cp(batch, 2, 1),
        "unshard_cp": lambda: unshard_cp([torch.zeros(4), torch.zeros(4)], cu, 2),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"multiple of 4, but segment 0 has length 6"):
            call()
    with pytest.raises(ValueError, match="multiple of 2 x --context-parallel-size = 4"):
        pack_documents([[3] * 5], 10, "anchor", anchor_token_id=1, cp_size=2)
    check_cp_divisibility(cu, 1)  # no CP: any length is fine


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tensor_parallel_split_round_trips(stride, tp):
    full = torch.arange(16 * 3, dtype=torch.float32).reshape(16, 3)
    shards = [split_for_rank(full, 0, stride, tp, r) for r in range(tp)]
    assert torch.equal(join_shards(shards, 0, stride), full)
    if stride == 2 and tp == 2:  # SwiGLU fc1 [gate; up]: rank r holds [gate_r; up_r]
        gate, up = full[:8], full[8:]
        assert torch.equal(shards[1], torch.cat([gate[4:], up[4:]]))


def test_transformer_engine_cp_comm_types_for_thd():
    check_te_cp_comm_type("p2p", 2, te_version="1.13.0")
    check_te_cp_comm_type("a2a", 2, te_version="2.10.0", heads_per_tp_rank=(8, 2))
    check_te_cp_comm_type("all_gather", 4, te_version="2.18.0+cu12")
    check_te_cp_comm_type("a2a+p2p", 4, te_version="2.19.0")
    check_te_cp_comm_type("all_gather", 1, te_version="1.0")  # no CP: nothing to refuse
    with pytest.raises(ValueError, match=r"all_gather: that needs TE >= 2\.18.*p2p or a2a"):
        check_te_cp_comm_type("all_gather", 2, te_version="2.17.0")
    with pytest.raises(ValueError, match=r"a2a: that needs TE >= 2\.10"):
        check_te_cp_comm_type("a2a", 2, te_version="2.9.0")
    with pytest.raises(ValueError, match=r"a2a\+p2p: that needs TE >= 2\.19"):
        check_te_cp_comm_type("a2a+p2p", 2, te_version="2.18.0")
    with pytest.raises(ValueError, match="heads per TP rank must both divide by CP=4"):
        check_te_cp_comm_type("a2a", 4, te_version="2.12", heads_per_tp_rank=(8, 2))
    with pytest.raises(ValueError, match="not one of"):
        check_te_cp_comm_type("ring", 2, te_version="2.12")


def test_parity_tool_refuses_bad_settings(capsys):
    for argv, message in [
        (["--layouts", "tp1cp1"], "at least two layouts"),
        (["--layouts", "tp1cp1,tp2x"], "bad layout"),
        (["--layouts", "tp1cp1,tp1cp4", "--seq-length", "100"],
         "--seq-length 100 must be a positive multiple of 2 x --context-parallel-size = 8"),
        (["--layouts", "tp1cp1,tp4cp1", "--num-query-groups", "2"],
         "--num-query-groups 2 does not divide by --tensor-model-parallel-size 4"),
        (["--cpu", "--attention-backend", "te"], "needs a GPU"),
        (["--variants", "anchor,nope"], "unknown attention variant 'nope'"),
        (["--load", "/nonexistent/ckpt"], "no such checkpoint directory"),
        (["--doc-length-dist", "gamma:1,2"], "bad --doc-length-dist"),
        (["--layouts", "tp1cp1,tp2cp1", "--debug-wrong-cp-chunks"], "needs a layout with CP > 1"),
    ]:
        assert verify_parity_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_synthetic_documents_are_deterministic_and_fill_the_window():
    import numpy as np

    a = synthetic_documents("lognormal:300,1.0", 4096, 1024, seed=7)
    assert a == synthetic_documents("lognormal:300,1.0", 4096, 1024, seed=7)
    assert sum(len(d) for d in a) >= 4096 - len(a)
    assert min(min(d) for d in a) >= 2  # 0 (pad) and 1 (anchor) are reserved
    draw = parse_length_distribution("list:1,7,33")
    assert [draw(np.random.default_rng(0), i) for i in range(4)] == [1, 7, 33, 1]

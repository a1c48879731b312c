"""The runtime: one device decision, one process-group set-up."""

import pytest

from megatron_anchor import runtime


def test_world_size_must_divide_into_every_layout():
    assert runtime.check_world_size(8, (2, 2)) == 2
    with pytest.raises(runtime.ParallelLayoutError,
                       match=r"3 process\(es\) do not divide into TP×CP = 2×1.*multiple of 4"):
        runtime.check_world_size(3, (2, 1), (1, 4))


def test_the_device_is_decided_once(megatron_cpu):
    assert runtime.is_cpu() and str(runtime.device()) == "cpu"
    assert runtime.decide_device(None) is True
    with pytest.raises(runtime.ParallelLayoutError, match="cannot switch"):
        runtime.decide_device(False)
    rt = runtime.current()
    assert (rt.tp, rt.cp, rt.dp, rt.cpu) == (1, 1, 1, True)
    with pytest.raises(runtime.ParallelLayoutError, match="already exist with TP=1"):
        runtime.ensure_initialized(2, 1)


def test_host_values_are_reduced_through_the_device(megatron_cpu, monkeypatch):
    """NCCL reduces no CPU tensor: the trainer's host-side sums and votes go through
    `all_reduce_host` (the first H200 run failed every training step without it)."""
    import torch

    from megatron_anchor.training import stopping, train

    values = torch.tensor([1.5, 2.0], dtype=torch.float64)
    reduced = runtime.all_reduce_host(values.clone())  # gloo, one rank: the same values
    assert reduced.device.type == "cpu" and reduced.tolist() == [1.5, 2.0]

    calls = []

    def recorder(tensor, op=None, group=None):
        calls.append(tensor.clone())
        return tensor * 2  # what a second rank with the same values would add

    monkeypatch.setattr(runtime, "all_reduce_host", recorder)
    reports = [{"lm loss": torch.tensor([3.0, 4.0])}]
    loss, step_flops, finite = train.reduce_loss_and_flops(reports, local_flops=5.0)
    assert calls[-1].tolist() == [3.0, 4.0, 5.0] and (loss, step_flops, finite) == (0.75, 10.0, True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    assert stopping.ranks_where(True) == [0]  # rank 0's flag, doubled by the recorder
    assert calls[-1].tolist() == [1, 0]

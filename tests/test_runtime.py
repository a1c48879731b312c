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

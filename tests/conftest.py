import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def megatron_cpu():
    """One-process gloo world with Megatron-Core's parallel_state (TP=CP=1) and CPU shims."""
    from megatron.core import parallel_state

    from megatron_anchor import runtime

    if not parallel_state.model_parallel_is_initialized():
        runtime.initialize(1, 1, cpu=True, seed=1234)
    yield

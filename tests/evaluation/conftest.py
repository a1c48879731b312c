import pytest

from tests.evaluation.helpers import write_byte_tokenizer


@pytest.fixture(scope="session")
def byte_tokenizer_dir(tmp_path_factory):
    return write_byte_tokenizer(tmp_path_factory.mktemp("byte_tokenizer"))


@pytest.fixture(scope="session")
def byte_tokenizer(byte_tokenizer_dir):
    from megatron_anchor.evaluation.tokenizer import EvalTokenizer

    return EvalTokenizer(byte_tokenizer_dir)

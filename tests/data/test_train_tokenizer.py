"""train_tokenizer: deterministic byte-level BPE with the project's special tokens."""

import json
import random

from tests.data.data_helpers import read_bytes, write_jsonl
from megatron_anchor.cli.train_tokenizer import main


def _corpus(tmp_path):
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 9)))
             for _ in range(400)]
    texts = [{"text": " ".join(rng.choice(words) for _ in range(60))} for _ in range(300)]
    return write_jsonl(tmp_path / "c.jsonl", texts)


def test_training_is_deterministic_with_special_tokens(tmp_path):
    from tokenizers import Tokenizer

    corpus = _corpus(tmp_path)
    for name in ("a.json", "b.json"):
        assert main(["--input", corpus, "--vocab-size", "500", "--output",
                     str(tmp_path / name)]) == 0
    assert read_bytes(tmp_path / "a.json") == read_bytes(tmp_path / "b.json")
    tok = Tokenizer.from_file(str(tmp_path / "a.json"))
    assert tok.get_vocab_size() == 500
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|bos|>", "<|pad|>")] == [0, 1, 2]
    text = " ".join(json.loads(open(corpus).readline())["text"].split()[:20]) + " Ünïcödé"
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text  # byte-level: lossless, any text encodable
    assert len(ids) < 0.7 * len(text.encode())  # merges were learned from the corpus


def test_bad_line_is_one_line_naming_file_and_line(tmp_path, capsys):
    from tests.data.data_helpers import assert_one_line_error, run_main

    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "fine"}, b'{"text": broken'])
    status, _, err = run_main(main, ["--input", corpus, "--output", tmp_path / "t.json"], capsys)
    assert_one_line_error(status, err, f"{corpus}:2:")
    assert not (tmp_path / "t.json").exists()

"""Fixtures for the training tests: a tiny real-text corpus (byte tokens, two domains)."""

import glob
import json
import os
import sysconfig

import pytest


def _stdlib_texts(count=48, max_chars=3000):
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:count]
    texts = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()[:max_chars]
        if text.strip():
            texts.append(text)
    return texts


@pytest.fixture(scope="session")
def byte_corpus(tmp_path_factory):
    """Prefix of an indexed dataset of Python sources, ByteTokenizer ids, domains a/b."""
    from megatron_anchor.cli.preprocess_data import main as preprocess

    root = tmp_path_factory.mktemp("training_corpus")
    jsonl = root / "corpus.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for i, text in enumerate(_stdlib_texts()):
            f.write(json.dumps({"text": text, "meta": {"src": "ab"[i % 2]}}) + "\n")
    preprocess(["--input", str(jsonl), "--output-prefix", str(root / "corpus"),
                "--tokenizer-type", "ByteTokenizer", "--append-eod", "--domain-key", "meta.src"])
    return str(root / "corpus_text_document")


def tiny_argv(prefix, *extra):
    """A tiny, fast CPU run (2 layers, d=64, 256-token windows)."""
    return ["--cpu", "--data-path", prefix, "--tokenizer-type", "ByteTokenizer",
            "--split", "90,10,0", "--seq-length", "256", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--num-layers", "2", "--hidden-size", "64",
            "--num-attention-heads", "4", "--num-query-groups", "2", "--lr", "3e-3",
            "--lr-warmup-iters", "1", "--log-interval", "1", "--no-progress-bar", *extra]


@pytest.fixture(autouse=True)
def _run_in_tmp_dir(tmp_path, monkeypatch):
    """Runs without --save write their loss-curve PNG to the working directory; keep that
    out of the checkout."""
    monkeypatch.chdir(tmp_path)

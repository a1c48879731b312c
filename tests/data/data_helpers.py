"""Shared helpers for the data tests: tiny JSONL inputs and in-process tool runs."""

import gzip
import json
import os

import numpy as np


def write_jsonl(path, records, gz=False):
    """Write records (dicts are JSON-encoded; bytes/str are written as the raw line)."""
    lines = []
    for r in records:
        if isinstance(r, dict):
            r = json.dumps(r)
        lines.append(r if isinstance(r, bytes) else r.encode("utf-8"))
    data = b"".join(line + b"\n" for line in lines)
    if gz:
        with gzip.GzipFile(path, "wb", mtime=0) as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)
    return str(path)


def preprocess_argv(input_path, output_prefix, *extra,
                    tokenizer=("--tokenizer-type", "ByteTokenizer")):
    return ["--input", str(input_path), "--output-prefix", str(output_prefix), *tokenizer,
            *extra]


def preprocess(input_path, output_prefix, *extra, tokenizer=("--tokenizer-type", "ByteTokenizer")):
    """The library run on the tool's flags: returns the summary, raises DatasetError."""
    from megatron_anchor.cli.preprocess_data import build_parser, config_from_args
    from megatron_anchor.data.preprocess import preprocess as run

    argv = preprocess_argv(input_path, output_prefix, *extra, tokenizer=tokenizer)
    return run(config_from_args(build_parser().parse_args(argv)))


def run_main(main, argv, capsys):
    """A tool's `main(argv)` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, err, *fragments):
    """Exit status 2 and one stderr line `prog: error: ...` holding every fragment."""
    assert status == 2, (status, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def null_tokenizer(vocab_size=60000):
    return ("--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab_size))


def doc_tokens(doc, length, vocab=50000):
    """Distinct, recognisable token ids for synthetic document `doc`."""
    return [(doc * 7919 + k) % vocab for k in range(length)]


def build_null_dataset(tmp_path, name, lengths, domains=None, vocab=60000):
    """A dataset whose document d holds doc_tokens(d, lengths[d]); returns its prefix."""
    records = []
    for d, n in enumerate(lengths):
        record = {"text": " ".join(map(str, doc_tokens(d, n)))}
        if domains is not None:
            record["meta"] = {"src": domains[d]}
        records.append(record)
    path = write_jsonl(tmp_path / f"{name}.jsonl", records)
    extra = ["--domain-key", "meta.src"] if domains is not None else []
    preprocess(path, tmp_path / name, *extra, tokenizer=null_tokenizer(vocab))
    return str(tmp_path / f"{name}_text_document")


def files_in(directory):
    return sorted(os.listdir(directory))


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def lengths_rng(seed, n, low=1, high=300):
    return np.random.default_rng(seed).integers(low, high, size=n).tolist()

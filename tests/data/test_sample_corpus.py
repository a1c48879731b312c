"""The embedded sample corpus: real local text, >= 3 domains, long tail, deterministic."""

import json
import statistics

import pytest

import megatron_anchor.data.sample_corpus as sc
from tests.data.data_helpers import assert_one_line_error, read_bytes
from megatron_anchor.cli.build_sample_corpus import main

SMALL = ["--max-bytes", "300000", "--max-document-bytes", "200000"]


def _build(tmp_path, name, *extra):
    out = tmp_path / name
    assert main(["--output", str(out), *SMALL, *extra]) == 0
    return out, [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_corpus_has_three_domains_and_a_long_tail(tmp_path):
    _, records = _build(tmp_path, "c.jsonl")
    domains = {r["meta"]["source"] for r in records}
    assert len(domains) >= 3 and "code" in domains
    sizes = [len(r["text"]) for r in records]
    assert max(sizes) >= 10 * statistics.median(sizes)  # a few very long documents
    assert all(r["text"].strip() for r in records)


def test_corpus_is_deterministic_and_seeded(tmp_path):
    a, _ = _build(tmp_path, "a.jsonl")
    b, _ = _build(tmp_path, "b.jsonl")
    c, _ = _build(tmp_path, "c.jsonl", "--seed", "7")
    assert read_bytes(a) == read_bytes(b)
    assert read_bytes(a) != read_bytes(c)


def test_missing_sources_fall_back_but_need_three_domains(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sc.SOURCES, "man", lambda: [])  # e.g. a slim image without man pages
    _, records = _build(tmp_path, "c.jsonl")
    assert {r["meta"]["source"] for r in records} == {"code", "docs", "legal"}
    monkeypatch.setitem(sc.SOURCES, "legal", lambda: [])
    capsys.readouterr()
    status = main(["--output", str(tmp_path / "d.jsonl"), *SMALL])
    assert_one_line_error(status, capsys.readouterr().err, "at least 3")
    assert not (tmp_path / "d.jsonl").exists()
    with pytest.raises(sc.DatasetError, match="at least 3"):  # the library's own error
        sc.build_corpus(sc.SampleCorpusConfig(max_bytes=300000, max_document_bytes=200000))


def test_budget_limits_per_domain(tmp_path):
    _, records = _build(tmp_path, "c.jsonl", "--max-documents", "5")
    for domain in {r["meta"]["source"] for r in records}:
        assert sum(r["meta"]["source"] == domain for r in records) <= 5

"""preprocess_data: Megatron-readable output, byte identity across workers/partitions, bad
input handling, atomic output, tokenizer types, sentence splitting."""

import json
import os
import shutil

import numpy as np
import pytest

from tests.data.data_helpers import (
    assert_one_line_error,
    build_null_dataset,
    doc_tokens,
    files_in,
    null_tokenizer,
    preprocess,
    preprocess_argv,
    read_bytes,
    run_main,
    write_jsonl,
)
from megatron_anchor.cli.preprocess_data import main as preprocess_main
from megatron_anchor.data.indexed import DatasetError, megatron_indexed, open_dataset

CORPUS = [
    {"text": "Dr. Smith went home. He was tired. It rained all day.", "meta": {"set": "news"}},
    {"text": "def f(x):\n    return x + 1\n", "meta": {"set": "code"}},
    {"text": "Ünïcödé text — with dashes. And a second sentence!", "meta": {"set": "news"}},
    {"text": ["pre-split sentence one.", " and two."], "meta": {"set": "books"}},
] * 40


def test_round_trip_read_by_megatron_core(tmp_path):
    lengths = [3, 1, 17, 250, 8]
    prefix = build_null_dataset(tmp_path, "d", lengths, domains=["a", "b", "a", "c", "b"])
    ds = megatron_indexed().IndexedDataset(prefix)  # Megatron's reader, unchanged
    assert ds.index.dtype == np.uint16
    assert len(ds) == len(lengths)
    assert ds.document_indices.tolist() == list(range(len(lengths) + 1))  # one seq per doc
    for d, n in enumerate(lengths):
        assert ds[d].tolist() == doc_tokens(d, n)
    tagged = open_dataset(prefix)
    assert tagged.domains.names == ["a", "b", "c"]
    assert [tagged.domains.name_of(d) for d in range(5)] == ["a", "b", "a", "c", "b"]


def test_append_eod_and_int32_for_large_vocab(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "70000 5"}, {"text": "1"}])
    preprocess(path, tmp_path / "out", "--append-eod", tokenizer=null_tokenizer(70001))
    ds = megatron_indexed().IndexedDataset(str(tmp_path / "out_text_document"))
    assert ds.index.dtype == np.int32  # vocab >= 65500, as Megatron chooses
    assert ds[0].tolist() == [70000, 5, 70001] and ds[1].tolist() == [1, 70001]


def test_multiple_json_keys_write_one_dataset_each(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "ab", "title": "x"},
                                               {"text": "c", "title": "yz"}])
    preprocess(path, tmp_path / "out", "--json-keys", "text", "title")
    text = megatron_indexed().IndexedDataset(str(tmp_path / "out_text_document"))
    title = megatron_indexed().IndexedDataset(str(tmp_path / "out_title_document"))
    assert [text[i].tolist() for i in range(2)] == [[97, 98], [99]]
    assert [title[i].tolist() for i in range(2)] == [[120], [121, 122]]


@pytest.mark.parametrize("workers,partitions", [(2, 1), (2, 2), (1, 3)])
def test_output_bytes_independent_of_workers_and_partitions(tmp_path, monkeypatch,
                                                             workers, partitions):
    import megatron_anchor.data.preprocess as pp

    monkeypatch.setattr(pp, "LINES_PER_TASK", 7)  # many tasks, so ordering really matters
    path = write_jsonl(tmp_path / "in.jsonl", CORPUS)
    flags = ["--append-eod", "--split-sentences", "--domain-key", "meta.set"]
    preprocess(path, tmp_path / "one", *flags)
    preprocess(path, tmp_path / "many", *flags, "--workers", str(workers),
               "--partitions", str(partitions))
    for suffix in (".bin", ".idx", ".dom"):
        assert read_bytes(tmp_path / f"one_text_document{suffix}") == \
            read_bytes(tmp_path / f"many_text_document{suffix}"), suffix
    assert not [n for n in files_in(tmp_path) if ".tmp" in n]


def test_gzip_input_gives_identical_output(tmp_path):
    plain = write_jsonl(tmp_path / "in.jsonl", CORPUS[:8])
    gz = write_jsonl(tmp_path / "in.jsonl.gz", CORPUS[:8], gz=True)
    preprocess(plain, tmp_path / "p")
    preprocess(gz, tmp_path / "g")
    assert read_bytes(tmp_path / "p_text_document.bin") == read_bytes(tmp_path / "g_text_document.bin")


BAD_LINES = [
    (b'{"text": "unterminated', "malformed-json"),
    (b'{"title": "no text key"}', "missing-key"),
    (b'{"text": 42}', "non-string-text"),
    (b'{"text": "   "}', "empty-text"),
    (b'{"text": "caf\xe9 latin-1"}', "invalid-utf8"),
    (b'{"text": "lone \\ud800 surrogate"}', "invalid-utf8"),
    (b'{"text": "no domain here"}', "missing-domain"),
    (b'[1, 2, 3]', "malformed-json"),
]


@pytest.mark.parametrize("bad,reason", BAD_LINES)
def test_bad_line_is_a_clear_error_naming_file_and_line(tmp_path, capsys, bad, reason):
    good = b'{"text": "fine", "meta": {"set": "a"}}'
    path = write_jsonl(tmp_path / "in.jsonl", [good, good, bad, good])
    status, _, err = run_main(preprocess_main, preprocess_argv(
        path, tmp_path / "out", "--domain-key", "meta.set"), capsys)
    assert_one_line_error(status, err, f"{path}:3:", reason)
    assert files_in(tmp_path) == ["in.jsonl"]  # nothing written, no temporaries left


@pytest.mark.parametrize("bad,reason", BAD_LINES)
def test_bad_line_is_skipped_and_counted(tmp_path, bad, reason):
    good = b'{"text": "fine", "meta": {"set": "a"}}'
    path = write_jsonl(tmp_path / "in.jsonl", [good, bad, good, b"", good])
    summary = preprocess(path, tmp_path / "out", "--domain-key", "meta.set", "--skip-bad-lines")
    assert summary["documents"] == 3
    assert summary["skipped"] == {reason: 1, "blank-line": 1}
    assert len(megatron_indexed().IndexedDataset(str(tmp_path / "out_text_document"))) == 3


def test_default_domain_fills_missing_domains(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "a", "meta": {"set": "x"}}, {"text": "b"}])
    summary = preprocess(path, tmp_path / "out", "--domain-key", "meta.set",
                         "--default-domain", "web")
    assert summary["domains"] == {"x": 1, "web": 1}


def test_empty_input_is_an_error(tmp_path, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", [])
    status, _, err = run_main(preprocess_main, preprocess_argv(path, tmp_path / "out"), capsys)
    assert_one_line_error(status, err, "no documents")
    with pytest.raises(DatasetError, match="no documents"):  # the library's own error
        preprocess(path, tmp_path / "out")
    assert files_in(tmp_path) == ["in.jsonl"]


def test_failed_run_leaves_previous_output_untouched(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "first"}])
    preprocess(path, tmp_path / "out")
    before = read_bytes(tmp_path / "out_text_document.bin")
    write_jsonl(tmp_path / "in.jsonl", [{"text": "second"}, b"{broken"])
    with pytest.raises(DatasetError):
        preprocess(path, tmp_path / "out")
    assert read_bytes(tmp_path / "out_text_document.bin") == before
    assert files_in(tmp_path) == ["in.jsonl", "out_text_document.bin", "out_text_document.idx"]


def test_interrupted_run_leaves_no_files(tmp_path, monkeypatch):
    import megatron_anchor.data.preprocess as pp

    calls = {"n": 0}
    real = pp._write_result

    def interrupt_after_two(*args):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(pp, "_write_result", interrupt_after_two)
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}] * 10)
    with pytest.raises(KeyboardInterrupt):
        preprocess(path, tmp_path / "out", "--domain-key", "t", "--default-domain", "d")
    assert files_in(tmp_path) == ["in.jsonl"]


# -- reading back: validation in open_dataset ---------------------------------------------

def test_truncated_bin_is_detected(tmp_path):
    prefix = build_null_dataset(tmp_path, "d", [5, 6, 7])
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(prefix + ".bin") - 2)
    with pytest.raises(DatasetError, match="truncated"):
        open_dataset(prefix)


def test_tag_store_of_another_dataset_is_detected(tmp_path):
    a = build_null_dataset(tmp_path, "a", [5, 6, 7], domains=["x", "y", "x"])
    b = build_null_dataset(tmp_path, "b", [5, 6, 8], domains=["x", "y", "x"])  # same count
    c = build_null_dataset(tmp_path, "c", [5, 6], domains=["x", "y"])
    shutil.copy(b + ".dom", a + ".dom")
    with pytest.raises(DatasetError, match="does not match"):
        open_dataset(a)
    shutil.copy(c + ".dom", a + ".dom")
    with pytest.raises(DatasetError, match="2 documents but the dataset has 3"):
        open_dataset(a)


def test_wrong_dtype_is_detected(tmp_path):
    prefix = build_null_dataset(tmp_path, "d", [5, 6])
    with pytest.raises(DatasetError, match="expected int32"):
        open_dataset(prefix, expected_dtype=np.int32)
    with pytest.raises(DatasetError, match="cannot hold"):
        open_dataset(prefix, vocab_size=100000)
    raw = bytearray(read_bytes(prefix + ".idx"))
    raw[17] = 6  # float64 code: not a token dtype
    with open(prefix + ".idx", "wb") as f:
        f.write(raw)
    with pytest.raises(DatasetError, match="not a token-id dtype"):
        open_dataset(prefix)


# -- tokenizers -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory):
    from megatron_anchor.data.train_tokenizer import TokenizerTrainingConfig, train_tokenizer

    tmp = tmp_path_factory.mktemp("tok")
    texts = [{"text": f"the quick brown fox {i} jumps over the lazy dog. " * 3} for i in range(200)]
    path = write_jsonl(tmp / "c.jsonl", texts)
    train_tokenizer(TokenizerTrainingConfig([path], str(tmp / "tokenizer.json"), vocab_size=400))
    return tmp


def test_huggingface_tokenizer_matches_direct_encoding(tmp_path, trained_tokenizer):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(trained_tokenizer / "tokenizer.json"))
    path = write_jsonl(tmp_path / "in.jsonl", CORPUS[:4])
    preprocess(path, tmp_path / "out", "--append-eod",
               tokenizer=("--tokenizer-type", "HuggingFaceTokenizer",
                          "--tokenizer-model", str(trained_tokenizer)))  # a directory
    ds = megatron_indexed().IndexedDataset(str(tmp_path / "out_text_document"))
    for i, record in enumerate(CORPUS[:4]):
        pieces = record["text"] if isinstance(record["text"], list) else [record["text"]]
        expected = [t for p in pieces for t in tok.encode(p, add_special_tokens=False).ids]
        assert ds[i].tolist() == expected + [tok.token_to_id("<|endoftext|>")]


def test_gpt2_bpe_tokenizer_from_vocab_and_merges(tmp_path, trained_tokenizer):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(trained_tokenizer / "tokenizer.json"))
    tok.model.save(str(tmp_path))  # vocab.json + merges.txt
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "the lazy dog jumps"}])
    preprocess(path, tmp_path / "out", "--append-eod",
               tokenizer=("--tokenizer-type", "GPT2BPETokenizer",
                          "--vocab-file", str(tmp_path / "vocab.json"),
                          "--merge-file", str(tmp_path / "merges.txt")))
    ds = megatron_indexed().IndexedDataset(str(tmp_path / "out_text_document"))
    assert ds[0].tolist() == tok.encode("the lazy dog jumps").ids + [0]


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "sp.txt"
    corpus.write_text("\n".join(f"hello world number {i} of many sentences" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=40, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello world"}])
    preprocess(path, tmp_path / "out", "--append-eod",
               tokenizer=("--tokenizer-type", "SentencePieceTokenizer",
                          "--tokenizer-model", str(tmp_path / "sp.model")))
    ds = megatron_indexed().IndexedDataset(str(tmp_path / "out_text_document"))
    assert ds[0].tolist() == sp.encode("hello world") + [sp.eos_id()]


# -- sentence splitting ----------------------------------------------------------------------

def test_punkt_uses_pretrained_english_parameters_without_download(monkeypatch):
    import nltk

    monkeypatch.setattr(nltk, "download", lambda *a, **k: pytest.fail("nltk.download called"))
    from megatron_anchor.data.sentences import build_sentence_splitter

    splitter = build_sentence_splitter("english")
    # "Dr." and "Mr." are known abbreviations only through the pretrained parameters.
    assert splitter.tokenize("Dr. Smith met Mr. Jones. They talked.") == \
        ["Dr. Smith met Mr. Jones.", "They talked."]


def test_split_sentences_concatenates_into_one_document(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "Dr. Who ran. He hid.\nThen slept."}])
    preprocess(path, tmp_path / "split", "--split-sentences")
    preprocess(path, tmp_path / "keep", "--split-sentences", "--keep-newlines")
    split = megatron_indexed().IndexedDataset(str(tmp_path / "split_text_document"))
    keep = megatron_indexed().IndexedDataset(str(tmp_path / "keep_text_document"))
    assert len(split) == 1 and len(keep) == 1  # still one sequence per document
    assert bytes(split[0].tolist()).decode() == "Dr. Who ran.He hid.Then slept."
    assert bytes(keep[0].tolist()).decode() == "Dr. Who ran. He hid.\nThen slept."


def test_json_summary_output(tmp_path, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", CORPUS[:4])
    status, out, _ = run_main(preprocess_main, preprocess_argv(
        path, tmp_path / "out", "--domain-key", "meta.set", "--json"), capsys)
    assert status == 0
    summary = json.loads(out)
    assert summary["documents"] == 4
    assert summary["domains"] == {"news": 2, "code": 1, "books": 1}
    assert summary["tokens"]["text"] == sum(
        len("".join(r["text"]).encode()) for r in CORPUS[:4])


def test_document_reads_stop_at_the_document_end(tmp_path):
    """A read longer than the document stops at its end, like a slice: Megatron's
    IndexedDataset.get would run on into the next document."""
    prefix = build_null_dataset(tmp_path, "short", [5, 7, 3])
    dataset = open_dataset(prefix)
    for d, n in enumerate([5, 7, 3]):
        assert dataset.document(d, length=100).tolist() == doc_tokens(d, n)
        assert dataset.document(d, offset=2, length=100).tolist() == doc_tokens(d, n)[2:]
        assert dataset.document(d, offset=1, length=2).tolist() == doc_tokens(d, n)[1:3]

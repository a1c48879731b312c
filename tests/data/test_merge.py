"""merge_datasets: shards concatenated in order by Megatron's builder, tag stores unioned."""

import json

from tests.data.data_helpers import (
    assert_one_line_error,
    null_tokenizer,
    preprocess,
    read_bytes,
    run_main,
    write_jsonl,
)
from megatron_anchor.cli.merge_datasets import main as merge_cli
from megatron_anchor.data.indexed import megatron_indexed, open_dataset

SHARD_A = [{"text": "1 2 3", "meta": {"s": "web"}}, {"text": "4", "meta": {"s": "code"}}]
SHARD_B = [{"text": "5 6", "meta": {"s": "books"}}, {"text": "7 8 9", "meta": {"s": "web"}},
           {"text": "10", "meta": {"s": "books"}}]


def _shard(tmp_path, name, records, *extra):
    path = write_jsonl(tmp_path / f"{name}.jsonl", records)
    preprocess(path, tmp_path / "shards" / name, "--domain-key", "meta.s", *extra,
               tokenizer=null_tokenizer(100))
    return str(tmp_path / "shards" / f"{name}_text_document")


def merge_main(argv, capsys):
    """The tool in-process with --json: its summary (a failure is one stderr line, status 2)."""
    capsys.readouterr()
    status = merge_cli(argv + ["--json"])
    out, err = capsys.readouterr()
    assert status == 0, err
    return json.loads(out)


def test_merge_with_tags_equals_preprocessing_everything_at_once(tmp_path, capsys):
    _shard(tmp_path, "a", SHARD_A)
    _shard(tmp_path, "b", SHARD_B)
    summary = merge_main(["--input", str(tmp_path / "shards"), "--output-prefix",
                          str(tmp_path / "merged")], capsys)
    assert summary["documents"] == 5 and summary["tokens"] == 10
    merged = open_dataset(str(tmp_path / "merged"))  # validates the tag store checksum
    assert [merged.indexed[i].tolist() for i in range(5)] == [[1, 2, 3], [4], [5, 6], [7, 8, 9], [10]]
    assert merged.domains.names == ["web", "code", "books"]  # union, first appearance
    assert [merged.domains.name_of(i) for i in range(5)] == ["web", "code", "books", "web", "books"]
    # Byte-identical to one preprocessing run over the concatenated input.
    _shard(tmp_path, "all", SHARD_A + SHARD_B)
    for suffix in (".bin", ".idx", ".dom"):
        assert read_bytes(str(tmp_path / "merged") + suffix) == \
            read_bytes(str(tmp_path / "shards" / "all_text_document") + suffix)
    reader = megatron_indexed().IndexedDataset(str(tmp_path / "merged"))
    assert reader.document_indices.tolist() == [0, 1, 2, 3, 4, 5]


def test_merge_refuses_mixed_dtypes(tmp_path, capsys):
    a = _shard(tmp_path, "a", SHARD_A)
    path = write_jsonl(tmp_path / "big.jsonl", [{"text": "1", "meta": {"s": "x"}}])
    preprocess(path, tmp_path / "big", "--domain-key", "meta.s", tokenizer=null_tokenizer(70000))
    status, _, err = run_main(merge_cli, ["--datasets", a, str(tmp_path / "big_text_document"),
                                          "--output-prefix", str(tmp_path / "m")], capsys)
    assert_one_line_error(status, err, "different token dtypes")
    assert not (tmp_path / "m.bin").exists()


def test_merge_untagged_shard_needs_default_domain(tmp_path, capsys):
    a = _shard(tmp_path, "a", SHARD_A)
    path = write_jsonl(tmp_path / "u.jsonl", [{"text": "11 12"}])
    preprocess(path, tmp_path / "u", tokenizer=null_tokenizer(100))
    untagged = str(tmp_path / "u_text_document")
    status, _, err = run_main(merge_cli, ["--datasets", a, untagged, "--output-prefix",
                                          str(tmp_path / "m")], capsys)
    assert_one_line_error(status, err, "--default-domain")
    merge_main(["--datasets", a, untagged, "--output-prefix", str(tmp_path / "m"),
                "--default-domain", "misc"], capsys)
    merged = open_dataset(str(tmp_path / "m"))
    assert [merged.domains.name_of(i) for i in range(3)] == ["web", "code", "misc"]


def test_merge_domain_names_is_first_appearance_union_with_remapped_ids():
    import numpy as np

    from megatron_anchor.data.indexed import merge_domain_names

    names, ids = merge_domain_names([(["web", "code"], [1, 0, 1]), (["books", "web"], [0, 1]),
                                     (["misc"], None), (["code"], np.zeros(2, np.int16))])
    assert names == ["web", "code", "books", "misc"]
    assert [None if i is None else i.tolist() for i in ids] == [[1, 0, 1], [2, 0], None, [1, 1]]
    assert all(i.dtype == np.int64 for i in ids if i is not None)

"""dataset_stats: histogram, documents per window, padding and FLOP ratios, PNG, JSON."""

import json

import pytest

from tests.data.data_helpers import build_null_dataset
from megatron_anchor.cli.dataset_stats import main
from megatron_anchor.data.stats import length_histogram


def test_statistics_of_a_known_layout(tmp_path, capsys):
    prefix = build_null_dataset(tmp_path, "d", [4] * 8, ["a"] * 6 + ["b"] * 2)
    plot = tmp_path / "hist.png"
    capsys.readouterr()  # drop the preprocessing summary
    assert main(["--data-path", prefix, "--seq-length", "16", "--plot", str(plot), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["documents"] == 8 and stats["tokens"] == 32
    assert stats["documents_per_domain"] == {"a": 6, "b": 2}
    full, intra = stats["variants"]["full"], stats["variants"]["intra-doc"]
    assert full["attention_flop_ratio"] == 1.0
    assert intra["attention_flop_ratio"] == pytest.approx(4 * 4 ** 2 / 16 ** 2)  # 4 docs of 4
    assert intra["windows"] == 2 and intra["padding_fraction"] == 0.0
    assert intra["documents_per_window"]["mean"] == 4.0
    # anchor: [A + 4 tokens] segments of 5, three per window of 16; windows 3,3,2 documents.
    anchor = stats["variants"]["anchor"]
    assert anchor["windows"] == 3
    assert anchor["attention_flop_ratio"] == pytest.approx((3 * 25 + 3 * 25 + 2 * 25) / 3 / 256)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_length_histogram_bins():
    rows = length_histogram(__import__("numpy").array([1, 2, 3, 4, 1000]))
    counts = {r["min"]: r["documents"] for r in rows}
    assert counts[0] == 1 and counts[2] == 2 and counts[4] == 1 and counts[512] == 1
    assert sum(counts.values()) == 5

"""`megatron-anchor-rope-precision --quick` on SmolLM2-135M: the qualitative findings.

Thresholds come from measurements on this model (see the numbers in the comments; the
report of the full run is in benchmarks/RESULTS.md), with margin for BLAS differences.
"""

import csv
import json

import pytest

from megatron_anchor.cli import rope_precision as rope_cli
from megatron_anchor.data.indexed import DatasetError
from megatron_anchor.diagnostics import rope_inputs


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, smollm2):
    out = tmp_path_factory.mktemp("rope_precision")
    assert rope_cli.main(["--quick", "--output-dir", str(out), "--json", str(out / "s.json"),
                          "--no-progress"]) == 0
    return out, json.loads((out / "s.json").read_text())


@pytest.mark.slow
def test_outputs_written(quick_run):
    out, summary = quick_run
    assert (out / "rope_precision.png").stat().st_size > 10_000
    with open(out / "rope_precision.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["experiment"] for r in rows} == {"shift_sweep", "per_key", "first_token_vs_length"}
    assert summary["seq_length"] == 512


@pytest.mark.slow
def test_bf16_breaks_shift_invariance_fp32_does_not(quick_run):
    f = quick_run[1]["findings"]
    # Measured (L=512): D 16 in BF16 vs 1.0e-3 in FP32 (ratio 1.6e4).
    assert f["bf16_over_fp32_D"] >= 100
    # Pretraining amplifies it: random init 1.1 (ratio 14).
    assert f["bf16_pretrained_over_random_init_D"] >= 3
    # The BF16 rotation itself is a minor part: FP32 rotation in the BF16 model leaves
    # D 14.7 of 16, still >1e4x FP32.
    assert f["bf16-pretrained-rope-fp32"]["D_shift0"] >= 100 * f["fp32-pretrained"]["D_shift0"]
    assert f["rotation_share_of_bf16_D"] < 0.5


@pytest.mark.slow
def test_key0_carries_a_disproportionate_share(quick_run):
    f = quick_run[1]["findings"]
    # Measured 3.25% of D on key 0 vs a uniform 1/512 = 0.195% (17x).
    assert f["bf16-pretrained"]["key0_share_shift0"] >= 10 * f["uniform_key_share"]


@pytest.mark.slow
def test_first_token_logit_difference(quick_run):
    summary = quick_run[1]
    by_setting = summary["first_token_vs_length"]
    bf16 = by_setting["bf16-pretrained"]["first_token_logit_difference"]
    fp32 = by_setting["fp32-pretrained"]["first_token_logit_difference"]
    assert min(bf16) >= 100 * max(fp32)  # measured 3.7-4.6 vs 2-3e-4
    # Grows with length in BF16 pretrained (64 -> 1024: 3.68 -> 4.55, measured).
    assert bf16[-1] > 1.1 * bf16[0]


@pytest.mark.slow
def test_document_masked_layouts_measured(quick_run):
    layouts = quick_run[1]["findings"]["layouts"]["bf16-pretrained"]
    assert set(layouts) == {"full", "intra-doc", "anchor"}
    for entry in layouts.values():
        assert entry["D_shift0"] > entry["D_without_first_keys_shift0"] > 0


def test_documents_from_a_dataset_prefix(tmp_path):
    """--data-path reads whole documents, each cut to --max-document-tokens and never
    running into the next one; a missing or truncated dataset is a one-line error."""
    from megatron_anchor.cli.preprocess_data import main as preprocess

    texts = ["short one", "x" * 500, "a medium-sized document here"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert preprocess(["--input", str(jsonl), "--output-prefix", str(tmp_path / "c"),
                       "--tokenizer-type", "ByteTokenizer", "--append-eod"]) == 0
    prefix = str(tmp_path / "c_text_document")
    config = rope_cli.config_from_args(rope_cli.build_parser().parse_args(
        ["--data-path", prefix, "--seq-length", "64", "--max-document-tokens", "40"]))
    docs, origin = rope_inputs.load_documents(config, source=None, tokens_needed=10_000)
    assert prefix in origin
    # Byte tokens plus EOD: 10, 501 -> cut to 40, 29.
    assert sorted(len(d) for d in docs) == [10, 29, 40]

    from megatron_anchor.diagnostics.rope_precision import RopePrecisionConfig, RopePrecisionError

    missing = str(tmp_path / "missing")
    with pytest.raises(RopePrecisionError, match="dataset file not found"):  # checked up front
        rope_cli.config_from_args(rope_cli.build_parser().parse_args(["--data-path", missing]))
    with pytest.raises(DatasetError, match="dataset file not found"):
        rope_inputs.load_documents(RopePrecisionConfig(data_path=missing, max_document_tokens=8),
                                   source=None, tokens_needed=10)

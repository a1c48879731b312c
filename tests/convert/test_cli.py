"""megatron-anchor-convert end to end: import -> export -> transformers gives the same logits."""

import json
import os

import pytest
import torch

from megatron_anchor.cli.convert_checkpoint import main, size_bytes
from tests.convert.conftest import BOS, documents, hf_logits, make_hf_model


def test_import_export_cli_round_trip(tmp_path, capsys, megatron_cpu):
    from transformers import AutoModelForCausalLM

    src, hf = make_hf_model("qwen2-bias-tied-gqa", tmp_path / "hf", max_shard_size="30KB")
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    assert main(["import", "--hf-dir", src, "--output", ckpt, "--rotary-base", "2e6",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model_config"]["rotary_base"] == 2e6
    assert summary["model_config"]["add_qkv_bias"]
    assert os.path.isfile(os.path.join(ckpt, "release", "hf_config.json"))

    assert main(["export", "--load", ckpt, "--output", out, "--max-shard-size", "40KB"]) == 0
    assert "export:" in capsys.readouterr().out
    assert main(["export", "--load", ckpt, "--output", out]) == 2  # never over old shards
    assert "already holds" in capsys.readouterr().err
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"]
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 2e6
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))

    back = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tokens = [BOS] + documents(seed=2, lengths=(50,))[0]
    pos = list(range(len(tokens)))
    exported = hf_logits(back, tokens, pos)
    assert not torch.allclose(exported, hf_logits(hf, tokens, pos), atol=1e-4)  # base 1e6
    # The same weights; only the RoPE base changed, so rebuild the reference at 2e6.
    hf.config.rope_parameters["rope_theta"] = 2e6
    reference = type(hf)(hf.config).eval()
    reference.load_state_dict(hf.state_dict())
    assert torch.equal(exported, hf_logits(reference, tokens, pos))


@pytest.mark.parametrize("argv,words", [
    (["import", "--hf-dir", "{missing}", "--output", "{tmp}/c"], "no config.json"),
    (["import", "--hf-dir", "{bad}", "--output", "{tmp}/c"], "rope_parameters"),
    (["export", "--load", "{missing}", "--output", "{tmp}/o"], "no such checkpoint"),
    (["import", "--hf-dir", "x"], "--output"),
    (["export", "--load", "x", "--output", "y", "--max-shard-size", "lots"], "not a size"),
])
def test_cli_errors_are_one_line_with_status_2(argv, words, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}))
    argv = [a.format(missing=str(tmp_path / "nope"), bad=str(bad), tmp=str(tmp_path))
            for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megatron-anchor-convert: error:")
    assert words in err[0], err[0]


def test_size_parser():
    assert size_bytes("2GB") == 2 * 10 ** 9 and size_bytes("1GiB") == 2 ** 30
    assert size_bytes("500") == 500 and size_bytes("1.5MB") == 1_500_000

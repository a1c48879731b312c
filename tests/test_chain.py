"""The user's journey, each tool on what the previous one wrote, as a user runs them.

A corpus made on the spot (text already on this machine) -> tokenizer -> Megatron indexed
dataset -> `megatron-anchor-pretrain --save` -> `verify_parity --load` (TP=2 and CP=2
against TP=1, gloo) -> `rope_precision --load --quick` -> resume with `--load`. Every step
is a subprocess with the same command line a user types, and must exit 0; no step is given
the architecture again: it comes from the checkpoint.
"""

import json
import os
import sys

import pytest

from megatron_anchor.testing import fresh_launch_env, run_command

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")


def _console_script(name: str, module: str) -> list:
    """The installed console script, as a user calls it (the module where not installed)."""
    script = os.path.join(os.path.dirname(sys.executable), name)
    return [script] if os.path.exists(script) else [sys.executable, "-m", module]


def _run(command, timeout=420):
    env = fresh_launch_env(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    returncode, stdout, stderr = run_command(command, timeout, cwd=ROOT, env=env)
    assert returncode == 0, f"{command}\n{stdout[-3000:]}\n{stderr[-5000:]}"
    return stdout, stderr


def _torchrun(nproc: int, *argv):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(nproc), *argv]


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    work = tmp_path_factory.mktemp("journey")
    corpus, tokenizer = work / "corpus.jsonl", work / "tokenizer.json"
    prefix, save = work / "corpus", work / "checkpoints"
    _run([sys.executable, f"{TOOLS}/build_sample_corpus.py", "--output", corpus,
          "--max-bytes", "150000", "--max-document-bytes", "16384"])
    _run([sys.executable, f"{TOOLS}/train_tokenizer.py", "--input", corpus,
          "--vocab-size", "1024", "--output", tokenizer])
    _run([sys.executable, f"{TOOLS}/preprocess_data.py", "--input", corpus,
          "--output-prefix", prefix, "--json-keys", "text", "--domain-key", "meta.source",
          "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer,
          "--append-eod", "--workers", "1"])
    data = str(prefix) + "_text_document"
    pretrain = _console_script("megatron-anchor-pretrain", "megatron_anchor.training.pretrain")
    train_flags = ["--cpu", "--data-path", data, "--split", "95,5,0",
                   "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer,
                   "--attention-variant", "anchor", "--seq-length", "256",
                   "--micro-batch-size", "1", "--global-batch-size", "2", "--lr", "1e-3",
                   "--lr-warmup-iters", "1", "--log-interval", "1", "--no-progress-bar",
                   "--save", save, "--load", save]
    first, _ = _run(pretrain + train_flags + [
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--train-iters", "4", "--exit-interval", "3"])
    return {"work": work, "data": data, "save": save, "pretrain": pretrain,
            "train_flags": train_flags, "first": first}


def test_training_saves_a_checkpoint_with_its_architecture_and_tokenizer(journey):
    save = journey["save"]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    saved = json.loads((save / "iter_0000003" / "model_config.json").read_text())
    assert (saved["num_layers"], saved["hidden_size"], saved["vocab_size"]) == (2, 64, 1024)
    assert (save / "tokenizer" / "tokenizer.json").is_file()


def test_parity_on_the_trained_checkpoint(journey):
    report = journey["work"] / "parity.json"
    stdout, _ = _run(_torchrun(2, f"{TOOLS}/verify_parity.py", "--cpu",
                               "--layouts", "tp1cp1,tp2cp1,tp1cp2", "--variants", "anchor",
                               "--dtypes", "fp32", "--load", journey["save"],
                               "--data-path", journey["data"], "--seq-length", "256",
                               "--json", report))
    assert "parity PASSED" in stdout
    result = json.loads(report.read_text())
    assert result["model"]["hidden_size"] == 64 and result["passed"]
    assert {r["layout"] for r in result["rows"]} == {"tp1cp1", "tp2cp1", "tp1cp2"}


def test_rope_diagnostic_on_the_trained_checkpoint(journey):
    out = journey["work"] / "rope"
    summary = journey["work"] / "rope.json"
    _run([sys.executable, f"{TOOLS}/rope_precision.py", "--load", journey["save"],
          "--data-path", journey["data"], "--quick", "--no-progress",
          "--output-dir", out, "--json", summary])
    result = json.loads(summary.read_text())
    # it measured our checkpoint (its architecture, the tracker's iteration), not SmolLM2
    from megatron_anchor import checkpoint

    assert result["model"] == f"Megatron checkpoint {checkpoint.open(journey['save']).path}"
    assert result["config"]["hidden_size"] == 64 and result["config"]["num_layers"] == 2
    assert result["shift_sweep"]


def test_resume_continues_from_the_saved_iteration(journey):
    stdout, _ = _run(journey["pretrain"] + journey["train_flags"] + ["--train-iters", "4"])
    assert "iterations       3 -> 4" in stdout
    assert (journey["save"] / "iter_0000004" / "model_config.json").is_file()


def test_an_architecture_flag_that_contradicts_the_checkpoint_is_one_line(journey, capsys):
    from megatron_anchor.training.pretrain import main

    argv = [str(a) for a in journey["train_flags"]] + ["--hidden-size", "128",
                                                        "--train-iters", "5"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("megatron-anchor-pretrain: error: --hidden-size 128 contradicts")
    assert "hidden_size = 64" in err[-1] and "Traceback" not in "\n".join(err)

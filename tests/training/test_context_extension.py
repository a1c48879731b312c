"""benchmarks/context_extension.sh in miniature: two tiny BF16 runs (full, anchor) saved
every 2 steps, megatron-anchor-eval over their last checkpoints, and the summary script on
what those tools wrote (not on hand-made JSON)."""

import importlib.util
import json
import os
import sys

import pytest

from megatron_anchor.testing import fresh_launch_env, run_command

from tests.evaluation.helpers import write_byte_tokenizer
from tests.training.conftest import tiny_argv

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "context_extension.sh")


def _summary_module():
    path = os.path.join(ROOT, "benchmarks", "context_extension_summary.py")
    spec = importlib.util.spec_from_file_location("context_extension_summary", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workdir(megatron_cpu, byte_corpus, tmp_path_factory):
    from megatron_anchor.training.pretrain import run

    root = tmp_path_factory.mktemp("context_extension")
    tokenizer = write_byte_tokenizer(root / "tokenizer")
    for variant in ("full", "anchor"):
        run(tiny_argv(byte_corpus, "--bf16", "--attention-variant", variant,
                      "--anchor-token-id", "256", "--train-iters", "4",
                      "--save", str(root / f"run_{variant}"), "--save-interval", "2"))
        code, out, err = run_command(
            [sys.executable, os.path.join(ROOT, "tools", "eval_long_context.py"), "--cpu",
             "--no-progress", "--load", str(root / f"run_{variant}"), "--last-checkpoints", "2",
             "--tokenizer-model", tokenizer, "--tasks", "passkey", "--lengths", "256,320",
             "--samples", "2", "--no-controls", "--bf16",
             "--json", str(root / f"eval_run_{variant}.passkey.json")],
            240, cwd=ROOT, env=fresh_launch_env(OMP_NUM_THREADS="1"))
        assert code == 0, out + err[-3000:]
    return root


@pytest.mark.slow
def test_summary_reads_what_the_tools_wrote(workdir, tmp_path, capsys):
    summary = _summary_module()
    training = summary.training_summary(str(workdir))
    evals = summary.eval_summary(str(workdir))
    for variant in ("full", "anchor"):
        with open(workdir / f"run_{variant}" / "metrics.jsonl", encoding="utf-8") as f:
            losses = [r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]
        t = training[f"run_{variant}"]
        assert t["iterations"] == [1, 2, 3, 4] and t["loss"] == losses
        e = evals[f"run_{variant}"]
        assert e["checkpoints"] == ["iter_0000002", "iter_0000004"]
        assert e["precision"] == "bf16"
        cell = e["cells"]["passkey@320"]
        assert cell["prompts"] == 2 and set(cell["per_checkpoint"]) == set(e["checkpoints"])
        values = list(cell["per_checkpoint"].values())
        assert cell["mean"] == pytest.approx(sum(values) / 2)
        assert len(cell["answer_nll_per_checkpoint"]) == 2 and cell["answer_nll"] > 0
    assert training["run_full"]["loss"] != training["run_anchor"]["loss"]

    out = tmp_path / "summary.json"
    png = tmp_path / "summary.png"
    assert summary.main([str(workdir), "--json", str(out), "--plot", str(png)]) == 0
    assert "Answer NLL" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert set(saved["evaluation"]) == {"run_full", "run_anchor"} and saved["rope"] == {}
    assert png.stat().st_size > 10_000


def test_summary_refuses_an_empty_directory(tmp_path, capsys):
    assert _summary_module().main([str(tmp_path)]) == 2
    assert "holds no output" in capsys.readouterr().err


def test_script_flags_are_accepted():
    """The script's trainer flags parse (the same check as the example launch scripts)."""
    from tests.training.test_examples import accepted_flags, pretrain_flags

    with open(SCRIPT, encoding="utf-8") as f:
        flags = pretrain_flags(f.read())
    assert "--bf16" in flags and "--attention-variant" in flags
    assert not sorted(set(flags) - accepted_flags())

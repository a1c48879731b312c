"""The CLI end to end on a tiny random checkpoint saved with `checkpoint.save_model`:
--quick with --json and PNGs, --last-checkpoints averaging, one-line errors, and the same
results under torchrun at TP=2 and CP=2 (gloo, --cpu) as at TP=1."""

import json
import os
import sys

import pytest
import torch

from megatron_anchor.testing import fresh_launch_env, run_command

from tests.evaluation.helpers import tiny_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join("tools", "eval_long_context.py")


@pytest.fixture(scope="module")
def tiny_run(megatron_cpu, tmp_path_factory, byte_tokenizer_dir):
    """A run root with two saved iterations (different weights) and the tokenizer."""
    from megatron_anchor import checkpoint
    from megatron_anchor.model import build_model

    root = str(tmp_path_factory.mktemp("tiny_run"))
    cfg = tiny_model_config()
    for iteration, seed in ((10, 1), (20, 2)):
        torch.manual_seed(seed)
        model = build_model(cfg)
        checkpoint.save_model(model, cfg, root, iteration, tokenizer_dir=byte_tokenizer_dir)
    return root


def _run(args, timeout=240, nproc=None):
    command = [sys.executable] + (
        ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
        if nproc else []) + [TOOL, "--cpu", "--no-progress", *args]
    env = fresh_launch_env(OMP_NUM_THREADS="1")
    return run_command(command, timeout, cwd=ROOT, env=env)


# Two tasks, two lengths, two samples: enough to compare layouts sample by sample.
GRID = ["--tasks", "passkey,niah_multikey_2", "--lengths", "512,600", "--samples", "2"]


@pytest.fixture(scope="module")
def tp1_result(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp1") / "tp1.json"
    code, stdout, stderr = _run(["--load", tiny_run, *GRID, "--json", str(out)])
    assert code == 0, stdout + stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_quick_run_writes_table_json_and_plots(tiny_run, tmp_path):
    out, plots = tmp_path / "q.json", tmp_path / "plots"
    code, stdout, stderr = _run(["--load", tiny_run, "--quick", "--last-checkpoints", "2",
                                 "--json", str(out), "--plot-dir", str(plots)])
    assert code == 0, stdout + stderr[-3000:]
    data = json.loads(out.read_text())
    assert [c["label"] for c in data["checkpoints"]] == ["iter_0000010", "iter_0000020"]
    assert data["anchor_token_id"] == 256   # <s> of the byte tokenizer
    assert data["precision"] == "fp32"      # as the checkpoint was saved
    for result in data["results"]:
        (cell,) = result["cells"]
        assert (cell["task"], cell["length"], cell["n"]) == ("passkey", 512, 2)
        assert cell["control_score"] is not None
    (avg,) = data["averaged"]
    assert set(avg["per_checkpoint"]) == {"iter_0000010", "iter_0000020"}
    # Different weights, different arg-max tokens.
    preds = [[s["predicted_ids"] for s in r["samples"]] for r in data["results"]]
    assert preds[0] != preds[1]
    assert "averaged over the last 2 checkpoints" in stdout and "passkey" in stdout
    assert sorted(os.listdir(plots)) == ["accuracy_vs_length.png", "niah_depth_passkey.png"]
    assert all((plots / f).stat().st_size > 1000 for f in os.listdir(plots))


@pytest.mark.slow
def test_bf16_evaluates_an_fp32_checkpoint_in_bf16(tiny_run, tmp_path):
    """--bf16 overrides the checkpoint's precision (checkpoints compared in one precision)."""
    out = tmp_path / "bf16.json"
    code, stdout, stderr = _run(["--load", tiny_run, "--quick", "--bf16", "--no-controls",
                                 "--json", str(out)])
    assert code == 0, stdout + stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["precision"] == "bf16" and ", bf16," in stdout
    assert data["results"][0]["cells"][0]["n"] == 2


def test_bad_input_is_one_line_and_status_2(tiny_run, tmp_path, capsys):
    """In process: every one of these is refused before any process group is touched."""
    from megatron_anchor.cli.eval_long_context import main

    for args, words in ((["--load", tiny_run, "--tasks", "nope"], "unknown task 'nope'"),
                        (["--load", str(tmp_path)], "not a checkpoint"),
                        (["--load", tiny_run, "--last-checkpoints", "3"], "holds 2 complete"),
                        (["--load", tiny_run, "--lengths", "1x"], "--lengths"),
                        (["--load", tiny_run, "--depths", "0.5,2"], "--depths")):
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("megatron-anchor-eval: error:") and words in err, err
        assert len(err.splitlines()) == 1


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"],
                                    ["--context-parallel-size", "2"]], ids=["tp2", "cp2"])
def test_torchrun_layout_matches_tp1(layout, tiny_run, tp1_result, tmp_path):
    out = tmp_path / "par.json"
    code, stdout, stderr = _run(["--load", tiny_run, *GRID, "--json", str(out), *layout],
                                nproc=2)
    assert code == 0, stdout + stderr[-3000:]
    assert stdout.count("wrote ") == 1          # one output, from rank 0
    result = json.loads(out.read_text())["results"][0]
    reference = tp1_result["results"][0]
    key = lambda s: (s["task"], s["length"], s["index"], s["control"])  # noqa: E731
    got = {key(s): (s["predicted_ids"], s["score"]) for s in result["samples"]}
    want = {key(s): (s["predicted_ids"], s["score"]) for s in reference["samples"]}
    assert got == want and len(got) == 16
    assert [c["score"] for c in result["cells"]] == [c["score"] for c in reference["cells"]]

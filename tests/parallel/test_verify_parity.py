"""The parity tool end to end: TP=2, CP=2 and TP=2×CP=2 against TP=1/CP=1 on 4 gloo ranks,
and a deliberately broken CP layout that must make the command exit with status 1."""

import json
import os
import sys

import pytest

from megatron_anchor.testing import run_command, run_on_ranks

pytestmark = pytest.mark.distributed

# A tiny model, and documents whose lengths are not multiples of 2·CP (one-token ones too).
TINY_MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
              "--num-query-groups", "2", "--vocab-size", "256", "--seed", "3"]
ODD_DOCUMENTS = ["--doc-length-dist", "list:7,1,13,30,1,5,22,57,3,9", "--seq-length", "256"]


def _run_tool(rank, world_size, argv):
    from megatron_anchor import runtime
    from megatron_anchor.cli.verify_parity import config_from_argv
    from megatron_anchor.parallel import verify_parity

    try:
        return verify_parity.run(config_from_argv(argv))
    finally:
        runtime.destroy()


@pytest.fixture(scope="module")
def report():
    argv = ["--cpu", "--layouts", "tp1cp1,tp2cp1,tp1cp2,tp2cp2", "--variants", "anchor,full",
            "--dtypes", "fp32,bf16", "--compare-grads", *TINY_MODEL, *ODD_DOCUMENTS]
    return run_on_ranks(_run_tool, 4, argv)[0]


def _rows(report, dtype):
    return [r for r in report["rows"] if r["dtype"] == dtype and not r.get("reference")]


def test_every_layout_matches_tp1cp1_in_fp32(report):
    rows = _rows(report, "fp32")
    assert {(r["variant"], r["layout"]) for r in rows} == {
        (v, l) for v in ("anchor", "full") for l in ("tp2cp1", "tp1cp2", "tp2cp2")}
    for row in rows:
        where = f"{row['variant']} {row['layout']}"
        assert row["passed"], where
        assert row["rel_logit_diff"] <= 1e-5, where     # TP: reduction order only
        assert row["rel_loss_diff"] <= 1e-5, where      # CP-sharded loss = unsharded loss
        assert row["rel_grad_diff"] <= 1e-5, where      # every weight's full gradient
        assert row["rel_grad_norm_diff"] <= 1e-5, where
        assert row["top1_agreement"] == 1.0, where


def test_bf16_layouts_within_bf16_tolerance(report):
    rows = _rows(report, "bf16")
    assert len(rows) == 6
    assert all(r["passed"] and r["rel_logit_diff"] <= 2.5e-2 for r in rows)


def test_the_batch_had_padded_odd_length_segments(report):
    anchor = report["batches"]["anchor"]
    assert anchor["padded_for_cp"] == 2 and anchor["segments"] > 5
    assert report["passed"] is True


def test_tool_exits_1_when_cp_chunks_are_wrong(tmp_path):
    """torchrun, as on a cluster; the hidden debug flag hands each CP rank the wrong chunks."""
    json_path = tmp_path / "parity.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", os.path.join("tools", "verify_parity.py"), "--cpu",
               "--layouts", "tp1cp1,tp1cp2", "--variants", "anchor", "--dtypes", "fp32",
               "--debug-wrong-cp-chunks", "--json", str(json_path), *TINY_MODEL, *ODD_DOCUMENTS]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    returncode, stdout, stderr = run_command(command, 240, cwd=root, env=env)
    assert returncode == 1, stdout + stderr[-3000:]
    assert "FAIL" in stdout and "parity FAILED" in stdout
    result = json.loads(json_path.read_text())
    assert result["passed"] is False
    broken = [r for r in result["rows"] if r["layout"] == "tp1cp2"][0]
    assert broken["rel_logit_diff"] > 1e-2


def _save_then_check_loaded(rank, world_size, root, argv):
    """Save a seeded TP=1 model through the checkpoint module, then run the tool on it and
    on the same seed without it: both must see the same weights (same reference loss).
    With --load the architecture is the checkpoint's: a contradicting flag is refused."""
    import dataclasses

    from megatron.core import parallel_state

    from megatron_anchor import checkpoint, runtime
    from megatron_anchor.cli.verify_parity import config_from_argv
    from megatron_anchor.model import build_model
    from megatron_anchor.parallel import verify_parity

    config = config_from_argv(argv)
    runtime.initialize(1, 1, cpu=True, seed=config.seed)
    runtime.manual_seed(config.seed)  # as the tool seeds its own model
    model = build_model(dataclasses.replace(config.model, bf16=False))
    checkpoint.save_model(model, config.model, root, iteration=7)
    parallel_state.destroy_model_parallel()
    try:
        seeded = verify_parity.run(config)
        without_architecture = argv[:argv.index(TINY_MODEL[0])] + ["--seed", "3"] + \
            argv[argv.index(TINY_MODEL[0]) + len(TINY_MODEL):]
        loaded = verify_parity.run(config_from_argv([*without_architecture, "--load", root]))
        try:
            config_from_argv([*argv, "--load", root, "--num-layers", "1"])
            refused = None
        except checkpoint.CheckpointError as err:
            refused = str(err)
    finally:
        runtime.destroy()
    return seeded, loaded, refused


def test_load_a_checkpoint_into_every_layout(tmp_path):
    argv = ["--cpu", "--layouts", "tp1cp1,tp2cp1", "--variants", "anchor", "--dtypes", "fp32",
            *TINY_MODEL, *ODD_DOCUMENTS]
    seeded, loaded, refused = run_on_ranks(_save_then_check_loaded, 2, str(tmp_path / "ckpt"),
                                           argv)[0]
    assert loaded["passed"] and loaded["model"]["num_layers"] == 2  # the saved architecture
    assert loaded["rows"][0]["loss"] == seeded["rows"][0]["loss"]
    assert loaded["rows"][1]["rel_logit_diff"] <= 1e-5
    assert refused is not None and "--num-layers 1" in refused and "num_layers = 2" in refused

"""The parity tool end to end: TP=2, CP=2 and TP=2×CP=2 against TP=1/CP=1 on 4 gloo ranks,
and a deliberately broken CP layout that must make the command exit with status 1."""

import json
import os
import signal
import subprocess
import sys

import pytest

from megatron_anchor.testing import run_on_ranks

pytestmark = pytest.mark.distributed

# A tiny model, and documents whose lengths are not multiples of 2·CP (one-token ones too).
TINY_MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
              "--num-query-groups", "2", "--vocab-size", "256", "--seed", "3"]
ODD_DOCUMENTS = ["--doc-length-dist", "list:7,1,13,30,1,5,22,57,3,9", "--seq-length", "256"]


def _run_tool(rank, world_size, argv):
    from megatron_anchor.distributed import destroy
    from megatron_anchor.parallel import verify_parity

    try:
        return verify_parity.run(argv)
    finally:
        destroy()


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
    returncode, stdout, stderr = _run_in_own_session(command, root, env, timeout=240)
    assert returncode == 1, stdout + stderr[-3000:]
    assert "FAIL" in stdout and "parity FAILED" in stdout
    result = json.loads(json_path.read_text())
    assert result["passed"] is False
    broken = [r for r in result["rows"] if r["layout"] == "tp1cp2"][0]
    assert broken["rel_logit_diff"] > 1e-2


def _run_in_own_session(command, cwd, env, timeout):
    """Run torchrun; on timeout kill its whole process group (the workers too)."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun timed out after {timeout}s\n{stdout}\n{stderr[-3000:]}")
    return process.returncode, stdout, stderr


def _save_then_check_loaded(rank, world_size, checkpoint_dir, argv):
    """Save a seeded TP=1 model as a Megatron dist checkpoint, then run the tool on it and
    on the same seed without it: both must see the same weights (same reference loss)."""
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_anchor import distributed
    from megatron_anchor.model import build_model
    from megatron_anchor.parallel import verify_parity

    args = verify_parity.parse_args(argv)
    distributed.initialize(1, 1, cpu=True, seed=args.seed)
    distributed.manual_seed(args.seed, cpu=True)  # as the tool seeds its own model
    model = build_model(verify_parity.model_config(args, "fp32"))
    dist_checkpointing.save({"model": model.sharded_state_dict()}, checkpoint_dir)
    if rank == 0:
        with open(os.path.join(checkpoint_dir, verify_parity.MODEL_CONFIG_FILE), "w") as f:
            f.write(args.model.to_json())
    parallel_state.destroy_model_parallel()
    try:
        seeded = verify_parity.run(argv)
        loaded = verify_parity.run([*argv, "--load", checkpoint_dir, "--num-layers", "1"])
    finally:
        distributed.destroy()
    return seeded, loaded


def test_load_a_dist_checkpoint_into_every_layout(tmp_path):
    argv = ["--cpu", "--layouts", "tp1cp1,tp2cp1", "--variants", "anchor", "--dtypes", "fp32",
            *TINY_MODEL, *ODD_DOCUMENTS]
    checkpoint = str(tmp_path / "ckpt")
    os.makedirs(checkpoint)
    seeded, loaded = run_on_ranks(_save_then_check_loaded, 2, checkpoint, argv)[0]
    assert loaded["passed"] and loaded["model"]["num_layers"] == 2  # the saved config won
    assert loaded["rows"][0]["loss"] == seeded["rows"][0]["loss"]
    assert loaded["rows"][1]["rel_logit_diff"] <= 1e-5

"""Runs that survive a cluster (issue 18): each fault as a user meets it, as subprocesses with
a user's command lines (`python -m megatron_anchor.training.pretrain ...`, `torchrun ...`).

The job is `tiny_argv`'s (2 layers, d=64, 256-token windows) for 30 steps, saving every 2;
its uninterrupted run is the reference every resume must match exactly. Faults inside a save
(a full disk, a node lost) are injected by `tests/training/faulty_trainer.py`, which patches
the writer and then runs the trainer's own `main`.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megatron_anchor.testing import fresh_launch_env, run_command
from tests.training.conftest import tiny_argv

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ITERS = 30
PROG = "megatron-anchor-pretrain: error"


def _env():
    return fresh_launch_env(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def flags(corpus, *extra, iters=ITERS):
    return [str(a) for a in tiny_argv(corpus, "--train-iters", str(iters), "--save-interval",
                                      "2", *extra)]


def pretrain(corpus, *extra, **kw):
    return [sys.executable, "-m", "megatron_anchor.training.pretrain", *flags(corpus, *extra, **kw)]


def torchrun(nproc, log_dir, module, *argv):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(nproc), "--log-dir", str(log_dir), "--redirects", "3", "-m", module, *argv]


def faulty(fault, iteration, rank, argv):
    return [sys.executable, "-m", "tests.training.faulty_trainer", fault, str(iteration),
            str(rank), "--", *argv]


def run(command, timeout=420):
    return run_command(command, timeout, cwd=ROOT, env=_env())


def losses(save):
    """iteration -> training loss; a resumed run appends, the last record counts."""
    out = {}
    with open(os.path.join(save, "metrics.jsonl"), encoding="utf-8") as f:
        for record in map(json.loads, f):
            if record["kind"] == "train":
                out[record["iteration"]] = record["loss"]
    return out


def tracker(save):
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        return int(f.read())


def iterations(save):
    from megatron_anchor import checkpoint

    return [i for i, _ in checkpoint.list_iterations(save)]


def one_line_error(stderr, *needles):
    """The user sees one error line (the last), naming what it must, and no traceback."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-4000:]
    assert lines and PROG in lines[-1], stderr[-4000:]
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def worker_logs(log_dir):
    """rank -> (stdout, stderr) of a `torchrun --log-dir --redirects 3` run."""
    out = {}
    for folder, _, names in os.walk(log_dir):
        if "stderr.log" in names:
            rank = int(os.path.basename(folder))
            with open(os.path.join(folder, "stdout.log")) as f1, \
                    open(os.path.join(folder, "stderr.log")) as f2:
                out[rank] = (f1.read(), f2.read())
    return out


def assert_resume_matches(reference, save, after):
    got = losses(save)
    for i in range(after + 1, ITERS + 1):
        assert got[i] == reference[i], (i, got[i], reference[i])


@pytest.fixture(scope="module")
def reference(byte_corpus, tmp_path_factory):
    """The uninterrupted run: losses and its checkpoint root."""
    save = str(tmp_path_factory.mktemp("reference") / "run")
    code, out, err = run(pretrain(byte_corpus, "--save", save))
    assert code == 0, err[-3000:]
    return {"losses": losses(save), "save": save}


# ----------------------------------------------------------------------------------------
# A node lost in the middle of a save
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("moment", ["kill-after-shards", "kill-in-small-files"])
def test_kill_9_during_a_save_then_resume_is_exact(byte_corpus, reference, tmp_path, moment):
    save = str(tmp_path / "run")
    code, out, err = run(faulty(moment, 6, 0, flags(byte_corpus, "--save", save)))
    assert code == -signal.SIGKILL, (code, err[-2000:])
    assert iterations(save) == [2, 4] and tracker(save) == 4  # never the half-written 6
    assert not os.path.exists(os.path.join(save, "iter_0000006"))

    code, out, err = run(pretrain(byte_corpus, "--load", save, "--save", save))
    assert code == 0, err[-3000:]
    assert f"skipping {os.path.join(save, 'iter_0000006')}" in out, out
    assert "iterations       4 -> 30" in out
    assert_resume_matches(reference["losses"], save, 4)
    assert iterations(save) == list(range(2, ITERS + 1, 2))
    assert not [n for n in os.listdir(save) if n.endswith(".incomplete")]


# ----------------------------------------------------------------------------------------
# Preemption and time limits
# ----------------------------------------------------------------------------------------

def _wait_for_iteration(save, process, iteration, timeout=300):
    deadline = time.monotonic() + timeout
    path = os.path.join(save, "metrics.jsonl")
    while time.monotonic() < deadline and process.poll() is None:
        if os.path.isfile(path):
            with open(path) as f:
                if sum('"train"' in line for line in f) >= iteration:
                    return
        time.sleep(0.002)
    raise AssertionError(f"the run never logged iteration {iteration}")


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _rank_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    return int(env.get(b"RANK", b"-1"))


def _start(command):
    return subprocess.Popen(command, cwd=ROOT, env=_env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def _finish(process, timeout=300):
    """Wait for the trainer, then end what it leaves (a trainer killed by a signal leaves
    dist_checkpointing's manager process holding the pipes); its output."""
    try:
        process.wait(timeout=timeout)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return process.communicate()


def test_sigterm_saves_the_current_iteration_and_resume_is_exact(byte_corpus, reference,
                                                                 tmp_path):
    save = str(tmp_path / "run")
    process = _start(pretrain(byte_corpus, "--save", save, "--exit-signal-handler"))
    _wait_for_iteration(save, process, 3)
    process.send_signal(signal.SIGTERM)
    out, err = _finish(process)
    assert process.returncode == 0, err[-3000:]
    stopped = tracker(save)
    assert 3 <= stopped < ITERS and iterations(save)[-1] == stopped
    assert max(losses(save)) == stopped  # the iteration in progress finished, no more
    assert (f"stopped after iteration {stopped}: received SIGTERM (--exit-signal-handler); "
            f"saved {os.path.join(save, f'iter_{stopped:07d}')}: resume with --load {save}") \
        in out

    code, out, err = run(pretrain(byte_corpus, "--load", save, "--save", save))
    assert code == 0, err[-3000:]
    assert_resume_matches(reference["losses"], save, stopped)


@pytest.mark.distributed
def test_sigterm_to_one_rank_stops_every_rank_after_the_same_iteration(byte_corpus, tmp_path):
    """DP=2 under torchrun; the signal reaches rank 1 only (a scheduler signals the ranks
    one by one): both ranks agree, the iteration is saved, torchrun exits 0, and the resume
    gives the losses of an uninterrupted DP=2 run."""
    module = "megatron_anchor.training.pretrain"
    full = str(tmp_path / "full")
    code, out, err = run(torchrun(2, tmp_path / "logs_full", module,
                                  *flags(byte_corpus, "--save", full)))
    assert code == 0, err[-3000:]
    save = str(tmp_path / "run")
    process = _start(torchrun(2, tmp_path / "logs", module,
                              *flags(byte_corpus, "--save", save, "--exit-signal-handler")))
    _wait_for_iteration(save, process, 3)
    (rank1,) = [pid for pid in _children(process.pid) if _rank_of(pid) == 1]
    os.kill(rank1, signal.SIGTERM)
    out, err = _finish(process)
    assert process.returncode == 0, err[-3000:]
    stopped = tracker(save)
    assert 3 <= stopped < ITERS and max(losses(save)) == stopped
    logs = worker_logs(tmp_path / "logs")
    assert f"stopped after iteration {stopped}: received SIGTERM" in logs[0][0]
    with open(os.path.join(save, f"iter_{stopped:07d}", "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["world_size"] == 2 and "rng/rank_00001.pt" in manifest["files"]

    code, out, err = run(torchrun(2, tmp_path / "logs_resume", module,
                                  *flags(byte_corpus, "--load", save, "--save", save)))
    assert code == 0, err[-3000:]
    reference = losses(full)
    got = losses(save)
    assert [got[i] for i in range(stopped + 1, ITERS + 1)] == \
        [reference[i] for i in range(stopped + 1, ITERS + 1)]


def test_exit_duration_saves_and_resume_is_exact(byte_corpus, reference, tmp_path):
    save = str(tmp_path / "run")
    code, out, err = run(pretrain(byte_corpus, "--save", save, "--exit-interval", "5"))
    assert code == 0 and tracker(save) == 5, err[-3000:]
    # 0.01 min is over before the first step ends (the imports and set-up alone take
    # longer): the run stops after one iteration.
    code, out, err = run(pretrain(byte_corpus, "--load", save, "--save", save,
                                  "--exit-duration-in-mins", "0.01"))
    assert code == 0, err[-3000:]
    assert tracker(save) == 6 and max(losses(save)) == 6
    assert "stopped after iteration 6: --exit-duration-in-mins 0.01 reached" in out, out
    code, out, err = run(pretrain(byte_corpus, "--load", save, "--save", save))
    assert code == 0, err[-3000:]
    assert_resume_matches(reference["losses"], save, 6)


# ----------------------------------------------------------------------------------------
# Damaged checkpoints
# ----------------------------------------------------------------------------------------

def _truncate(path):
    shard = os.path.join(path, "__0_0.distcp")
    os.truncate(shard, os.path.getsize(shard) // 2)
    return "__0_0.distcp is truncated"


def _no_metadata(path):
    os.remove(os.path.join(path, ".metadata"))
    return ".metadata is missing"


@pytest.mark.parametrize("damage", [_truncate, _no_metadata], ids=["truncated", "no-metadata"])
def test_damaged_checkpoint_is_one_line_and_ckpt_step_resumes(byte_corpus, reference,
                                                              tmp_path, damage):
    save = str(tmp_path / "run")
    shutil.copytree(reference["save"], save)
    newest = os.path.join(save, f"iter_{ITERS:07d}")
    what = damage(newest)
    code, out, err = run(pretrain(byte_corpus, "--load", save, "--save", save))
    assert code == 2
    one_line_error(err, newest, what, "older complete iterations", "28 and 9 earlier",
                   "--ckpt-step")
    code, out, err = run(pretrain(byte_corpus, "--load", save, "--save", save,
                                  "--ckpt-step", str(ITERS - 2)))
    assert code == 0, err[-3000:]
    assert_resume_matches(reference["losses"], save, ITERS - 2)
    assert tracker(save) == ITERS and iterations(save)[-1] == ITERS  # saved again, whole


def _tool_commands(root, data):
    tools = os.path.join(ROOT, "tools")
    return {
        "eval": [sys.executable, f"{tools}/eval_long_context.py", "--cpu", "--load", root,
                 "--quick", "--no-progress"],
        "rope": [sys.executable, f"{tools}/rope_precision.py", "--load", root, "--data-path",
                 data, "--quick", "--no-progress", "--output-dir", os.path.join(root, "rope")],
        "export": [sys.executable, f"{tools}/convert_checkpoint.py", "export", "--load", root,
                   "--output", os.path.join(os.path.dirname(root), "hf")],
        "parity": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", "2", "--log-dir", os.path.join(root, "logs"),
                   "--redirects", "3", f"{tools}/verify_parity.py", "--cpu", "--load",
                   root, "--layouts", "tp1cp1,tp2cp1", "--variants", "anchor", "--dtypes",
                   "fp32", "--data-path", data, "--seq-length", "256"],
        "pretrain --pretrained-checkpoint": [
            sys.executable, "-m", "megatron_anchor.training.pretrain",
            *tiny_argv(data, "--train-iters", "2"), "--pretrained-checkpoint", root],
    }


@pytest.fixture(scope="module")
def tokenized_checkpoint(megatron_cpu, tmp_path_factory):
    """A weights-only checkpoint with a tokenizer, as the importer writes one."""
    from megatron_anchor import checkpoint
    from megatron_anchor.model import build_model
    from tests.evaluation.helpers import tiny_model_config, write_byte_tokenizer

    work = tmp_path_factory.mktemp("tools")
    tokenizer = write_byte_tokenizer(work / "tokenizer")
    cfg = tiny_model_config(vocab_size=384)
    root = str(work / "ckpt")
    for iteration in (10, 20):
        checkpoint.save_model(build_model(cfg), cfg, root, iteration, tokenizer_dir=tokenizer)
    return root


@pytest.mark.distributed
@pytest.mark.parametrize("tool", ["eval", "rope", "export", "parity",
                                  "pretrain --pretrained-checkpoint"])
def test_every_tool_says_one_line_on_a_damaged_checkpoint(tool, tokenized_checkpoint,
                                                          byte_corpus, tmp_path):
    root = str(tmp_path / "ckpt")
    shutil.copytree(tokenized_checkpoint, root)
    newest = os.path.join(root, "iter_0000020")
    _truncate(newest)
    code, out, err = run(_tool_commands(root, byte_corpus)[tool])
    assert code != 0
    if tool == "parity":  # what each rank printed (torchrun then reports the exit its way)
        logs = worker_logs(os.path.join(root, "logs"))
        err = "".join(e for _, e in logs.values())
        assert logs[0][1].strip(), "rank 0 says it"
    lines = [line for line in err.strip().splitlines() if ": error" in line]
    assert lines and "Traceback" not in err, err[-4000:]
    for line in lines:
        assert f"{newest}: __0_0.distcp is truncated" in line and \
            "older complete iterations" in line and "10" in line, line


# ----------------------------------------------------------------------------------------
# Divergence
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", [[], ["--bf16"]], ids=["fp32", "bf16"])
def test_divergence_stops_before_any_non_finite_checkpoint(byte_corpus, tmp_path, megatron_cpu,
                                                           precision):
    import torch

    from megatron_anchor import checkpoint

    save = str(tmp_path / "run")
    code, out, err = run(pretrain(byte_corpus, "--save", save, "--lr", "1e4", "--clip-grad",
                                  "0", *precision))
    assert code == 2, (code, err[-3000:])
    line = one_line_error(err, "stopped before saving anything", "rank(s) 0")
    stopped = int(line.split("iteration ")[1].split(":")[0])
    assert stopped < ITERS and max(losses(save)) == stopped
    record = [r for r in map(json.loads, open(os.path.join(save, "metrics.jsonl")))
              if r["kind"] == "train" and r["iteration"] == stopped][0]
    assert not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]))
    saved = iterations(save)
    assert saved and saved[-1] < stopped and tracker(save) == saved[-1]
    assert f"the newest good checkpoint is {os.path.join(save, f'iter_{saved[-1]:07d}')}" in line
    for _, path in checkpoint.list_iterations(save):
        model = checkpoint.open(path).load_model()
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), path


# ----------------------------------------------------------------------------------------
# Saves that fail
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [[], ["--async-save"]], ids=["sync", "async"])
def test_a_full_disk_is_one_line_and_loses_nothing(byte_corpus, reference, tmp_path, mode):
    save = str(tmp_path / "run")
    code, out, err = run(faulty("enospc-shards", 6, 0, flags(byte_corpus, "--save", save,
                                                             *mode)))
    assert code == 2, (code, err[-3000:])
    one_line_error(err, f"cannot save iteration 6 to {save}",
                   "[Errno 28] No space left on device",
                   f"the newest complete checkpoint is still {os.path.join(save, 'iter_0000004')}")
    assert tracker(save) == 4 and iterations(save) == [2, 4]
    assert sorted(n for n in os.listdir(save) if n.startswith("iter_")) == \
        ["iter_0000002", "iter_0000004"]  # the partial iteration is gone
    code, out, err = run(pretrain(byte_corpus, "--load", save, "--save", save, *mode))
    assert code == 0, err[-3000:]
    assert_resume_matches(reference["losses"], save, 4)


@pytest.mark.distributed
@pytest.mark.parametrize("fault,rank", [("enospc-shards", 1), ("enospc-common", 0)],
                         ids=["rank1-writer", "rank0-common-inside-dist-checkpointing"])
def test_a_save_failing_on_one_rank_ends_every_rank_with_one_line(byte_corpus, tmp_path,
                                                                  fault, rank):
    """TP=2: the failing rank's error reaches every rank; none hangs, even when rank 0 fails
    alone inside dist_checkpointing while rank 1 waits in its next collective."""
    save = str(tmp_path / "run")
    started = time.monotonic()
    # TP=2: each rank writes shards of its own (under DP, rank 0 writes every replica).
    code, out, err = run(torchrun(2, tmp_path / "logs", "tests.training.faulty_trainer",
                                  fault, "6", str(rank), "--",
                                  *flags(byte_corpus, "--save", save,
                                         "--tensor-model-parallel-size", "2")), timeout=300)
    assert code != 0 and time.monotonic() - started < 240
    logs = worker_logs(tmp_path / "logs")
    assert set(logs) == {0, 1}
    said = 0
    for r, (_, stderr) in logs.items():
        assert "Traceback" not in stderr, (r, stderr[-3000:])
        # A rank stopped by torchrun after another one said it may say nothing; Megatron's
        # writer logs its own error line beside ours. A rank the watcher ends says
        # "megatron-anchor: error (rank r): ...".
        for line in [line for line in stderr.splitlines() if ": error" in line]:
            said += 1
            assert f"cannot save iteration 6 to {save}" in line, (r, line)
            assert "[Errno 28] No space left on device" in line and f"(rank {rank})" in line
            assert "the newest complete checkpoint is still" in line
    assert said >= 1 and "cannot save iteration 6" in logs[0][1], "rank 0 says it"
    assert tracker(save) == 4 and iterations(save) == [2, 4]


# ----------------------------------------------------------------------------------------
# Retention, model-only saves, asynchronous saves
# ----------------------------------------------------------------------------------------

def test_retention_keeps_exactly_what_the_rule_says(byte_corpus, tmp_path):
    from megatron_anchor import checkpoint

    save = str(tmp_path / "run")
    code, out, err = run(pretrain(byte_corpus, "--save", save, "--keep-last-checkpoints", "3",
                                  "--save-retain-interval", "8"))
    assert code == 0, err[-3000:]
    # The newest 3, and every multiple of 8.
    assert iterations(save) == [8, 16, 24, 26, 28, 30]
    assert sorted(n for n in os.listdir(save) if n.startswith("iter_")) == \
        [f"iter_{i:07d}" for i in (8, 16, 24, 26, 28, 30)]
    assert [c.iteration for c in checkpoint.last(save, 3)] == [26, 28, 30]
    assert "retention: deleted iter_0000002" in out


def test_model_only_saves_and_what_load_does_with_them(byte_corpus, tmp_path):
    full, lean = str(tmp_path / "full"), str(tmp_path / "lean")
    assert run(pretrain(byte_corpus, "--save", full, iters=4))[0] == 0
    code, out, err = run(pretrain(byte_corpus, "--save", lean, "--no-save-optim", "--no-save-rng",
                                  iters=4))
    assert code == 0, err[-3000:]
    with open(os.path.join(lean, "iter_0000004", "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["contents"] == ["model", "scheduler"]
    assert not any(name.startswith("rng/") for name in manifest["files"])
    assert sum(manifest["files"].values()) < 0.5 * sum(
        json.load(open(os.path.join(full, "iter_0000004", "manifest.json")))["files"].values())
    code, out, err = run(pretrain(byte_corpus, "--load", lean, "--save", lean, iters=6))
    assert code == 2
    one_line_error(err, "saved without optimizer state (--no-save-optim)", "--no-load-optim")
    code, out, err = run(pretrain(byte_corpus, "--load", lean, "--save", lean, "--no-load-optim",
                                  iters=6))
    assert code == 0, err[-3000:]
    assert "iterations       4 -> 6" in out and "with a fresh optimizer" in out


def test_async_checkpoints_hold_their_iteration(byte_corpus, reference, tmp_path):
    """The shards are written by a forked process while training goes on: each checkpoint
    must hold the weights of its own iteration (resume from one mid-run is exact), and be
    complete only once written."""
    save = str(tmp_path / "run")
    code, out, err = run(pretrain(byte_corpus, "--save", save, "--async-save"))
    assert code == 0, err[-3000:]
    assert "in the background" in out
    assert losses(save) == reference["losses"]
    assert iterations(save) == list(range(2, ITERS + 1, 2)) and tracker(save) == ITERS
    code, out, err = run(pretrain(byte_corpus, "--load", save, "--save", save,
                                  "--ckpt-step", "12"))
    assert code == 0, err[-3000:]
    assert_resume_matches(reference["losses"], save, 12)


def test_a_non_finite_validation_loss_stops_before_saving(megatron_cpu, byte_corpus, tmp_path,
                                                          monkeypatch, capsys):
    """In process: a validation loss that turns NaN (here by hand, at iteration 4) stops the
    run before that iteration's save, in one line."""
    from megatron_anchor.training import train as train_module
    from megatron_anchor.training.pretrain import main

    evaluate, calls = train_module.evaluate, []

    def nan_the_second_time(*args, **kwargs):
        result, local_finite = evaluate(*args, **kwargs)
        calls.append(1)
        return ({**result, "all": float("nan")}, False) if len(calls) == 2 else \
            (result, local_finite)

    monkeypatch.setattr(train_module, "evaluate", nan_the_second_time)
    save = str(tmp_path / "run")
    assert main(flags(byte_corpus, "--save", save, "--eval-interval", "2", "--eval-iters", "1",
                      iters=8)) == 2
    line = one_line_error(capsys.readouterr().err,
                          "iteration 4: the validation loss (all) is nan on rank(s) 0",
                          f"the newest good checkpoint is {os.path.join(save, 'iter_0000002')}")
    assert "stopped before saving anything" in line
    assert iterations(save) == [2] and tracker(save) == 2


def test_the_weights_are_checked_before_every_save(megatron_cpu, byte_corpus):
    """The last line of defence: a non-finite weight (whatever put it there) stops the save."""
    import torch

    from megatron_anchor.training import data
    from megatron_anchor.training.arguments import config_from_args, parse_args
    from megatron_anchor.training.model_setup import build_training_components
    from megatron_anchor.training.stopping import TrainingDiverged
    from megatron_anchor.training.train import NonFiniteGuard

    cfg = config_from_args(parse_args(tiny_argv(byte_corpus)))
    data.resolve_tokens(cfg, data.load_tokenizer(cfg))
    components = build_training_components(cfg.validate())
    guard = NonFiniteGuard(lambda: "ck/iter_0000002", "ck")
    guard.check_weights(3, components)  # finite: nothing happens
    weight = list(components.module.parameters())[-1].view(-1)
    for value in (float("inf"), float("-inf"), float("nan")):
        kept = float(weight[5])
        with torch.no_grad():
            weight[5] = value
        with pytest.raises(TrainingDiverged, match=r"iteration 3: a weight is non-finite on "
                           r"rank\(s\) 0 .*the newest good checkpoint is ck/iter_0000002 "
                           r"\(--load ck"):
            guard.check_weights(3, components)
        with torch.no_grad():
            weight[5] = kept

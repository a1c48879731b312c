"""The benchmark scripts run as a user runs them (subprocesses, tiny shapes): the one-shot
GPU check's CPU smoke mode above all, since the GPU run gets no second try."""

import json
import os
import sys

import pytest

from megatron_anchor.testing import fresh_launch_env, run_command

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks")


def run(script, *args, timeout=300):
    env = fresh_launch_env(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    code, out, err = run_command([sys.executable, os.path.join(BENCH, script), *args],
                                 timeout=timeout, cwd=ROOT, env=env)
    assert code == 0, f"{script} exited {code}\n{out[-3000:]}\n{err[-3000:]}"
    return out


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_stage_and_says_what_it_skipped(tmp_path):
    result = tmp_path / "gpu_check.json"
    out = run("gpu_check.py", "--smoke", "--json", str(result), "--budget", "400",
              "--te-smoke", str(tmp_path / "absent_te_smoke.py"), timeout=600)
    doc = json.loads(result.read_text())
    stages = doc["stages"]
    assert list(stages) == ["env", "ceilings", "exactness", "attention", "train", "pretrain"]
    assert doc["unfinished"] == [], {n: s.get("error", "")[-800:] for n, s in stages.items()}
    assert "did not finish: none" in out
    # TE is dropped with its FAIL line; what needs CUDA is skipped and says so.
    assert doc["te_loaded"] is False and doc["te_dropped"].startswith("TE_SMOKE FAIL")
    assert stages["attention"]["result"]["varlen"]["skipped"].startswith("needs CUDA")
    assert stages["pretrain"]["status"] == "skipped"
    exact = stages["exactness"]["result"]
    assert exact["passed"] and exact["failures"] == []
    backends = {r["backend"] for r in exact["results"]}
    assert "local" in backends and any(b.startswith("varlen (dense FP64 stand-in") for b in backends)
    assert {r["cp"] for r in exact["results"]} == {1, 2}
    assert {r["case"] for r in exact["results"]} >= {"one-token docs", "lengths 64 mod 128",
                                                    "doc filling the window",
                                                    "doc cut by the window"}
    runs = stages["train"]["result"]["runs"]
    assert [(r["backend"], r["variant"]) for r in runs] == [("local", "full"), ("local", "anchor")]
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in runs)
    rows = stages["attention"]["result"]["rows"]
    assert [r["seq_length"] for r in rows] == [256, 512]


def test_gpu_check_header_says_how_to_run_it_on_the_device():
    with open(os.path.join(BENCH, "gpu_check.py")) as f:
        header = f.read(3000)
    assert "mkdir -p .whl && cp -r ../shared/gpu/. .whl/" in header
    assert 'bash benchmarks/gpu_check.sh        carry: [".whl"]' in header
    with open(os.path.join(BENCH, "gpu_check.sh")) as f:
        script = f.read()
    # TE's wheels go into one pip --target command (shared/gpu/README.md).
    install = [line for line in script.splitlines() if line.lstrip().startswith("python3 -m pip install")]
    assert len(install) == 1 and "--target /tmp/site" in install[0]
    assert "$G/te/*.whl $G/pydantic/*.whl" in script and "megatron_core-0.19.2" in script
    assert "PYTHONPATH=/tmp/site:$PWD" in script and "NVTE_FRAMEWORK=pytorch" in script


def test_attention_benchmark_runs_on_tiny_windows(tmp_path):
    result = tmp_path / "attention.json"
    run("attention.py", "--seq-lengths", "256", "--repeats", "1", "--no-memory",
        "--mean-doc-length", "40", "--head-dim", "16", "--json", str(result))
    row = json.loads(result.read_text())["rows"][0]["backends"]["local"]
    assert row["anchor"]["ratio"] > 0 and row["naive"]["seconds"] > 0
    assert json.loads(result.read_text())["planned_once"] is True


def test_peer_benchmark_checks_the_two_losses_agree(tmp_path):
    result = tmp_path / "peer.json"
    pytest.importorskip("transformers")
    run("peer_hf.py", "--seq-lengths", "2048", "--steps", "1", "--warmup", "0",
        "--hidden-size", "64", "--vocab", "256", "--json", str(result))
    row = json.loads(result.read_text())["rows"][0]
    assert row["segments"] > 1  # the anchor mask differs from plain causal attention
    assert row["loss_check"]["relative_difference"] < 1e-5
    assert row["ours"]["step_s"] > 0 and row["peer"]["step_s"] > 0


def test_train_step_benchmark_bf16_one_model_at_a_time():
    out = run("train_step.py", "--seq-lengths", "256", "--steps", "1", "--warmup", "0",
              "--hidden-size", "64", "--vocab", "256", "--bf16", "--variants", "full", "anchor",
              "--json")
    doc = json.loads(out[out.index("{"):])
    assert doc["bf16"] is True
    row = doc["rows"][0]
    assert row["anchor"]["tokens_per_s"] > 0 and "saving_vs_full" in row["anchor"]

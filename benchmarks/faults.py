"""The fault table of issue 18, as a user meets it: tiny CPU runs, one fault each.

    PYTHONPATH=<checkout> python benchmarks/faults.py --workdir /tmp/faults [--only NAME ...]

Runs whatever code PYTHONPATH points at (so the same script measures a checkout from
before the fix): every fault is a subprocess with a user's command line (the trainer, or a
tool), and the table says what the user sees: exit status, the last line on stderr, whether
a Python traceback reached them, which checkpoints exist afterwards and whether a resume
gives the losses of an uninterrupted run. Flags the trainer does not know are dropped (and
said so), so that "before" shows what happens without them.

The job: 2 layers, d=64, 256-token windows, 4 windows a step, 24 steps, --save-interval 2,
a byte-level BPE tokenizer (vocabulary 512) trained on the sample corpus made on the spot.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable


def env():
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def run(cmd, timeout=600, cwd=None):
    """(returncode, stdout, stderr, seconds); the whole process group is killed on timeout."""
    started = time.time()
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env(), cwd=cwd, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return "timeout", out, err, time.time() - started
    return p.returncode, out, err, time.time() - started


def start(cmd, cwd=None):
    return subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), cwd=cwd,
                            start_new_session=True)


class Job:
    def __init__(self, work):
        self.work = work
        self.data = os.path.join(work, "corpus_text_document")
        self.tokenizer = os.path.join(work, "tokenizer.json")
        if not os.path.isfile(self.data + ".idx"):
            self._build()
        help_text = run([PY, "-m", "megatron_anchor.training.pretrain", "--help"])[1]
        self.known = {tok.rstrip(",") for tok in help_text.split() if tok.startswith("--")}
        self.dropped = set()

    def _build(self):
        os.makedirs(self.work, exist_ok=True)
        corpus = os.path.join(self.work, "corpus.jsonl")
        for cmd in ([PY, f"{ROOT}/tools/build_sample_corpus.py", "--output", corpus,
                     "--max-bytes", "400000", "--max-document-bytes", "16384"],
                    [PY, f"{ROOT}/tools/train_tokenizer.py", "--input", corpus,
                     "--vocab-size", "512", "--output", self.tokenizer],
                    [PY, f"{ROOT}/tools/preprocess_data.py", "--input", corpus,
                     "--output-prefix", os.path.join(self.work, "corpus"), "--json-keys", "text",
                     "--domain-key", "meta.source", "--tokenizer-type", "HuggingFaceTokenizer",
                     "--tokenizer-model", self.tokenizer, "--append-eod", "--workers", "1"]):
            code, out, err, _ = run(cmd)
            assert code == 0, (cmd, out, err)

    def flags(self, *extra, iters=24):
        argv = ["--cpu", "--data-path", self.data, "--tokenizer-type", "HuggingFaceTokenizer",
                "--tokenizer-model", self.tokenizer, "--split", "95,5,0", "--seq-length", "256",
                "--micro-batch-size", "2", "--global-batch-size", "4", "--num-layers", "2",
                "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
                "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "1",
                "--no-progress-bar", "--train-iters", str(iters), "--save-interval", "2",
                *map(str, extra)]
        out, skip = [], False
        for i, a in enumerate(argv):
            if skip:
                skip = False
                continue
            if a.startswith("--") and a not in self.known:
                self.dropped.add(a)
                takes_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
                skip = takes_value
                continue
            out.append(a)
        return out

    def pretrain(self, *extra, iters=24):
        return [PY, "-m", "megatron_anchor.training.pretrain", *self.flags(*extra, iters=iters)]

    def torchrun(self, nproc, *extra, iters=24):
        return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                "-m", "megatron_anchor.training.pretrain", *self.flags(*extra, iters=iters)]


# ----------------------------------------------------------------------------------------
# What the user sees
# ----------------------------------------------------------------------------------------

def last_line(err):
    lines = [l for l in err.strip().splitlines() if l.strip() and "Warning" not in l
             and not l.startswith(("  warnings.warn", "W1", "I1"))]
    return lines[-1].strip() if lines else ""


def traceback_in(text):
    return "Traceback (most recent call last)" in text


def losses(save, kind="train"):
    """iteration -> loss (the last record of each iteration: a resume appends)."""
    out = {}
    path = os.path.join(save, "metrics.jsonl")
    if not os.path.isfile(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["kind"] == kind:
                out[r["iteration"]] = r["loss"]
    return out


def listing(save):
    if not os.path.isdir(save):
        return "-"
    names = sorted(n for n in os.listdir(save) if n.startswith("iter_"))
    tracker = os.path.join(save, "latest_checkpointed_iteration.txt")
    t = open(tracker).read().strip() if os.path.isfile(tracker) else "none"
    short = [n.replace("iter_000", "") for n in names]
    return f"tracker {t}; dirs {', '.join(short) or 'none'}"


def complete_by_code(save):
    code = ("import sys; from megatron_anchor import checkpoint; "
            "print([i for i, _ in checkpoint.list_iterations(sys.argv[1])])")
    return run([PY, "-c", code, save])[1].strip()


def same_as(reference, got, iterations):
    diffs = [abs(reference[i] - got[i]) for i in iterations if i in reference and i in got]
    if len(diffs) != len(iterations):
        return f"missing losses ({len(diffs)}/{len(iterations)})"
    return "equal" if max(diffs) == 0 else f"differ (max {max(diffs):.2e})"


def wait_for(predicate, proc, timeout=300, interval=0.001):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(interval)
    return False


def reached(save, iteration):
    def check():
        got = losses(save)
        return bool(got) and max(got) >= iteration
    return check


# ----------------------------------------------------------------------------------------
# The faults
# ----------------------------------------------------------------------------------------

def reference(job):
    save = os.path.join(job.work, "ref")
    if not os.path.isfile(os.path.join(save, "latest_checkpointed_iteration.txt")):
        shutil.rmtree(save, ignore_errors=True)
        code, out, err, _ = run(job.pretrain("--save", save))
        assert code == 0, err[-3000:]
    return save, losses(save)


def fresh(job, name):
    path = os.path.join(job.work, name)
    shutil.rmtree(path, ignore_errors=True)
    return path


def resume(job, save, ref, *extra):
    code, out, err, _ = run(job.pretrain("--load", save, "--save", save, *extra))
    got = losses(save)
    said = [l for l in (out + err).splitlines() if "--load" in l and ("skipping" in l or
                                                                      "points at" in l)]
    start = next((l.split("iterations")[1].split("->")[0].strip() for l in out.splitlines()
                  if l.strip().startswith("iterations")), "?")
    first = int(start) + 1 if start.isdigit() else None
    same = same_as(ref, got, list(range(first, 25))) if first else "no run"
    return (f"resume: exit {code}, from iteration {start}, losses {first}-24 {same}"
            + (f"; said: \"{said[0].strip()}\"" if said else "")
            + (f"; stderr: {last_line(err)}" if code != 0 else ""))


def kill9_during_save(job, ref):
    save = fresh(job, "kill9")
    p = start(job.pretrain("--save", save))
    hit = wait_for(lambda: os.path.isdir(save) and any(n.startswith("iter_0000010")
                                                       for n in os.listdir(save)), p)
    # The whole process group, as a node failure takes it: dist_checkpointing's helper
    # processes (its results-queue manager) too.
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate()
    left = sorted(n for n in os.listdir(save) if n.startswith("iter_0000010"))
    return [f"killed during the save of iteration 10 ({'seen' if hit else 'NOT seen'}; left "
            f"{', '.join(left)}); list_iterations {complete_by_code(save)}",
            resume(job, save, ref)]


def sigterm(job, ref, nproc=1):
    save = fresh(job, f"sigterm{nproc}")
    cmd = (job.pretrain if nproc == 1 else lambda *a: job.torchrun(nproc, *a))(
        "--save", save, "--exit-signal-handler")
    p = start(cmd)
    wait_for(reached(save, 10), p, interval=0.002)
    targets = [p.pid]
    if nproc > 1:  # the workers, as a scheduler signals every process of the step; rank 1 only
        targets = [int(c) for c in open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()]
        targets = [t for t in targets if "RANK=1\x00" in open(f"/proc/{t}/environ").read()]
    seen = max(losses(save))
    for t in targets:
        os.kill(t, signal.SIGTERM)
    try:
        p.wait(timeout=300)
    finally:  # a trainer killed by the signal leaves dist_checkpointing's manager behind
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    out, err = p.communicate()
    stop = [l for l in out.splitlines() if l.startswith("stopped after")]
    lines = [f"SIGTERM {'to rank 1 only ' if nproc > 1 else ''}after iteration {seen} was "
             f"logged: exit {p.returncode}; {listing(save)}"
             + (f"; log: \"{stop[0]}\"" if stop else "")]
    if p.returncode == 0:
        ref_n = ref if nproc == 1 else reference_dp(job, nproc)
        code, out, err, _ = run((job.pretrain if nproc == 1 else
                                 lambda *a: job.torchrun(nproc, *a))("--load", save, "--save", save))
        got = losses(save)
        first = max(i for i in got if i <= seen + 1)
        lines.append(f"resume: exit {code}; losses after the stop "
                     f"{same_as(ref_n, got, [i for i in range(seen + 1, 25)])}")
    return lines


def reference_dp(job, nproc):
    save = os.path.join(job.work, f"ref_dp{nproc}")
    if not os.path.isfile(os.path.join(save, "latest_checkpointed_iteration.txt")):
        shutil.rmtree(save, ignore_errors=True)
        code, out, err, _ = run(job.torchrun(nproc, "--save", save))
        assert code == 0, err[-3000:]
    return losses(save)


def exit_duration(job, ref):
    save = fresh(job, "duration")
    code, out, err, secs = run(job.pretrain("--save", save, "--exit-duration-in-mins", "0.15",
                                            iters=3000))
    stop = [l for l in out.splitlines() if l.startswith("stopped after")]
    got = losses(save)
    return [f"--exit-duration-in-mins 0.15, --train-iters 3000: exit {code} after {secs:.0f} s, "
            f"{max(got) if got else 0} iterations; tracker "
            f"{open(os.path.join(save, 'latest_checkpointed_iteration.txt')).read().strip() if os.path.isfile(os.path.join(save, 'latest_checkpointed_iteration.txt')) else 'none'}"
            + (f"; log: \"{stop[0]}\"" if stop else f"; stderr: {last_line(err)}")]


def damaged(job, ref, name, damage):
    save = fresh(job, name)
    shutil.copytree(reference(job)[0], save)
    what = damage(os.path.join(save, "iter_0000024"))
    code, out, err, _ = run(job.pretrain("--load", save, "--save", save))
    line = [f"{what}, then --load: exit {code}; traceback {'YES' if traceback_in(err) else 'no'}"
            f"; stderr: {last_line(err)[:400]}"]
    code, out, err, _ = run(job.pretrain("--load", save, "--save", save, "--ckpt-step", "22"))
    line.append(f"--ckpt-step 22: exit {code}; losses 23-24 "
                f"{same_as(ref, losses(save), [23, 24])}")
    return line


def truncate_shard(d):
    shard = os.path.join(d, "__0_0.distcp")
    size = os.path.getsize(shard)
    os.truncate(shard, size // 2)
    return f"__0_0.distcp of iteration 24 cut to {size // 2} of {size} bytes"


def remove_metadata(d):
    os.remove(os.path.join(d, ".metadata"))
    return "iteration 24's .metadata (dist_checkpointing's index) removed"


def bad_json(d):
    with open(os.path.join(d, "train_state.json"), "w") as f:
        f.write('{"consumed_windows": 9')
    return "iteration 24's train_state.json cut mid-way"


def divergence(job, ref, *extra):
    save = fresh(job, "diverge" + "".join(extra).replace("-", ""))
    code, out, err, _ = run(job.pretrain("--save", save, "--lr", "1e4", "--clip-grad", "0",
                                         *extra))
    got = losses(save)
    metrics = []
    path = os.path.join(save, "metrics.jsonl")
    if os.path.isfile(path):
        metrics = [json.loads(l) for l in open(path) if '"train"' in l]
    import math
    first_bad = next((m["iteration"] for m in metrics
                      if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]))), None)
    check = ("import sys, math, torch\nfrom megatron_anchor import checkpoint\n"
             "bad = []\nfor i, p in checkpoint.list_iterations(sys.argv[1]):\n"
             "    m = checkpoint.open(p).load_model(tp=1, cp=1)\n"
             "    if not all(bool(torch.isfinite(t).all()) for t in m.parameters()):\n"
             "        bad.append(i)\nprint(bad)\n")
    bad = run([PY, "-c", check, save])[1].strip().splitlines()
    return [f"--lr 1e4 --clip-grad 0{' ' + ' '.join(extra) if extra else ''}: exit {code}; "
            f"first non-finite loss or grad norm at iteration {first_bad}; "
            f"{len(got)} iterations run; {listing(save)}; checkpoints with non-finite weights: "
            f"{bad[-1] if bad else '?'}; stderr: {last_line(err)[:300]}"]


ENOSPC_WRAPPER = textwrap.dedent('''\
    """Runs the trainer with dist_checkpointing's writer failing with ENOSPC from iteration
    10 on (rank RANKS): a full disk, as the writer processes meet it."""
    import errno, os, sys
    from megatron.core.dist_checkpointing.strategies import filesystem_async, common
    RANKS = {ranks}
    WHERE = {where!r}
    def full_open(path, *args, **kwargs):  # the writer processes' open of a shard file
        if "iter_0000010" in str(path) and int(os.environ.get("RANK", 0)) in RANKS:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return open(path, *args, **kwargs)

    save_common = common.TorchCommonSaveStrategy.save_common

    def full_common(self, state, checkpoint_dir):
        if "iter_0000010" in str(checkpoint_dir) and int(os.environ.get("RANK", 0)) in RANKS:
            path = os.path.join(str(checkpoint_dir), "common.pt")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return save_common(self, state, checkpoint_dir)

    if __name__ == "__main__":  # dist_checkpointing's spawned helper imports this file
        if WHERE == "shards":
            filesystem_async.open = full_open
        else:
            common.TorchCommonSaveStrategy.save_common = full_common
        try:  # a rank that lost its peer inside dist_checkpointing: wait 3 s, not 30
            from megatron_anchor import checkpoint
            checkpoint.failures.PEER_FAILURE_GRACE_S = 3.0
        except (ImportError, AttributeError):
            pass
        from megatron_anchor.training.pretrain import main
        sys.exit(main())
''')


def disk_full(job, ref, where="shards", nproc=1):
    save = fresh(job, f"enospc_{where}{nproc}")
    wrapper = os.path.join(job.work, f"enospc_{where}.py")
    with open(wrapper, "w") as f:
        f.write(ENOSPC_WRAPPER.format(ranks="{0}" if where == "common" else "{%d}" % (nproc - 1),
                                      where=where))
    flags = job.flags("--save", save)
    if nproc == 1:
        cmd = [PY, wrapper, *flags]
    else:
        cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(nproc), wrapper, *flags]
    code, out, err, secs = run(cmd, timeout=600)
    what = ("a writer process" if where == "shards" else "rank 0's common.pt write")
    ours = err.split("torch/distributed/elastic/")[0] if nproc > 1 else err
    said = [l.strip() for l in ours.splitlines() if ": error" in l] or [last_line(ours)]
    lines = [f"{what} raising ENOSPC at iteration 10{' (rank %d of %d)' % (0 if where == 'common' else nproc - 1, nproc) if nproc > 1 else ''}: "
             f"exit {code} after {secs:.0f} s; traceback {'YES' if traceback_in(ours) else 'no'}"
             f"{' (torchrun' + chr(39) + 's own report aside)' if nproc > 1 else ''}; "
             f"{listing(save)}; says: {' / '.join(x[:400] for x in said)}"]
    if nproc == 1:
        lines.append(resume(job, save, ref))
    return lines


def retention(job, ref):
    save = fresh(job, "retention")
    code, out, err, _ = run(job.pretrain("--save", save, "--keep-last-checkpoints", "3",
                                         "--save-retain-interval", "8"))
    return [f"--keep-last-checkpoints 3 --save-retain-interval 8: exit {code}; {listing(save)}"
            + (f"; stderr: {last_line(err)}" if code else "")]


def tools_on_damage(job, ref):
    save = fresh(job, "tools")
    shutil.copytree(reference(job)[0], save)
    truncate_shard(os.path.join(save, "iter_0000024"))
    out_dir = os.path.join(job.work, "tools_out")
    shutil.rmtree(out_dir, ignore_errors=True)
    cmds = {
        "eval_long_context.py": [PY, f"{ROOT}/tools/eval_long_context.py", "--load", save,
                                 "--quick", "--no-progress"],
        "torchrun --nproc-per-node 2 verify_parity.py": [
            PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            f"{ROOT}/tools/verify_parity.py", "--cpu", "--load", save, "--layouts",
            "tp1cp1,tp2cp1", "--variants", "anchor", "--dtypes", "fp32", "--data-path", job.data,
            "--seq-length", "256"],
        "pretrain --pretrained-checkpoint": job.pretrain("--pretrained-checkpoint", save,
                                                         iters=2),
        "rope_precision.py": [PY, f"{ROOT}/tools/rope_precision.py", "--load", save,
                              "--data-path", job.data, "--quick", "--no-progress",
                              "--output-dir", out_dir],
        "convert_checkpoint.py export": [PY, f"{ROOT}/tools/convert_checkpoint.py", "export",
                                         "--load", save, "--output", out_dir + "_hf"],
    }
    lines = []
    for name, cmd in cmds.items():
        code, out, err, _ = run(cmd)
        ours = err.split("torch/distributed/elastic/")[0] \
            if "torch.distributed.run" in cmd else err
        said = [l for l in ours.splitlines() if ": error" in l] or [last_line(ours)]
        aside = " (torchrun's own report aside)" if "torch.distributed.run" in cmd else ""
        lines.append(f"{name} <shard cut in half>: exit {code}; traceback "
                     f"{'YES' if traceback_in(ours) else 'no'}{aside}; says: "
                     f"{said[0].strip()[:300]}")
    return lines


FAULTS = {
    "kill9": ("kill -9 while a checkpoint is written, then --load", kill9_during_save),
    "sigterm": ("SIGTERM at step 10, one process (--exit-signal-handler)", sigterm),
    "sigterm_dp2": ("SIGTERM at step 10 to one of two processes (torchrun, DP=2)",
                    lambda j, r: sigterm(j, r, 2)),
    "duration": ("--exit-duration-in-mins reached", exit_duration),
    "truncated": ("newest checkpoint with one shard truncated, then --load",
                  lambda j, r: damaged(j, r, "truncated", truncate_shard)),
    "metadata": ("newest checkpoint without dist_checkpointing's .metadata, then --load",
                 lambda j, r: damaged(j, r, "metadata", remove_metadata)),
    "json": ("newest checkpoint with unreadable train_state.json, then --load",
             lambda j, r: damaged(j, r, "json", bad_json)),
    "diverge": ("a diverging run (--lr 1e4 --clip-grad 0)", divergence),
    "diverge_bf16": ("a diverging BF16 run", lambda j, r: divergence(j, r, "--bf16")),
    "enospc": ("disk full during a save (a writer raising ENOSPC)", disk_full),
    "enospc_common_dp2": ("disk full on rank 0 only, inside dist_checkpointing (DP=2)",
                          lambda j, r: disk_full(j, r, "common", 2)),
    "retention": ("retention: newest 3 plus every 8th", retention),
    "tools": ("the other tools on a damaged checkpoint", tools_on_damage),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--only", nargs="+", choices=sorted(FAULTS), default=None)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    job = Job(os.path.abspath(args.workdir))
    _, ref = reference(job)
    rows = []
    for name in args.only or FAULTS:
        title, fn = FAULTS[name]
        started = time.time()
        try:
            result = fn(job, ref)
        except Exception as err:  # the harness keeps going: the row says what broke
            result = [f"harness error: {type(err).__name__}: {err}"]
        rows.append({"fault": name, "title": title, "result": result,
                     "seconds": round(time.time() - started, 1)})
        print(f"| {title} | {'<br>'.join(result)} |", flush=True)
    if job.dropped:
        print(f"flags the trainer does not know, dropped: {' '.join(sorted(job.dropped))}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pythonpath": os.environ.get("PYTHONPATH"), "rows": rows,
                       "dropped": sorted(job.dropped)}, f, indent=2)


if __name__ == "__main__":
    main()

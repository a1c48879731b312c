"""What the issue-18 machinery costs: the non-finite guard per step, and checkpoint saves
with and without --async-save.

    python benchmarks/runs_that_last.py check-cost [--rounds 8 --steps 5]
    python benchmarks/runs_that_last.py save-time --model default
    python benchmarks/runs_that_last.py save-time --model 1b [--no-optimizer] [--async-first]

check-cost: one process, the default job's model (examples/run_default.sh: 4 layers, d=256,
vocabulary 8192, 2 windows of 1024 tokens), real training steps, alternating blocks of
`--steps` steps with the guard's per-step check and without it; the median step time of
each (ratios are what to read on a shared machine). Also times the weight check the guard
runs before every save.

save-time: `checkpoint.save_training` of a model's training state into a fresh root: the
synchronous save, then an asynchronous one (time blocked in the loop, time until it is
complete), and with the default model a training step run while the background writer
works, against one without. `--model 1b` is 16 layers, d=2048 (0.95B parameters, FP32);
`--no-optimizer` saves it the way `--no-save-optim` does (model, LR schedule, data position),
which keeps the run inside 24 GiB of RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import torch

MODELS = {
    # examples/run_default.sh's model; its 8K BPE vocabulary
    "default": dict(num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4,
                    num_query_groups=2, vocab_size=8192, seq_length=1024, windows=2),
    "1b": dict(num_layers=16, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16,
               num_query_groups=16, vocab_size=32000, seq_length=256, windows=1),
}


def setup(name: str):
    from megatron_anchor.layout import pack_documents
    from megatron_anchor.model import ModelConfig
    from megatron_anchor.training.config import TrainConfig
    from megatron_anchor.training.model_setup import build_training_components

    spec = dict(MODELS[name])
    seq, windows = spec.pop("seq_length"), spec.pop("windows")
    cfg = TrainConfig(model=ModelConfig(**spec, max_sequence_length=seq))
    cfg.data.seq_length, cfg.data.micro_batch_size, cfg.data.global_batch_size = seq, 1, windows
    cfg.optim.lr, cfg.optim.train_iters = 1e-4, 1000
    cfg.parallel.cpu = True
    components = build_training_components(cfg)
    gen = torch.Generator().manual_seed(0)
    batches = [pack_documents([torch.randint(3, spec["vocab_size"], (n,), generator=gen).tolist()
                               for n in (300, 500, 400)], seq, "anchor", anchor_token_id=1)
               for _ in range(windows)]
    params = sum(p.numel() for p in components.module.parameters())
    return cfg, components, batches, params


def check_cost(args) -> dict:
    from megatron_anchor.training.train import NonFiniteGuard, _train_step

    cfg, components, batches, params = setup("default")
    guard = NonFiniteGuard(lambda: None, None)
    for _ in range(2):  # warm-up
        _train_step(components, batches, cfg)
    times = {"on": [], "off": []}
    for _ in range(args.rounds):
        for mode in ("on", "off"):
            for _ in range(args.steps):
                started = time.perf_counter()
                metrics, local_finite = _train_step(components, batches, cfg)
                if mode == "on":
                    guard.check_step(0, metrics, local_finite, components)
                times[mode].append(time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(5):
        guard.check_weights(0, components)
    weights_s = (time.perf_counter() - started) / 5
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    return {"model": "default", "parameters": params, "steps_each": len(times["on"]),
            "median_step_s_with_check": on, "median_step_s_without": off,
            "ratio_with_over_without": on / off, "weight_check_s": weights_s}


def save_time(args) -> dict:
    from megatron_anchor import checkpoint
    from megatron_anchor.training.train import NonFiniteGuard, _train_step

    cfg, components, batches, params = setup(args.model)
    if args.model == "default":  # the optimizer state exists after a step
        _train_step(components, batches, cfg)
    elif not args.no_optimizer:
        components.optimizer.step()  # zero gradients: creates the Adam moments
    options = checkpoint.SaveOptions(save_optim=not args.no_optimizer)
    work = tempfile.mkdtemp(prefix="save_time_", dir=args.dir)
    out = {"model": args.model, "parameters": params, "save_optim": options.save_optim}
    try:
        guard = NonFiniteGuard(lambda: None, None)
        started = time.perf_counter()
        guard.check_weights(1, components)
        out["weight_check_s"] = time.perf_counter() - started

        # Twice each: the first save of a process also starts dist_checkpointing's
        # results-queue manager process (a spawn), which later saves reuse.
        def sync_saves():
            for n in (1, 2):
                root = os.path.join(work, f"sync{n}")
                started = time.perf_counter()
                path = checkpoint.save_training(root, 1, components, cfg, {}, options=options)
                out[f"sync_s_{n}"] = time.perf_counter() - started
                out["bytes"] = sum(checkpoint.folder.read_manifest(path)["files"].values())

        def async_saves():
            for n in (1, 2):
                root = os.path.join(work, f"async{n}")
                saves = checkpoint.AsyncSaves()
                started = time.perf_counter()
                checkpoint.save_training(root, 1, components, cfg, {}, options=options,
                                         async_saves=saves)
                out[f"async_blocked_s_{n}"] = time.perf_counter() - started
                if args.model == "default":
                    step = time.perf_counter()
                    _train_step(components, batches, cfg)  # while the writer works
                    out[f"step_s_during_async_write_{n}"] = time.perf_counter() - step
                saves.wait()
                out[f"async_complete_s_{n}"] = time.perf_counter() - started
                out[f"async_complete_{n}"] = checkpoint.is_complete(
                    os.path.join(root, "iter_0000001"))

        for measure in ((async_saves, sync_saves) if args.async_first else
                        (sync_saves, async_saves)):
            measure()
        if args.model == "default":
            step = time.perf_counter()
            _train_step(components, batches, cfg)
            out["step_s_without_writer"] = time.perf_counter() - step
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    cost = sub.add_parser("check-cost")
    cost.add_argument("--rounds", type=int, default=8)
    cost.add_argument("--steps", type=int, default=5)
    save = sub.add_parser("save-time")
    save.add_argument("--model", choices=sorted(MODELS), default="default")
    save.add_argument("--no-optimizer", action="store_true")
    save.add_argument("--dir", default=None, help="where to write the checkpoints (a tmp dir)")
    save.add_argument("--async-first", action="store_true",
                      help="the asynchronous saves before the synchronous ones (order effects "
                           "of the page cache and the disk)")
    args = parser.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")
    from megatron_anchor import runtime

    runtime.initialize(1, 1, cpu=True, seed=0)
    try:
        result = check_cost(args) if args.what == "check-cost" else save_time(args)
    finally:
        runtime.destroy()
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

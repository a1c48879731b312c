"""Memory features of Megatron-Core, measured side by side in one run (CPU or GPU).

1. Activation recomputation (`--recompute-granularity`): one training step (forward,
   backward, AdamW) of the same model on the same packed `anchor` window, once per setting,
   each in a fresh process. Reports the step's peak memory above the memory held before it
   (CPU: peak RSS; GPU: `torch.cuda.max_memory_allocated`), the bytes autograd saves for the
   backward during the forward (what recomputation trades for compute), and the step time
   (wall, and CPU seconds of the process, steadier on a shared machine; run with
   OMP_NUM_THREADS=1 for that).
2. The distributed optimizer (`--use-distributed-optimizer`) with DP=2 against the plain
   optimizer: the optimizer-state bytes each rank holds after a step (Adam moments and FP32
   main weights when they are separate tensors) and whether the losses agree.

    python benchmarks/memory.py --seq-length 16384 --json benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time

SETTINGS = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "full-uniform-1": {"recompute_granularity": "full", "recompute_method": "uniform",
                       "recompute_num_layers": 1},
}


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _documents(seq_length, seed, vocab, max_doc):
    import numpy as np

    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < seq_length + 1:
        n = int(np.clip(rng.lognormal(mean=6.4, sigma=1.1), 16, max_doc))
        docs.append(rng.integers(3, vocab, size=n).tolist())
        total += n
    return docs


def _recompute_worker(setting, args, queue):
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from megatron_anchor import runtime
    from megatron_anchor.layout import pack_documents
    from megatron_anchor.model import ModelConfig
    from megatron_anchor.training.config import TrainConfig
    from megatron_anchor.training.model_setup import build_training_components
    from megatron_anchor.training.train import train_step

    runtime.initialize(1, 1, cpu=None, seed=args.seed)
    gpu = not runtime.is_cpu()
    model_cfg = ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                            num_attention_heads=args.heads, num_query_groups=args.heads // 2,
                            vocab_size=args.vocab, max_sequence_length=args.seq_length,
                            **SETTINGS[setting])
    cfg = TrainConfig(model=model_cfg)
    cfg.data.seq_length, cfg.data.micro_batch_size, cfg.data.global_batch_size = \
        args.seq_length, 1, 1
    cfg.optim.lr, cfg.optim.train_iters = 1e-4, 1000
    cfg.parallel.cpu = not gpu
    cfg.validate_memory_features()
    components = build_training_components(cfg)
    batch = pack_documents(_documents(args.seq_length, args.seed, args.vocab, args.max_doc),
                           args.seq_length, "anchor", anchor_token_id=1).to(runtime.device())
    # Bytes autograd saves for the backward during one forward (unique storages).
    from megatron_anchor.model import forward_packed

    seen, saved = set(), [0]

    def pack(t):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            saved[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = forward_packed(components.model, batch, return_logits=False)
    del loss
    components.model.zero_grad_buffer()

    train_step(components, [batch], cfg)  # warm-up: allocates optimizer state
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _current_rss_bytes()
    times, cpu_times, losses = [], [], []
    for _ in range(args.steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        metrics = train_step(components, [batch], cfg)
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
        losses.append(metrics["loss"])
    peak = torch.cuda.max_memory_allocated() if gpu else _rss_bytes()
    runtime.destroy()
    queue.put({"setting": setting, "step_s": statistics.median(times),
               "step_cpu_s": statistics.median(cpu_times),
               "step_peak_bytes": peak - before, "saved_for_backward_bytes": saved[0],
               "losses": losses, "segments": batch.num_segments,
               "device": "cuda" if gpu else "cpu"})


def recompute(args) -> dict:
    ctx = mp.get_context("spawn")
    rows = []
    for setting in args.settings:
        queue = ctx.Queue()
        proc = ctx.Process(target=_recompute_worker, args=(setting, args, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
        print(f"  {setting:>15}: step {rows[-1]['step_s']:.2f} s ({rows[-1]['step_cpu_s']:.2f} "
              f"s CPU), peak +"
              f"{rows[-1]['step_peak_bytes'] / 2**20:.0f} MiB, saved for backward "
              f"{rows[-1]['saved_for_backward_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    base = rows[0]
    for row in rows:
        row["peak_saving_vs_none"] = 1 - row["step_peak_bytes"] / base["step_peak_bytes"]
        row["saved_bytes_saving_vs_none"] = (1 - row["saved_for_backward_bytes"]
                                             / base["saved_for_backward_bytes"])
        row["time_cost_vs_none"] = row["step_s"] / base["step_s"] - 1
        # CPU seconds of the process: on a shared machine far steadier than wall time.
        row["cpu_time_cost_vs_none"] = row["step_cpu_s"] / base["step_cpu_s"] - 1
        row["losses_equal_none"] = row["losses"] == base["losses"]
    return {"seq_length": args.seq_length, "num_layers": args.num_layers,
            "hidden_size": args.hidden_size, "rows": rows}


def _distopt_worker(rank, world_size, argv):
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_anchor.training import pretrain
    from megatron_anchor.training import train as train_module

    measured = {}
    run_train = train_module.train

    def train_and_measure(cfg, components, *a, **k):
        summary = run_train(cfg, components, *a, **k)
        moments = main = 0
        for inner in components.optimizer.chained_optimizers:
            for state in inner.optimizer.state.values():
                moments += sum(v.numel() * v.element_size() for key, v in state.items()
                               if key != "step")
            for group in getattr(inner, "shard_fp32_from_float16_groups", []) or []:
                main += sum(p.numel() * p.element_size() for p in group)
        params = sum(p.numel() for p in components.module.parameters())
        measured.update(moments_bytes=moments, separate_main_bytes=main, params=params)
        return summary

    pretrain.train = train_and_measure
    train_module.train = train_and_measure
    summary = pretrain.run(argv)
    return dict(measured, losses=summary.losses)


def distopt(args) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_anchor.testing import run_on_ranks

    argv = ["--cpu", "--data-path", args.data_path, "--split", "100,0,0",
            "--vocab-size", str(args.vocab), "--tokenizer-type", "NullTokenizer",
            "--seq-length", "512", "--micro-batch-size", "1", "--global-batch-size", "2",
            "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
            "--num-attention-heads", str(args.heads), "--num-query-groups",
            str(args.heads // 2), "--train-iters", "2", "--lr", "1e-3",
            "--no-progress-bar", "--log-interval", "1", "--attention-variant", "intra-doc",
            "--anchor-token-id", "1", "--pad-token-id", "0"]
    plain = run_on_ranks(_distopt_worker, 2, argv)
    sharded = run_on_ranks(_distopt_worker, 2, argv + ["--use-distributed-optimizer"])
    return {"dp": 2, "params": plain[0]["params"],
            "plain_per_rank_bytes": [r["moments_bytes"] + r["separate_main_bytes"] for r in plain],
            "distributed_per_rank_bytes": [r["moments_bytes"] + r["separate_main_bytes"]
                                           for r in sharded],
            "losses_equal": plain[0]["losses"] == sharded[0]["losses"],
            "losses": plain[0]["losses"]}


def _null_dataset(directory, vocab):
    """A NullTokenizer dataset of random documents (for the distributed-optimizer part)."""
    import numpy as np

    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = os.path.join(directory, "bench_text_document")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(64):
        doc = rng.integers(3, vocab - 1, size=int(rng.integers(50, 600)))
        builder.add_document(torch.from_numpy(doc.astype(np.int32)), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("recompute", "distopt", "all"), default="all")
    parser.add_argument("--seq-length", type=int, default=16384)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--max-doc", type=int, default=4096,
                        help="longest document (the local backend holds L^2 scores per head)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-path", default=None,
                        help="distopt part: an indexed dataset (default: random documents)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    result = {}
    if args.part in ("recompute", "all"):
        result["recompute"] = recompute(args)
    if args.part in ("distopt", "all"):
        import tempfile

        here = os.getcwd()
        with tempfile.TemporaryDirectory() as tmp:
            if args.data_path is None:
                args.data_path = _null_dataset(tmp, args.vocab)
            os.chdir(tmp)  # the runs write their loss-curve PNG to the working directory
            try:
                result["distributed_optimizer"] = distopt(args)
            finally:
                os.chdir(here)
    text = json.dumps(result, indent=2)
    if args.json:
        tmp_path = f"{args.json}.tmp"
        with open(tmp_path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp_path, args.json)
    print(text)
    return result


if __name__ == "__main__":
    main()

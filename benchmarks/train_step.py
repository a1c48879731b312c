"""Training-step time of full, intra-doc and anchor attention, side by side (CPU or GPU).

A full Megatron-Core training step (forward, backward over DDP buffers, AdamW, LR schedule)
on windows packed from long-tailed document lengths (log-normal, median ~600 tokens, like
web/code corpora), with a small model so attention is a large share of the work. Reports,
per sequence length, the step time, tokens/s and model TFLOP/s (MFU with --peak-tflops; on
a GPU the default is the device's datasheet peak) of each variant, the peak memory of a step,
the measured step-time saving against `full`, and the ideal saving from the model FLOP count
of `megatron_anchor.training.flops` (matmul FLOPs of the layers plus causal attention FLOPs:
S^2/2 for full, sum L_i^2/2 over THD segments otherwise). One model is alive at a time.

    python benchmarks/train_step.py --seq-lengths 4096 8192 16384 --json
    python benchmarks/train_step.py --bf16 --attention-backend varlen --seq-lengths 32768 \
        --num-layers 16 --hidden-size 2048 --heads 32 --query-groups 8 --ffn-hidden-size 8192 \
        --vocab 128256
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import numpy as np
import torch

VARIANTS = ("full", "intra-doc", "anchor")


def documents(seq_length: int, seed: int, vocab: int):
    """Long-tailed document lengths filling a bit more than one window."""
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < seq_length + 1:
        n = int(np.clip(rng.lognormal(mean=6.4, sigma=1.1), 16, 4 * seq_length))
        docs.append(rng.integers(3, vocab, size=n).tolist())
        total += n
    return docs


def release(device) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def measure_step(model_cfg, seq_length: int, variant: str, docs, steps: int, warmup: int,
                 peak_tflops=None, seed: int = 0) -> dict:
    """Build one model, time `steps` training steps on one packed window, free the model."""
    from megatron_anchor import runtime
    from megatron_anchor.layout import pack_documents
    from megatron_anchor.training.config import TrainConfig
    from megatron_anchor.training.flops import FlopsShape, batch_training_flops, throughput
    from megatron_anchor.training.model_setup import build_training_components
    from megatron_anchor.training.train import train_step

    cfg = TrainConfig(model=model_cfg)
    cfg.data.seq_length, cfg.data.micro_batch_size, cfg.data.global_batch_size = seq_length, 1, 1
    cfg.optim.lr, cfg.optim.train_iters = 1e-4, 1000
    cfg.parallel.cpu = runtime.is_cpu()
    device = "cpu" if cfg.parallel.cpu else "cuda"
    runtime.manual_seed(seed)
    components = build_training_components(cfg)
    try:
        batch = pack_documents(docs, seq_length, variant, anchor_token_id=1).to(device)
        losses = [train_step(components, [batch], cfg)["loss"] for _ in range(warmup)]
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        losses += [train_step(components, [batch], cfg)["loss"] for _ in range(steps)]
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / steps
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None
        step_flops = batch_training_flops(FlopsShape.from_model_config(model_cfg), batch)
        rate = throughput(step_flops, seconds, 1, peak_tflops)
        return {"step_s": seconds, "tokens_per_s": seq_length / seconds, "flops": step_flops,
                "tflops_per_rank": rate["tflops_per_rank"], "mfu": rate["mfu"],
                "peak_gib": peak, "segments": batch.num_segments, "losses": losses}
    finally:
        del components
        release(device)


def model_config(args, seq_length: int):
    from megatron_anchor.model import ModelConfig

    return ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                       num_attention_heads=args.heads,
                       num_query_groups=args.query_groups or args.heads // 2,
                       ffn_hidden_size=args.ffn_hidden_size, vocab_size=args.vocab,
                       max_sequence_length=seq_length, bf16=args.bf16,
                       attention_backend=args.attention_backend)


def bench(seq_length: int, args) -> dict:
    docs = documents(seq_length, args.seed, args.vocab)
    row = {"seq_length": seq_length}
    for variant in args.variants:
        row[variant] = measure_step(model_config(args, seq_length), seq_length, variant, docs,
                                    args.steps, args.warmup, args.peak_tflops, args.seed)
    for variant in args.variants:
        if variant != "full" and "full" in row:
            row[variant]["saving_vs_full"] = 1 - row[variant]["step_s"] / row["full"]["step_s"]
            row[variant]["ideal_saving"] = 1 - row[variant]["flops"] / row["full"]["flops"]
    return row


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--query-groups", type=int, default=None, help="default: heads / 2")
    parser.add_argument("--ffn-hidden-size", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--bf16", action="store_true", help="BF16 weights and activations")
    parser.add_argument("--attention-backend", default="local")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense peak TFLOP/s of the device, for MFU (default on a GPU: its "
                             "datasheet peak, e.g. 989 for H100/H200 BF16)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_anchor import runtime
    from megatron_anchor.training.flops import default_peak_tflops

    runtime.initialize(1, 1, cpu=None, seed=args.seed)
    if args.peak_tflops is None and not runtime.is_cpu():
        args.peak_tflops = default_peak_tflops(torch.cuda.get_device_name(), bf16=args.bf16)
    try:
        rows = [bench(s, args) for s in args.seq_lengths]
    finally:
        runtime.destroy()
    if args.json:
        print(json.dumps({"device": "cuda" if torch.cuda.is_available() else "cpu",
                          "threads": torch.get_num_threads(), "bf16": args.bf16,
                          "attention_backend": args.attention_backend, "rows": rows}, indent=2))
        return rows
    print(f"{'S':>6} | " + " | ".join(f"{v:>34}" for v in args.variants)
          + " | saving anchor (ideal)")
    for row in rows:
        cells = [f"{row[v]['step_s'] * 1000:8.0f} ms {row[v]['tokens_per_s']:7.0f} t/s "
                 f"{row[v]['tflops_per_rank']:6.3g} TF/s" for v in args.variants]
        a = row.get("anchor", {})
        saving = (f" | {a['saving_vs_full']:6.1%} ({a['ideal_saving']:.1%})"
                  if "saving_vs_full" in a else "")
        print(f"{row['seq_length']:>6} | " + " | ".join(f"{c:>34}" for c in cells) + saving)
    return rows


if __name__ == "__main__":
    main()

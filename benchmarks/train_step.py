"""Training-step time of full, intra-doc and anchor attention, side by side (CPU or GPU).

A full Megatron-Core training step (forward, backward over DDP buffers, AdamW, LR schedule)
on windows packed from long-tailed document lengths (log-normal, median ~600 tokens, like
web/code corpora), with a small model so attention is a large share of the work. Reports,
per sequence length, the step time, tokens/s and model TFLOP/s (MFU with --peak-tflops) of
each variant, the measured step-time saving against `full`, and the ideal saving from the
model FLOP count of `megatron_anchor.training.flops` (matmul FLOPs of the layers plus causal
attention FLOPs: S^2/2 for full, sum L_i^2/2 over THD segments otherwise).

    python benchmarks/train_step.py --seq-lengths 4096 8192 16384 --json
"""

from __future__ import annotations

import argparse
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


def bench(seq_length: int, args) -> dict:
    from megatron_anchor.layout import pack_documents
    from megatron_anchor.model import ModelConfig
    from megatron_anchor.training.config import TrainConfig
    from megatron_anchor.training.flops import FlopsShape, batch_training_flops, throughput
    from megatron_anchor.training.model_setup import build_training_components
    from megatron_anchor.training.train import train_step

    model_cfg = ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                            num_attention_heads=args.heads, num_query_groups=args.heads // 2,
                            vocab_size=args.vocab, max_sequence_length=seq_length)
    cfg = TrainConfig(model=model_cfg)
    cfg.data.seq_length, cfg.data.micro_batch_size, cfg.data.global_batch_size = seq_length, 1, 1
    cfg.optim.lr, cfg.optim.train_iters = 1e-4, 1000
    cfg.parallel.cpu = not torch.cuda.is_available()
    device = "cpu" if cfg.parallel.cpu else "cuda"
    docs = documents(seq_length, args.seed, args.vocab)
    row = {"seq_length": seq_length}
    for variant in VARIANTS:
        torch.manual_seed(args.seed)
        components = build_training_components(cfg)
        batch = pack_documents(docs, seq_length, variant, anchor_token_id=1).to(device)
        for _ in range(args.warmup):
            train_step(components, [batch], cfg)
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(args.steps):
            train_step(components, [batch], cfg)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / args.steps
        step_flops = batch_training_flops(FlopsShape.from_model_config(model_cfg), batch)
        rate = throughput(step_flops, seconds, 1, args.peak_tflops)
        row[variant] = {"step_s": seconds, "tokens_per_s": seq_length / seconds,
                        "flops": step_flops, "tflops_per_rank": rate["tflops_per_rank"],
                        "mfu": rate["mfu"], "segments": batch.num_segments}
    for variant in VARIANTS[1:]:
        row[variant]["saving_vs_full"] = 1 - row[variant]["step_s"] / row["full"]["step_s"]
        row[variant]["ideal_saving"] = 1 - row[variant]["flops"] / row["full"]["flops"]
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense peak TFLOP/s of the device, for MFU (e.g. 989: H100 BF16)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")
    from megatron_anchor import runtime

    runtime.initialize(1, 1, cpu=None, seed=args.seed)
    try:
        rows = [bench(s, args) for s in args.seq_lengths]
    finally:
        runtime.destroy()
    if args.json:
        print(json.dumps({"device": "cuda" if torch.cuda.is_available() else "cpu",
                          "threads": torch.get_num_threads(), "rows": rows}, indent=2))
        return rows
    print(f"{'S':>6} | " + " | ".join(f"{v:>34}" for v in VARIANTS) + " | saving anchor (ideal)")
    for row in rows:
        cells = [f"{row[v]['step_s'] * 1000:8.0f} ms {row[v]['tokens_per_s']:7.0f} t/s "
                 f"{row[v]['tflops_per_rank']:6.3g} TF/s" for v in VARIANTS]
        a = row["anchor"]
        print(f"{row['seq_length']:>6} | " + " | ".join(f"{c:>34}" for c in cells)
              + f" | {a['saving_vs_full']:6.1%} ({a['ideal_saving']:.1%})")
    return rows


if __name__ == "__main__":
    main()

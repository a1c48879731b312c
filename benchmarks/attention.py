"""Forward+backward of the `local` backend: `full` vs `anchor`, side by side in one run.

For each window length S, documents with long-tailed lengths (lognormal, mean ~1.5K
tokens) are packed once; the same q/k/v then go through:
  full   - one causal segment over the window (what full attention costs),
  anchor - the anchor layout (one segment per document plus its anchor copy),
  naive  - a Python loop of per-document scaled_dot_product_attention calls.
Each case runs in a fresh process so peak memory (RSS high-water mark above the inputs)
is its own. Reported: the measured time ratio anchor/full next to the ideal FLOP ratio
Σ(L_i+1)²/S², and their quotient (1.0 = perfect scaling with Σ L_i²).

    python benchmarks/attention.py                      # 4K..32K
    python benchmarks/attention.py --seq-lengths 4096 16384 --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

import numpy as np
import torch
import torch.nn.functional as F

from megatron_anchor.attention.local import packed_causal_attention
from megatron_anchor.layout import pack_documents


def long_tailed_documents(seq_length, mean, seed):
    rng = np.random.default_rng(seed)
    sigma = 1.0
    mu = np.log(mean) - sigma ** 2 / 2
    docs, total = [], 0
    while total < seq_length:
        n = int(max(1, rng.lognormal(mu, sigma)))
        docs.append([7] * n)
        total += n + 1
    return docs


def _rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run_case(case, cu_seqlens, seq_length, heads, groups, head_dim, repeats, queue):
    torch.manual_seed(0)
    torch.set_num_threads(torch.get_num_threads())
    q = torch.randn(seq_length, heads, head_dim, requires_grad=True)
    k = torch.randn(seq_length, groups, head_dim, requires_grad=True)
    v = torch.randn(seq_length, groups, head_dim, requires_grad=True)
    base_rss = _rss_bytes()
    bounds = cu_seqlens.tolist()

    def step():
        if case == "full":
            out = packed_causal_attention(q, k, v, torch.tensor([0, seq_length], dtype=torch.int32))
        elif case == "anchor":
            out = packed_causal_attention(q, k, v, cu_seqlens)
        else:  # naive per-document loop
            outs = []
            for s, e in zip(bounds[:-1], bounds[1:]):
                outs.append(F.scaled_dot_product_attention(
                    q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                    is_causal=True, enable_gqa=True).transpose(0, 1))
            out = torch.cat(outs)
        out.sum().backward()

    step()  # warm-up
    times = []
    for _ in range(repeats):
        q.grad = k.grad = v.grad = None
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    queue.put((min(times), max(0, _rss_bytes() - base_rss)))


def measure(case, cu_seqlens, args, seq_length):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_run_case, args=(case, cu_seqlens, seq_length, args.heads,
                                            args.query_groups, args.head_dim, args.repeats, queue))
    p.start()
    result = queue.get()
    p.join()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--mean-doc-length", type=float, default=1500.0)
    parser.add_argument("--heads", type=int, default=4, help="query heads")
    parser.add_argument("--query-groups", type=int, default=2, help="K/V heads (GQA)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)

    rows = []
    header = (f"{'S':>6} {'docs':>5} {'ideal':>7} {'anchor/full':>11} {'naive/full':>10} "
              f"{'anchor/ideal':>12} {'naive/ideal':>11} {'full MB':>8} {'anchor MB':>9}")
    print(f"local backend, fwd+bwd, {args.heads} heads / {args.query_groups} groups, "
          f"head dim {args.head_dim}, {torch.get_num_threads()} threads")
    print(header)
    for S in args.seq_lengths:
        docs = long_tailed_documents(S, args.mean_doc_length, args.seed)
        batch = pack_documents(docs, S, "anchor", anchor_token_id=1)
        lengths = batch.segment_lengths.to(torch.float64)
        ideal = float((lengths ** 2).sum() / S ** 2)
        t_full, m_full = measure("full", batch.cu_seqlens, args, S)
        t_anchor, m_anchor = measure("anchor", batch.cu_seqlens, args, S)
        t_naive, _ = measure("naive", batch.cu_seqlens, args, S)
        row = dict(seq_length=S, segments=batch.num_segments, ideal_ratio=ideal,
                   full_s=t_full, anchor_s=t_anchor, naive_s=t_naive,
                   anchor_ratio=t_anchor / t_full, naive_ratio=t_naive / t_full,
                   anchor_over_ideal=t_anchor / t_full / ideal,
                   naive_over_ideal=t_naive / t_full / ideal,
                   full_peak_mb=m_full / 2 ** 20, anchor_peak_mb=m_anchor / 2 ** 20)
        rows.append(row)
        print(f"{S:>6} {row['segments']:>5} {ideal:>7.3f} {row['anchor_ratio']:>11.3f} "
              f"{row['naive_ratio']:>10.3f} {row['anchor_over_ideal']:>12.2f} "
              f"{row['naive_over_ideal']:>11.2f} {row['full_peak_mb']:>8.1f} "
              f"{row['anchor_peak_mb']:>9.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=vars(args), rows=rows), f, indent=2)


if __name__ == "__main__":
    main()

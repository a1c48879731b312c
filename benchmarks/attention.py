"""Attention forward+backward: `full` vs `anchor` per backend, side by side in one run.

For each window length S, documents with long-tailed lengths (lognormal, mean ~1.5K
tokens) are packed once; the same q/k/v then go through:
  full   - one causal segment over the window (what full attention costs),
  anchor - the anchor layout (one segment per document plus its anchor copy),
  naive  - a Python loop of per-document scaled_dot_product_attention calls on slices of
           the packed q/k/v (reference point for what the packed path saves; `local` only);
  alone  - the same calls on separate contiguous tensors per segment, no packing at all:
           what the SDPA kernel alone costs for these segment lengths, the floor of any
           packed implementation built on it (`local` only).
The cases alternate within each of the `--repeats` rounds, so a change in the machine's
load hits them alike, and each figure is the median over the rounds. The per-batch plan
(bucket rows, cu_seqlens) is built once outside the timed step, as training does for all
layers of a batch; its host time is reported as plan_ms.

Reported: the measured time ratio anchor/full next to the ideal FLOP ratio
Σ(L_i+1)²/S² (segment lengths, each document plus its anchor), their quotient (1.0 =
perfect scaling with Σ L_i²), and TFLOP/s (causal attention FLOPs, backward counted as 2.5x
the forward, as FlashAttention's benchmarks do). Timing: CUDA events on a GPU; on the CPU
wall time and the process's CPU time (steadier when other jobs share the cores). Peak
memory: `torch.cuda.max_memory_allocated` on a GPU; on the CPU the RSS high-water mark of
one step (reset just before it) above the RSS before it, in a fresh process per case (`--no-memory` skips it).

    python benchmarks/attention.py                                   # CPU, FP32, 4K..32K
    python benchmarks/attention.py --device cuda --dtype bf16 --backends local varlen \
        --seq-lengths 16384 32768 65536 --heads 32 --query-groups 8 --head-dim 64
    python benchmarks/attention.py --seq-lengths 4096 16384 --json out.json

On a shared CPU, OMP_WAIT_POLICY=PASSIVE keeps idle OpenMP threads from spinning: with it
unset, every small op's thread barrier waits for a descheduled thread, which penalises the
many-kernel anchor path far more than the one-kernel full path.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from megatron_anchor.layout import pack_documents

try:  # the per-batch plan (absent in trees older than issue 19: then planned per call)
    from megatron_anchor.attention.local import plan_attention
except ImportError:
    plan_attention = None

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def causal_attention_flops(segment_lengths, heads, head_dim) -> float:
    """Forward+backward FLOPs of causal attention over THD segments (bwd = 2.5 x fwd)."""
    pairs = sum(n * (n + 1) / 2 for n in segment_lengths)
    return 3.5 * 4 * heads * head_dim * pairs


def settle(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def make_step(backend, case, cu_seqlens, q, k, v, device):
    """A function running one forward+backward of `case` (its plan built here, once)."""
    from megatron_anchor.attention.local import packed_causal_attention

    S = q.shape[0]
    cu = cu_seqlens if case == "anchor" else torch.tensor([0, S], dtype=torch.int32)
    if case == "alone":
        bounds = cu_seqlens.tolist()
        pieces = [[x.detach()[a:b].transpose(0, 1)[None].contiguous().requires_grad_()
                   for x in (q, k, v)] for a, b in zip(bounds[:-1], bounds[1:])]

        def step():
            for qs, ks, vs in pieces:
                qs.grad = ks.grad = vs.grad = None
                out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
                out.backward(torch.ones_like(out))
        return step, 0.0
    if case == "naive":
        bounds = cu_seqlens.tolist()

        def forward():
            return torch.cat([F.scaled_dot_product_attention(
                q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                is_causal=True, enable_gqa=True).transpose(0, 1)
                for s, e in zip(bounds[:-1], bounds[1:])])
        plan_s = 0.0
    elif backend == "local":
        settle(device)  # the plan's host time, not the kernels still queued before it
        started = time.perf_counter()
        plan = plan_attention(cu, device=device, dtype=q.dtype) if plan_attention else None
        settle(device)
        plan_s = time.perf_counter() - started
        cu_dev = cu.to(device)

        def forward():
            if plan is None:
                return packed_causal_attention(q, k, v, cu_dev)
            return packed_causal_attention(q, k, v, cu_dev, plan=plan)
    elif backend == "varlen":
        from megatron_anchor.attention.varlen import plan_varlen, varlen_packed_attention

        settle(device)  # the plan's host time, not the kernels still queued before it
        started = time.perf_counter()
        plan = plan_varlen(cu, device=device)
        settle(device)
        plan_s = time.perf_counter() - started

        def forward():
            return varlen_packed_attention(q, k, v, plan)
    else:  # te: Transformer Engine's DotProductAttention, as Megatron's TEDotProductAttention calls it
        import transformer_engine.pytorch as te

        attn = te.DotProductAttention(num_attention_heads=q.shape[1], kv_channels=q.shape[2],
                                      num_gqa_groups=k.shape[1], attention_dropout=0.0,
                                      qkv_format="thd", attn_mask_type="padding_causal")
        cu_dev = cu.to(device=device, dtype=torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        plan_s = 0.0

        def forward():
            return attn(q, k, v, cu_seqlens_q=cu_dev, cu_seqlens_kv=cu_dev,
                        max_seqlen_q=longest, max_seqlen_kv=longest)

    grad = torch.ones(S, q.shape[1], q.shape[2], dtype=q.dtype, device=device)

    def step():
        q.grad = k.grad = v.grad = None
        out = forward()
        out.backward(grad.view_as(out))

    return step, plan_s


class Timer:
    """CUDA events on a GPU; wall and process CPU time on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, step):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000
            return seconds, seconds
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        return time.perf_counter() - wall, time.process_time() - cpu


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _memory_case(backend, case, cu_seqlens, shape, dtype, queue):
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape[0], h, shape[3], dtype=dtype, requires_grad=True)
               for h in (shape[1], shape[2], shape[2]))
    step, _ = make_step(backend, case, cu_seqlens, q, k, v, torch.device("cpu"))
    base = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets the high-water mark (VmHWM)
        f.write("5")
    step()
    queue.put(max(0, _status_bytes("VmHWM") - base))


def cpu_peak_bytes(backend, case, cu_seqlens, shape, dtype):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_memory_case, args=(backend, case, cu_seqlens, shape, dtype, queue))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"the peak-memory process of {backend}/{case} failed "
                           f"(exit {p.exitcode})")
    return queue.get(timeout=5)


def bench_length(S, args, device, dtype, log=print) -> dict:
    docs = long_tailed_documents(S, args.mean_doc_length, args.seed)
    batch = pack_documents(docs, S, "anchor", anchor_token_id=1)
    lengths = batch.segment_lengths.tolist()
    ideal = sum(n * n for n in lengths) / S ** 2
    torch.manual_seed(args.seed)
    q, k, v = (torch.randn(S, h, args.head_dim, dtype=dtype, device=device, requires_grad=True)
               for h in (args.heads, args.query_groups, args.query_groups))
    cases = [(b, c) for b in args.backends for c in ("full", "anchor")]
    if args.naive and "local" in args.backends:
        cases += [("local", "naive"), ("local", "alone")]
    steps, plan_ms = {}, {}
    for backend, case in cases:
        steps[backend, case], plan_s = make_step(backend, case, batch.cu_seqlens, q, k, v, device)
        plan_ms[backend, case] = plan_s * 1000
        steps[backend, case]()  # warm-up (kernel selection, allocator)
    timer = Timer(device)
    walls = {c: [] for c in cases}
    cpus = {c: [] for c in cases}
    for _ in range(args.repeats):
        for c in cases:
            wall, cpu = timer(steps[c])
            walls[c].append(wall)
            cpus[c].append(cpu)
    row = dict(seq_length=S, segments=len(lengths), ideal_ratio=ideal,
               load_average=os.getloadavg()[0], backends={})
    flops = {"full": causal_attention_flops([S], args.heads, args.head_dim),
             "anchor": causal_attention_flops(lengths, args.heads, args.head_dim)}
    flops["naive"] = flops["alone"] = flops["anchor"]
    for backend in args.backends:
        out = {}
        for case in ("full", "anchor", "naive", "alone"):
            if (backend, case) not in walls:
                continue
            wall, cpu = statistics.median(walls[backend, case]), statistics.median(cpus[backend, case])
            out[case] = dict(seconds=wall, cpu_seconds=cpu, runs=walls[backend, case],
                             tflops=flops[case] / wall / 1e12, plan_ms=plan_ms[backend, case])
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                steps[backend, case]()
                torch.cuda.synchronize()
                out[case]["peak_mb"] = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
            elif args.memory and case != "alone":
                shape = (S, args.heads, args.query_groups, args.head_dim)
                out[case]["peak_mb"] = cpu_peak_bytes(backend, case, batch.cu_seqlens, shape,
                                                      dtype) / 2 ** 20
        for case in ("anchor", "naive", "alone"):
            if case in out:
                out[case]["ratio"] = out[case]["seconds"] / out["full"]["seconds"]
                out[case]["over_ideal"] = out[case]["ratio"] / ideal
                out[case]["cpu_ratio"] = out[case]["cpu_seconds"] / out["full"]["cpu_seconds"]
                out[case]["cpu_over_ideal"] = out[case]["cpu_ratio"] / ideal
        row["backends"][backend] = out
        a = out["anchor"]
        log(f"{S:>6} {len(lengths):>5} {ideal:>7.3f} {backend:>7} "
            f"{out['full']['seconds'] * 1000:>9.1f} {a['seconds'] * 1000:>9.1f} "
            f"{a['ratio']:>11.3f} {a['over_ideal']:>12.2f} {a['cpu_over_ideal']:>8.2f} "
            f"{out['full']['tflops']:>7.2f} {a['tflops']:>7.2f}"
            + (f" {out['naive']['over_ideal']:>11.2f} {out['alone']['cpu_over_ideal']:>9.2f}"
               if "naive" in out else "")
            + (f" {out['full'].get('peak_mb', float('nan')):>8.1f} "
               f"{a.get('peak_mb', float('nan')):>9.1f}"), flush=True)
    del q, k, v, steps
    return row


HEADER = (f"{'S':>6} {'docs':>5} {'ideal':>7} {'backend':>7} {'full ms':>9} {'anchor ms':>9} "
          f"{'anchor/full':>11} {'anchor/ideal':>12} {'cpu/idl':>8} {'TF full':>7} "
          f"{'TF anch':>7} {'naive/ideal':>11} {'alone/idl':>9} {'full MB':>8} {'anchor MB':>9}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--mean-doc-length", type=float, default=1500.0)
    parser.add_argument("--heads", type=int, default=4, help="query heads")
    parser.add_argument("--query-groups", type=int, default=2, help="K/V heads (GQA)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; figures are medians")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="default: fp32 on the CPU, bf16 on a GPU")
    parser.add_argument("--backends", nargs="+", choices=("local", "varlen", "te"), default=["local"])
    parser.add_argument("--no-naive", dest="naive", action="store_false",
                        help="skip the naive and alone reference cases")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="CPU: skip the per-case peak-memory processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return parser.parse_args(argv)


def resolve_device(args):
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    return device, dtype


def main(argv=None):
    args = parse_args(argv)
    device, dtype = resolve_device(args)
    if {"varlen", "te"} & set(args.backends) and device.type != "cuda":
        raise SystemExit("benchmarks/attention.py: --backends varlen/te need --device cuda")
    print(f"fwd+bwd, {args.heads} heads / {args.query_groups} groups, head dim {args.head_dim}, "
          f"{device.type} {str(dtype).replace('torch.', '')}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}, "
          f"load {os.getloadavg()[0]:.1f}")
    print(HEADER)
    rows = [bench_length(S, args, device, dtype) for S in args.seq_lengths]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=vars(args), device=device.type, dtype=str(dtype),
                           torch=torch.__version__, threads=torch.get_num_threads(),
                           omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                           planned_once=plan_attention is not None, rows=rows), f, indent=2)
    return rows


if __name__ == "__main__":
    main()

"""The GPU check: one prepared script that turns a lent GPU into figures (issue 19).

How to run it on the bare device machine (one H200, Python 3.12, torch 2.11+cu130, no
network, no megatron-core / Transformer Engine / pydantic; it gets a copy of this repo):

  1. here, once, before the call (.whl/ is git-ignored; ~26 MiB):
         mkdir -p .whl && cp -r ../shared/gpu/. .whl/
  2. the device `run` tool, one call:
         command: bash benchmarks/gpu_check.sh        carry: [".whl"]        timeout_s: 600
     gpu_check.sh installs megatron-core 0.19.2 (it ships megatron/training), all
     Transformer Engine wheels and pydantic with ONE `pip install --target /tmp/site`
     (shared/gpu/README.md: TE's wheels must go in together), sets
     PYTHONPATH=/tmp/site:$PWD and NVTE_FRAMEWORK=pytorch, runs this script with an
     8-minute budget and copies gpu_check.json and the logs to $OUT.

Stages, each in its own process with its own deadline (a crash or a hang costs that stage
only); the JSON is rewritten after every stage, and a stage's partial results are kept when
it is cut off, so a run that ends early still returns what it measured:

  env        versions, GPU, SDPA backend flags/choices, `te_smoke.py --require-fused`
             (TE is dropped for the later stages when it fails, import and all, so that
             Megatron-Core's non-TE fallbacks run; its FAIL line is recorded)
  ceilings   bf16 8192^3 matmul and a device-to-device copy (MFU against what the chip
             does, next to the 989 TFLOP/s datasheet peak)
  exactness  `local`, `varlen` and `te` (if it loaded) on CUDA against the FP64 reference:
             anchor windows with one-token documents, lengths = 64 mod 128, a document
             filling the window, one cut by it; GQA; head dims 64 and 128; outputs and
             q/k/v gradients; CP=2 simulated in one process (local, varlen); no host sync
             in a planned layer (torch.cuda.set_sync_debug_mode("error"))
  attention  forward+backward, full vs anchor, 16K/32K/64K BF16, per backend: TFLOP/s,
             anchor/full against the ideal sum (L_i+1)^2/S^2, CUDA-event timing
  train      a ~1B Llama-shaped model (16 layers, d=2048, 32/8 heads, FFN 8192, vocab
             128256) at 32K BF16, full and anchor, each backend that loaded: tokens/s,
             model TFLOP/s, MFU, peak memory; and the loss's peak memory at 32K x 128K
  pretrain   Megatron-LM's own pretrain() for a few iterations with our spec, model and
             dataset providers (megatron_anchor.training.megatron_lm), if time is left

  python benchmarks/gpu_check.py --json out.json            # on the GPU (what the .sh runs)
  python benchmarks/gpu_check.py --smoke --json out.json    # CPU, tiny shapes, every stage

`--smoke` runs every stage on the CPU with tiny shapes; what needs CUDA (the varlen and TE
kernels, CUDA events and memory counters, Megatron-LM's trainer) is skipped and says so in
the JSON and the output; `varlen` is checked there with the dense FP64 stand-in of
varlen_attn (bookkeeping only, labelled as such).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the sibling benchmarks (attention.py, train_step.py)
if os.environ.get("GPU_CHECK_WITHOUT_TE") == "1":
    # TE failed its smoke test: make `import transformer_engine` fail in this process, so
    # Megatron-Core falls back to its non-TE code (its optimizer would otherwise pick TE's
    # FusedAdam, whose kernels are the ones that did not run).
    sys.modules["transformer_engine"] = None

# (name, seconds) in order; each stage also stops at the overall budget.
STAGES = [("env", 75), ("ceilings", 40), ("exactness", 100), ("attention", 110),
          ("train", 170), ("pretrain", 120)]
BF16_TOLERANCE = 2.5e-2   # docs/design.md §3: TE's own BF16 tolerance
FP32_TOLERANCE = 1e-4
DATASHEET_TFLOPS = 989.0  # H100/H200 SXM dense BF16


def needs_cuda(what):
    return {"skipped": f"needs CUDA ({what})"}


# ----------------------------------------------------------------------------------------
# Stage: env
# ----------------------------------------------------------------------------------------

def stage_env(ctx, report):
    import importlib.metadata as md

    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__,
           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    for package in ("megatron-core", "transformer-engine", "transformers", "pydantic", "numpy"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(device=props.name, capability=f"sm_{props.major}{props.minor}",
                   memory_gib=round(props.total_memory / 2 ** 30, 1),
                   multiprocessors=props.multi_processor_count,
                   cudnn=torch.backends.cudnn.version())
        out["sdpa"] = sdpa_facts(torch)
    else:
        out["sdpa"] = needs_cuda("SDPA's CUDA backends")
    try:
        import torch.nn.attention.varlen  # noqa: F401
        out["varlen_attn"] = True
    except ImportError:
        out["varlen_attn"] = False
    report(out)
    out["te_smoke"] = run_te_smoke(ctx)
    report(out)
    return out


def sdpa_facts(torch):
    """Which SDPA backends are enabled and which one SDPA picks for typical calls."""
    from torch.nn.attention import SDPBackend

    facts = {"enabled": {name: bool(getattr(torch.backends.cuda, f"{name}_sdp_enabled")())
                         for name in ("flash", "mem_efficient", "cudnn", "math")}}
    order = getattr(torch._C, "_get_sdp_priority_order", None)
    if order is not None:
        try:
            facts["priority_order"] = [SDPBackend(int(i)).name for i in order()]
        except Exception as error:  # an API that changed between versions
            facts["priority_order"] = f"unavailable: {error}"
    # SDPBackend is a pybind11 enum on torch 2.11 (not iterable): read its members.
    names = {int(member): name for name, member in SDPBackend.__members__.items()}
    q = torch.randn(1, 32, 4096, 128, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
    mask = torch.zeros(1, 1, 4096, 4096, device="cuda", dtype=torch.bfloat16)
    choices = {}
    for label, args, kwargs in (
            ("bf16 causal MHA", (q, q, q), dict(is_causal=True)),
            ("bf16 causal GQA", (q, kv, kv), dict(is_causal=True, enable_gqa=True)),
            ("bf16 float mask", (q, q, q), dict(attn_mask=mask)),
            ("fp32 causal", (q.float(), q.float(), q.float()), dict(is_causal=True))):
        try:
            choices[label] = names.get(int(torch._fused_sdp_choice(*args, **kwargs)), "?")
        except Exception as error:
            choices[label] = f"error: {error}"
    facts["chosen"] = choices
    return facts


def run_te_smoke(ctx):
    """te_smoke.py --require-fused in its own process; the last line is OK or FAIL."""
    path = ctx["te_smoke"]
    if not os.path.exists(path):
        return {"ok": False, "line": f"TE_SMOKE FAIL setup: {path} not found"}
    result_path = os.path.join(ctx["workdir"], "te_smoke.json")
    try:
        proc = subprocess.run([sys.executable, path, "--require-fused", "--timeout", "90",
                               "--json", result_path], capture_output=True, text=True,
                              timeout=110)
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        last = lines[-1] if lines else f"TE_SMOKE FAIL run: no output (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        last = "TE_SMOKE FAIL run: te_smoke.py itself did not return within 110 s"
    out = {"ok": last.startswith("TE_SMOKE OK"), "line": last}
    if os.path.exists(result_path):
        with open(result_path) as f:
            out["json"] = json.load(f)
    print(last, flush=True)
    return out


# ----------------------------------------------------------------------------------------
# Stage: ceilings
# ----------------------------------------------------------------------------------------

def stage_ceilings(ctx, report):
    import torch

    from attention import Timer

    cuda = ctx["device"] == "cuda"
    device = torch.device(ctx["device"])
    timer = Timer(device)
    n = 8192 if cuda else 256
    dtype = torch.bfloat16 if cuda else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = sorted(timer(lambda: a @ b)[0] for _ in range(10 if cuda else 3))
    out = {"matmul": {"n": n, "dtype": str(dtype), "tflops": 2 * n ** 3 / times[len(times) // 2] / 1e12,
                      "best_tflops": 2 * n ** 3 / times[0] / 1e12,
                      "datasheet_tflops": DATASHEET_TFLOPS if cuda else None}}
    report(out)
    del a, b
    nbytes = 4 * 2 ** 30 if cuda else 64 * 2 ** 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = sorted(timer(lambda: dst.copy_(src))[0] for _ in range(10 if cuda else 3))
    out["copy"] = {"bytes": nbytes, "gb_per_s": 2 * nbytes / times[len(times) // 2] / 1e9,
                   "note": "bytes read + bytes written per second"}
    if not cuda:
        out["note"] = "CPU smoke: tiny sizes, plumbing only"
    report(out)
    return out


# ----------------------------------------------------------------------------------------
# Stage: exactness
# ----------------------------------------------------------------------------------------

def exactness_windows(cp, smoke):
    """The edge-case anchor windows (S slots each), packed for CP size `cp`."""
    from megatron_anchor.layout import pack_documents

    S = 128 if smoke else 2048
    rng = __import__("random").Random(cp)
    docs = lambda lengths: [[2 + (7 * i) % 97 for i in range(n)] for n in lengths]
    cases = {
        "random": [rng.choice([1, 7, 64, 191, 300, 900]) for _ in range(40)],
        "one-token docs": [1] * S,
        "lengths 64 mod 128": [63, 191, 319, 447, 575, 703][: 1 if smoke else 6],
        "doc filling the window": [S - 1],
        "doc cut by the window": [S // 10, 3 * S],
    }
    return {name: pack_documents(docs(lengths), S, "anchor", anchor_token_id=1, cp_size=cp)
            for name, lengths in cases.items()}


def errors_against(reference, result):
    from megatron_anchor.attention.reference import relative_error

    import torch

    out = {name: relative_error(got, want) for name, got, want in
           zip(("out", "dq", "dk", "dv"), result, reference)}
    out["finite"] = all(bool(torch.isfinite(x).all()) for x in result)
    return out


def stage_exactness(ctx, report):
    import torch

    from megatron_anchor.attention import local, varlen
    from megatron_anchor.attention.reference import (
        dense_varlen_attn, reference_with_grads, simulated_cp,
    )

    cuda = ctx["device"] == "cuda"
    device = torch.device(ctx["device"])
    kernel = None if cuda else dense_varlen_attn
    varlen_name = "varlen" if cuda else "varlen (dense FP64 stand-in: CPU smoke, bookkeeping only)"
    out = {"tolerance": {"bf16": BF16_TOLERANCE, "fp32": FP32_TOLERANCE}, "results": [],
           "failures": []}
    if not cuda:
        out["te"] = needs_cuda("Transformer Engine")
    te_attention = None
    if cuda and ctx["te_ok"]:
        import transformer_engine.pytorch as te

        te_attention = te.DotProductAttention
    # (query heads, key/value heads, head dim): GQA at 64 and 128, and MHA.
    configs = [(8, 2, 64), (8, 2, 128), (4, 4, 128)] if cuda else [(4, 2, 16), (2, 2, 32)]
    dtypes = [torch.bfloat16, torch.float32] if cuda else [torch.float32]

    def record(entry, tolerance):
        entry["pass"] = entry["finite"] and max(entry[k] for k in ("out", "dq", "dk", "dv")) <= tolerance
        out["results"].append(entry)
        if not entry["pass"]:
            out["failures"].append({k: entry[k] for k in ("backend", "case", "heads", "head_dim", "dtype", "cp")})

    for cp in (1, 2):
        for case, batch in exactness_windows(cp, ctx["smoke"]).items():
            batch = batch.to(device)
            S = batch.seq_length
            for heads, groups, dim in configs:
                g = torch.Generator(device=device).manual_seed(heads + dim + cp)
                q0, k0, v0, grad0 = (torch.randn(S, h, dim, device=device, generator=g)
                                     for h in (heads, groups, groups, heads))
                reference = reference_with_grads(q0, k0, v0, batch.cu_seqlens, grad0)
                for dtype in dtypes:
                    q, k, v, grad = (x.to(dtype) for x in (q0, k0, v0, grad0))
                    tolerance = FP32_TOLERANCE if dtype == torch.float32 else BF16_TOLERANCE
                    base = {"case": case, "heads": heads, "groups": groups, "head_dim": dim,
                            "dtype": str(dtype).replace("torch.", ""), "cp": cp}
                    runs = {"local": lambda: run_local(local, q, k, v, grad, batch, cp, device,
                                                       simulated_cp)}
                    if dtype != torch.float32 or not cuda:
                        runs[varlen_name] = lambda: run_varlen(varlen, q, k, v, grad, batch, cp,
                                                               device, kernel, simulated_cp)
                    if te_attention is not None and cp == 1 and dtype != torch.float32:
                        runs["te"] = lambda: run_te(te_attention, q, k, v, grad, batch)
                    for name, run in runs.items():
                        try:
                            entry = dict(base, backend=name, **errors_against(reference, run()))
                        except Exception as error:
                            entry = dict(base, backend=name, error=f"{type(error).__name__}: {error}"[:300],
                                         finite=False, out=1.0, dq=1.0, dk=1.0, dv=1.0)
                        record(entry, tolerance)
            report(out)
    if cp and te_attention is not None:
        out["te_cp"] = "not checked: TE's CP needs a process group of 2+ GPUs"
    out["host_sync"] = check_no_host_sync(local, varlen, device) if cuda else \
        needs_cuda("torch.cuda.set_sync_debug_mode")
    out["passed"] = not out["failures"]
    report(out)
    return out


def run_local(local, q, k, v, grad, batch, cp, device, simulated_cp):
    plans = [local.plan_attention(batch.cu_seqlens, cp, r, device=device, dtype=q.dtype)
             for r in range(cp)]
    if cp == 1:
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o = local.packed_causal_attention(*leaves, batch.cu_seqlens, plan=plans[0])
        o.backward(grad)
        return [o] + [x.grad for x in leaves]

    def attend(rank, q_local, k_all, v_all):
        rows = plans[rank].k_rows
        return local.attend_planned(q_local, k_all.index_select(0, rows),
                                    v_all.index_select(0, rows), plans[rank])
    return simulated_cp(attend, q, k, v, batch.cu_seqlens, grad, cp)


def run_varlen(varlen, q, k, v, grad, batch, cp, device, kernel, simulated_cp):
    plans = [varlen.plan_varlen(batch.cu_seqlens, cp, r, device=device) for r in range(cp)]
    if cp == 1:
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o = varlen.varlen_packed_attention(*leaves, plans[0], kernel=kernel)
        o.backward(grad)
        return [o] + [x.grad for x in leaves]

    def attend(rank, q_local, k_all, v_all):
        rows = plans[rank].key_rows
        return varlen.varlen_attention(q_local, k_all.index_select(0, rows),
                                       v_all.index_select(0, rows), plans[rank], kernel=kernel)
    return simulated_cp(attend, q, k, v, batch.cu_seqlens, grad, cp)


def run_te(te_attention, q, k, v, grad, batch):
    attn = te_attention(num_attention_heads=q.shape[1], kv_channels=q.shape[2],
                        num_gqa_groups=k.shape[1], attention_dropout=0.0, qkv_format="thd",
                        attn_mask_type="padding_causal")
    cu = batch.cu_seqlens.to(dtype=__import__("torch").int32)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = attn(*leaves, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=batch.max_seqlen,
             max_seqlen_kv=batch.max_seqlen)
    o.backward(grad.reshape(o.shape))
    return [o.view_as(q)] + [x.grad for x in leaves]


def check_no_host_sync(local, varlen, device):
    """A planned layer, forward and backward, under torch.cuda.set_sync_debug_mode('error')."""
    import torch

    from megatron_anchor.layout import pack_documents

    batch = pack_documents([[5] * n for n in (1, 7, 300, 64, 900, 2, 191)], 2048, "anchor",
                           anchor_token_id=1).to(device)
    q, k, v = (torch.randn(2048, h, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
               for h in (8, 2, 2))
    out = {}
    for name, plan, call in (
            ("local", local.plan_attention(batch.cu_seqlens, device=device, dtype=q.dtype),
             lambda p: local.packed_causal_attention(q, k, v, batch.cu_seqlens, plan=p)),
            ("varlen", varlen.plan_varlen(batch.cu_seqlens, device=device),
             lambda p: varlen.varlen_packed_attention(q, k, v, p))):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            call(plan).sum().backward()
            out[name] = "no host sync"
        except Exception as error:
            out[name] = f"SYNC: {type(error).__name__}: {error}"[:300]
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return out


# ----------------------------------------------------------------------------------------
# Stage: attention
# ----------------------------------------------------------------------------------------

def stage_attention(ctx, report):
    import torch

    import attention as bench

    cuda = ctx["device"] == "cuda"
    backends = ["local"] + (["varlen"] + (["te"] if ctx["te_ok"] else []) if cuda else [])
    lengths = [16384, 32768, 65536] if cuda else [256, 512]
    argv = ["--seq-lengths", *map(str, lengths), "--backends", *backends, "--repeats", "3",
            "--no-memory", "--device", ctx["device"]]
    argv += (["--heads", "32", "--query-groups", "8", "--head-dim", "128", "--dtype", "bf16"]
             if cuda else ["--heads", "4", "--query-groups", "2", "--head-dim", "16",
                           "--mean-doc-length", "60"])
    args = bench.parse_args(argv)
    device, dtype = bench.resolve_device(args)
    out = {"argv": argv, "rows": []}
    if not cuda:
        out["varlen"] = needs_cuda("varlen_attn")
        out["te"] = needs_cuda("Transformer Engine")
        out["timing"] = "CPU smoke: wall clock, tiny shapes"
    print(bench.HEADER, flush=True)
    for S in lengths:
        out["rows"].append(bench.bench_length(S, args, device, dtype))
        report(out)
        if cuda:
            torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------------
# Stage: train
# ----------------------------------------------------------------------------------------

def stage_train(ctx, report):
    import torch

    import train_step as bench
    from megatron_anchor import runtime
    from megatron_anchor.model import ModelConfig

    cuda = ctx["device"] == "cuda"
    runtime.initialize(1, 1, cpu=not cuda, seed=1)
    out = {"runs": []}
    if cuda:
        out["loss_memory"] = loss_memory(torch)
        report(out)
    seq = 32768 if cuda else 256
    shape = (dict(num_layers=16, hidden_size=2048, num_attention_heads=32, num_query_groups=8,
                  ffn_hidden_size=8192, vocab_size=128256) if cuda else
             dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=128, vocab_size=512))
    backends = (["varlen"] + (["te"] if ctx["te_ok"] else []) + ["local"]) if cuda else ["local"]
    if not cuda:
        out["varlen"] = needs_cuda("varlen_attn")
        out["te"] = needs_cuda("Transformer Engine")
        out["memory"] = "CPU smoke: no CUDA memory counters"
    peaks = {"datasheet": DATASHEET_TFLOPS}
    if ctx.get("matmul_tflops"):
        peaks["measured_matmul"] = ctx["matmul_tflops"]
    docs = bench.documents(seq, 0, shape["vocab_size"])
    out["model"] = dict(shape, seq_length=seq, bf16=True)
    for backend in backends:
        for variant in ("full", "anchor"):
            cfg = ModelConfig(**shape, max_sequence_length=seq, bf16=True,
                              attention_backend=backend)
            entry = {"backend": backend, "variant": variant}
            try:
                entry.update(bench.measure_step(cfg, seq, variant, docs, steps=3 if cuda else 1,
                                                warmup=1, peak_tflops=DATASHEET_TFLOPS if cuda else None))
                entry["mfu"] = {k: entry["tflops_per_rank"] / v for k, v in peaks.items()} \
                    if cuda else None
            except Exception as error:
                entry["error"] = f"{type(error).__name__}: {error}"[:400]
                entry["traceback"] = traceback.format_exc()[-2000:]  # where, for the next fix
                if cuda:
                    torch.cuda.empty_cache()
            out["runs"].append(entry)
            print(f"train {backend:>6} {variant:>6}: " + (
                f"{entry['tokens_per_s']:,.0f} tokens/s, {entry['tflops_per_rank']:.1f} TFLOP/s, "
                f"peak {entry.get('peak_gib') or float('nan'):.1f} GiB" if "error" not in entry
                else entry["error"]), flush=True)
            report(out)
    runtime.destroy()
    return out


def loss_memory(torch):
    """Peak memory of the loss alone at 32K tokens x 128K vocabulary (BF16 logits): the
    chunked cross entropy against Megatron-Core's on an FP32 copy (what it replaced)."""
    from megatron.core import tensor_parallel

    from megatron_anchor.model import vocab_parallel_cross_entropy

    out = {}
    T, V = 32768, 128256
    labels = torch.randint(0, V, (T,), device="cuda")
    for name in ("megatron_fp32_copy", "chunked"):
        logits = torch.randn(T, V, device="cuda", dtype=torch.bfloat16).requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        started = time.perf_counter()
        if name == "chunked":
            loss = vocab_parallel_cross_entropy(logits, labels)
        else:
            loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float()[:, None],
                                                                labels[:, None])[:, 0]
        loss.sum().backward()
        torch.cuda.synchronize()
        out[name] = {"peak_above_logits_gib": (torch.cuda.max_memory_allocated() - before) / 2 ** 30,
                     "seconds": time.perf_counter() - started}
        del logits, loss
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------------
# Stage: pretrain (Megatron-LM's trainer)
# ----------------------------------------------------------------------------------------

PRETRAIN_ARGV = [
    "--num-layers", "4", "--hidden-size", "512", "--num-attention-heads", "8",
    "--group-query-attention", "--num-query-groups", "4", "--ffn-hidden-size", "1408",
    "--seq-length", "4096", "--max-position-embeddings", "4096", "--micro-batch-size", "1",
    "--global-batch-size", "2", "--spec", "megatron_anchor.megatron_lm_spec", "anchor_layer_spec",
    "--position-embedding-type", "none", "--rotary-base", "500000", "--normalization", "RMSNorm",
    "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--transformer-impl", "local", "--calculate-per-token-loss", "--attention-dropout", "0",
    "--hidden-dropout", "0", "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
    "--no-bias-swiglu-fusion", "--no-rope-fusion", "--bf16",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "300", "--lr", "1e-4",
    "--train-iters", "5", "--log-interval", "1", "--eval-iters", "0", "--split", "100,0,0",
    "--dataloader-type", "external", "--attention-variant", "anchor", "--anchor-token-id", "1",
    "--no-persist-layer-norm",
]


def stage_pretrain(ctx, report):
    from megatron_anchor.training import megatron_lm

    if not megatron_lm.megatron_lm_available():
        return {"skipped": "megatron.training is not importable (megatron-core < 0.19)"}
    if ctx["device"] != "cuda":
        return needs_cuda("Megatron-LM's pretrain() initialises NCCL and CUDA")
    prefix = byte_corpus(ctx["workdir"])
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29500 + os.getpid() % 1000), CUDA_DEVICE_MAX_CONNECTIONS="1")
    argv = PRETRAIN_ARGV + ["--data-path", prefix]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--pretrain-child", *argv],
                          env=env, capture_output=True, text=True,
                          timeout=max(30, ctx["deadline"] - time.time() - 10))
    lines = (proc.stdout + proc.stderr).splitlines()
    iterations = [line.strip() for line in lines if "iteration" in line and "lm loss" in line]
    out = {"returncode": proc.returncode, "seconds": time.perf_counter() - started,
           "iterations": iterations, "argv": argv, "tail": lines[-25:]}
    report(out)
    return out


def pretrain_child(argv):
    """Megatron-LM's pretrain() with our spec, model provider, dataset provider (this rank's
    micro-batch iterators, for --dataloader-type external) and forward step."""
    from megatron_anchor.training import megatron_lm

    megatron_lm.pretrain_main(argv)
    return 0


def byte_corpus(workdir):
    """A small indexed dataset of Python sources (ByteTokenizer ids), made on the spot."""
    import glob
    import sysconfig

    from megatron_anchor.cli.preprocess_data import main as preprocess

    jsonl = os.path.join(workdir, "corpus.jsonl")
    with open(jsonl, "w", encoding="utf-8") as f:
        for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:80]:
            with open(path, encoding="utf-8", errors="replace") as source:
                text = source.read()[:20000]
            if text.strip():
                f.write(json.dumps({"text": text}) + "\n")
    preprocess(["--input", jsonl, "--output-prefix", os.path.join(workdir, "corpus"),
                "--tokenizer-type", "ByteTokenizer", "--append-eod"])
    return os.path.join(workdir, "corpus_text_document")


# ----------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------

STAGE_FUNCTIONS = {"env": stage_env, "ceilings": stage_ceilings, "exactness": stage_exactness,
                   "attention": stage_attention, "train": stage_train, "pretrain": stage_pretrain}


def run_stage_child(name, ctx_path, result_path):
    """In the stage's own process: run it, writing its (partial) result after each step."""
    import warnings

    warnings.filterwarnings("ignore")
    with open(ctx_path) as f:
        ctx = json.load(f)

    def report(value):
        tmp = result_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(value, f, indent=1, default=str)
        os.replace(tmp, result_path)

    result = STAGE_FUNCTIONS[name](ctx, report)
    report(result)


def write_json(path, doc):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, every stage")
    parser.add_argument("--json", default="gpu_check.json", help="results (rewritten per stage)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all stages")
    parser.add_argument("--stages", nargs="+", choices=[s for s, _ in STAGES],
                        default=[s for s, _ in STAGES])
    parser.add_argument("--te-smoke", default=os.path.join(".whl", "te_smoke.py"),
                        help="Transformer Engine's smoke test (shared/gpu/te_smoke.py)")
    parser.add_argument("--workdir", help="scratch files (default: next to --json)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--ctx", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        run_stage_child(args.stage, args.ctx, args.result)
        return 0

    import torch

    started = time.time()
    cuda = torch.cuda.is_available() and not args.smoke
    workdir = os.path.abspath(args.workdir or os.path.splitext(args.json)[0] + "_work")
    os.makedirs(workdir, exist_ok=True)
    ctx = {"device": "cuda" if cuda else "cpu", "smoke": args.smoke, "te_ok": False,
           "te_smoke": os.path.abspath(args.te_smoke), "workdir": workdir}
    doc = {"issue": 19, "mode": "smoke (CPU)" if args.smoke else ("gpu" if cuda else "cpu"),
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": args.budget,
           "stages": {}}
    if not cuda and not args.smoke:
        print("gpu_check: no CUDA device visible; running the CPU smoke shapes", flush=True)
        ctx["smoke"] = True
    for name, own in STAGES:
        if name not in args.stages:
            continue
        left = args.budget - (time.time() - started)
        if left < 10:
            doc["stages"][name] = {"status": "not started", "reason": "budget spent"}
            write_json(args.json, doc)
            continue
        limit = min(own, left)
        ctx["deadline"] = time.time() + limit
        ctx_path = os.path.join(workdir, "ctx.json")
        result_path = os.path.join(workdir, f"stage_{name}.json")
        write_json(ctx_path, ctx)
        if os.path.exists(result_path):
            os.remove(result_path)
        print(f"== stage {name} (deadline {limit:.0f} s)", flush=True)
        t0 = time.time()
        status, error = "ok", None
        env = dict(os.environ)
        if name != "env" and not ctx["te_ok"]:
            env["GPU_CHECK_WITHOUT_TE"] = "1"
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--stage", name,
                                   "--ctx", ctx_path, "--result", result_path],
                                  timeout=limit, stderr=subprocess.PIPE, text=True, env=env)
            if proc.returncode != 0:
                status, error = "failed", proc.stderr[-3000:]
            elif proc.stderr.strip():
                sys.stderr.write(proc.stderr[-2000:])
        except subprocess.TimeoutExpired as expired:
            status, error = "timed out", f"cut at its {limit:.0f} s deadline"
            if expired.stderr:
                sys.stderr.write(str(expired.stderr)[-2000:])
        result = {}
        if os.path.exists(result_path):
            with open(result_path) as f:
                result = json.load(f)
        entry = {"status": status, "seconds": round(time.time() - t0, 1), "result": result}
        if error:
            entry["error"] = error
            print(f"   stage {name}: {status}\n{error[-1500:]}", flush=True)
        if isinstance(result, dict) and "skipped" in result:
            entry["status"] = "skipped"
            print(f"   stage {name} skipped: {result['skipped']}", flush=True)
        doc["stages"][name] = entry
        if name == "env":
            ctx["te_ok"] = bool(result.get("te_smoke", {}).get("ok")) and cuda
            doc["te_loaded"] = ctx["te_ok"]
            if not ctx["te_ok"]:
                doc["te_dropped"] = result.get("te_smoke", {}).get("line", "te_smoke did not run")
        if name == "ceilings" and status == "ok":
            ctx["matmul_tflops"] = result.get("matmul", {}).get("tflops")
        doc["elapsed_s"] = round(time.time() - started, 1)
        write_json(args.json, doc)
    unfinished = [n for n, e in doc["stages"].items() if e["status"] not in ("ok", "skipped")]
    doc["unfinished"] = unfinished
    write_json(args.json, doc)
    print(f"gpu_check: {doc['elapsed_s']:.0f} s; stages: " + ", ".join(
        f"{n} {e['status']} ({e.get('seconds', 0):.0f} s)" for n, e in doc["stages"].items()))
    print("gpu_check: did not finish: " + (", ".join(unfinished) if unfinished else "none"))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--pretrain-child"]:
        sys.exit(pretrain_child(sys.argv[2:]))
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)

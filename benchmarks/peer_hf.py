"""Our training step against what an HF-based user runs, side by side (CPU or GPU).

The peer is transformers' `LlamaForCausalLM` of the same shape with the same weights (ours
copied over by the converter's rules, `megatron_anchor.convert.mapping`), fed the same
packed anchor window (tokens, explicit position ids) with the anchor visibility as a 4-D
additive mask on SDPA (`attn_implementation="sdpa"`), the same loss (per-token cross
entropy on our labels, masked by our loss mask, mean over trained tokens) and AdamW with
our hyper-parameters and clipping. Ours is the project's Megatron-Core step (DDP buffers,
Megatron's optimizer, the `local` backend or `--attention-backend`).

First the two losses are checked to agree in FP32 (to rounding) on the window; then the two
steps alternate, `--steps` times each after a warm-up, and the medians are compared:
`ratio` = peer step time / our step time (above 1: ours is faster).

    python benchmarks/peer_hf.py --seq-lengths 4096 8192 16384 --json out.json
    python benchmarks/peer_hf.py --bf16 --seq-lengths 16384 32768 --num-layers 16 \
        --hidden-size 2048 --heads 32 --query-groups 8 --ffn-hidden-size 8192 --vocab 32768

transformers is a test/benchmark dependency: this script imports it, the package does not.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from train_step import documents


def ours_config(args, seq_length, bf16):
    from megatron_anchor.model import ModelConfig

    if args.vocab % 128:
        raise SystemExit("peer_hf.py: --vocab must be a multiple of 128, so that our padded "
                         "vocabulary equals the peer's and both softmaxes cover the same rows")
    return ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                       num_attention_heads=args.heads,
                       num_query_groups=args.query_groups or args.heads // 2,
                       ffn_hidden_size=args.ffn_hidden_size, vocab_size=args.vocab,
                       max_sequence_length=seq_length, rotary_base=args.rotary_base, bf16=bf16,
                       attention_backend=args.attention_backend)


def peer_model(cfg, gpt, device, dtype):
    """LlamaForCausalLM of cfg's shape holding `gpt`'s weights."""
    import transformers

    from megatron_anchor.convert.hf_config import hf_config_from_model_config
    from megatron_anchor.convert.mapping import rules

    hf = hf_config_from_model_config(cfg)
    hf.pop("architectures", None)
    hf.pop("model_type", None)
    config = transformers.LlamaConfig(**hf)
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    ours = {k: v for k, v in gpt.state_dict().items() if "_extra_state" not in k}
    state = {}
    for rule in rules(cfg, ours.keys()):
        for name, value in zip(rule.hf, rule.to_hf(ours[rule.megatron].detach())):
            state[name] = value.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True)
    return model


def anchor_mask(batch, dtype, device):
    """[1, 1, S, S] additive mask: 0 where the anchor layout lets a query see a key."""
    from megatron_anchor.attention.reference import segment_causal_visibility

    visible = segment_causal_visibility(batch.cu_seqlens.to(device))
    mask = torch.zeros(visible.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)[None, None]


def peer_loss(model, batch, mask):
    logits = model(input_ids=batch.tokens[None], position_ids=batch.position_ids[None],
                   attention_mask=mask).logits[0]
    per_token = F.cross_entropy(logits.float(), batch.labels, reduction="none")
    weights = batch.loss_mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum()


def ours_loss(gpt, batch):
    from megatron_anchor.model import forward_packed

    _, per_token = forward_packed(gpt, batch, return_logits=False)
    weights = batch.loss_mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_losses(args, seq_length, batch, device) -> dict:
    """Both models in FP32 on the same window: the two losses must agree to rounding."""
    from megatron_anchor import runtime
    from megatron_anchor.model import build_model

    cfg = ours_config(args, seq_length, bf16=False)
    runtime.manual_seed(args.seed)
    gpt = build_model(cfg).to(device)
    # Megatron's init (std 0.02) leaves attention nearly uniform and its share of the loss
    # below FP32 resolution; larger weights make a wrong mask or weight copy show.
    g = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            noise = torch.randn(p.shape, generator=g, device=device)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.08 * noise)
    peer = peer_model(cfg, gpt, device, torch.float32)
    with torch.no_grad():
        ours = float(ours_loss(gpt, batch))
        theirs = float(peer_loss(peer, batch, anchor_mask(batch, torch.float32, device)))
    del gpt, peer
    release(device)
    rel = abs(ours - theirs) / abs(ours)
    if rel > args.loss_tolerance:
        raise SystemExit(f"peer_hf.py: losses disagree at S={seq_length}: ours {ours:.7f}, "
                         f"peer {theirs:.7f} (relative {rel:.2e} > {args.loss_tolerance})")
    return {"ours": ours, "peer": theirs, "relative_difference": rel}


def bench(seq_length, args, device, bf16) -> dict:
    from megatron_anchor import runtime
    from megatron_anchor.layout import pack_documents
    from megatron_anchor.training.config import TrainConfig
    from megatron_anchor.training.model_setup import build_training_components
    from megatron_anchor.training.train import train_step

    batch = pack_documents(documents(seq_length, args.seed, args.vocab), seq_length, "anchor",
                           anchor_token_id=1).to(device)
    row = {"seq_length": seq_length, "segments": batch.num_segments,
           "loss_check": check_losses(args, seq_length, batch, device)}
    cfg = TrainConfig(model=ours_config(args, seq_length, bf16))
    cfg.data.seq_length, cfg.data.micro_batch_size, cfg.data.global_batch_size = seq_length, 1, 1
    cfg.optim.lr, cfg.optim.train_iters = 1e-4, 1000
    cfg.parallel.cpu = runtime.is_cpu()
    runtime.manual_seed(args.seed)
    components = build_training_components(cfg)
    dtype = torch.bfloat16 if bf16 else torch.float32
    peer = peer_model(cfg.model, components.module, device, dtype)
    o = cfg.optim
    optimizer = torch.optim.AdamW(peer.parameters(), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2),
                                  eps=o.adam_eps, weight_decay=o.weight_decay)
    mask = anchor_mask(batch, dtype, device)

    def ours_step():
        return train_step(components, [batch], cfg)["loss"]

    def peer_step():
        optimizer.zero_grad(set_to_none=True)
        loss = peer_loss(peer, batch, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peer.parameters(), o.clip_grad)
        optimizer.step()
        return float(loss)

    times = {"ours": [], "peer": []}
    losses = {"ours": [], "peer": []}
    for i in range(args.warmup + args.steps):
        for name, step in (("ours", ours_step), ("peer", peer_step)):
            sync(device)
            started = time.perf_counter()
            losses[name].append(step())
            sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - started)
    for name in ("ours", "peer"):
        median = statistics.median(times[name])
        row[name] = {"step_s": median, "runs": times[name], "tokens_per_s": seq_length / median,
                     "losses": losses[name]}
    row["ratio"] = row["peer"]["step_s"] / row["ours"]["step_s"]
    row["load_average"] = os.getloadavg()[0]
    del components, peer, optimizer, mask
    release(device)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--query-groups", type=int, default=None, help="default: heads / 2")
    parser.add_argument("--ffn-hidden-size", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=1024, help="a multiple of 128")
    parser.add_argument("--rotary-base", type=float, default=500000.0)
    parser.add_argument("--attention-backend", default="local")
    parser.add_argument("--bf16", action="store_true", help="time both in BF16 (the loss "
                        "check stays FP32)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss-tolerance", type=float, default=1e-5,
                        help="relative FP32 loss difference allowed before timing")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")
    import transformers

    from megatron_anchor import runtime

    runtime.initialize(1, 1, cpu=None, seed=args.seed)
    device = runtime.device()
    print(f"ours ({args.attention_backend}, Megatron-Core) vs transformers {transformers.__version__} "
          f"LlamaForCausalLM (SDPA, 4-D anchor mask), {device.type}, "
          f"{'bf16' if args.bf16 else 'fp32'}, {torch.get_num_threads()} threads, "
          f"median of {args.steps}")
    print(f"{'S':>6} {'docs':>5} {'loss ours':>10} {'loss peer':>10} {'rel diff':>9} "
          f"{'ours s':>8} {'peer s':>8} {'peer/ours':>9} {'load':>5}")
    rows = []
    try:
        for S in args.seq_lengths:
            row = bench(S, args, device, args.bf16)
            rows.append(row)
            c = row["loss_check"]
            print(f"{S:>6} {row['segments']:>5} {c['ours']:>10.6f} {c['peer']:>10.6f} "
                  f"{c['relative_difference']:>9.1e} {row['ours']['step_s']:>8.3f} "
                  f"{row['peer']['step_s']:>8.3f} {row['ratio']:>9.2f} "
                  f"{row['load_average']:>5.1f}", flush=True)
    finally:
        runtime.destroy()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "device": device.type,
                       "transformers": transformers.__version__, "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()

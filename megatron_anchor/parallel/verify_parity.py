"""Check that every parallel layout computes the same numbers (DESIGN §3, "Parity").

Run the same model weights on the same packed window in several TP×CP layouts, gather the
full logits on rank 0, and compare each layout with the first one, per attention variant
and dtype. Launch with as many processes as the largest TP×CP; every layout runs over the
whole world, with the ranks it does not need as data-parallel replicas that sit out::

    torchrun --nproc-per-node 4 tools/verify_parity.py --cpu \\
        --layouts tp1cp1,tp2cp1,tp1cp2,tp2cp2 --variants anchor,full --dtypes fp32,bf16 \\
        --seq-length 4096 --num-layers 2 --hidden-size 256 --num-attention-heads 8 \\
        --num-query-groups 4 --vocab-size 1024

Weights: `--load DIR` (a Megatron distributed checkpoint; every layout loads it with its
own TP sharding) or, without it, a model initialised from `--seed` once at TP=1 and cut
into each layout's TP shards in memory with Megatron's own split.

Batch: one window of `--seq-length` slots, packed once with padding for the least common
multiple of the layouts' CP sizes (so every layout sees the identical THD batch), from a
dataset (`--data-path`) or from synthetic documents (`--doc-length-dist`).

Columns of the table (each layout against the reference, the first layout):

* max|Δlogit|, mean|Δlogit|: over all window slots and the real vocabulary;
* rel: max|Δlogit| / max|logit of the reference|, the figure checked against the tolerance;
* top-1: share of slots whose arg-max token agrees;
* |Δloss|: the masked mean loss of the window (its relative value is also checked);
* Δ‖g‖: relative difference of the gradient norm after one backward pass;
* Δg (with --compare-grads): max |Δ gradient| / max |reference gradient| over all weights.

Exit status: 0 when every figure is within tolerance (`--fp32-rtol` for fp32 runs,
`--bf16-tol` for bf16 runs), 1 when one is not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_anchor.parallel.layouts import (
    Layout, check_world_size, common_cp_multiple, is_first_replica, parse_layouts, use_layout,
    world_rank,
)
from megatron_anchor.parallel.te_cp import CP_COMM_TYPES, check_te_cp_comm_type

# Megatron-Core (and everything of ours that imports it) is imported inside the functions
# that need it, after argument parsing, so --help answers at once.

DTYPES = ("fp32", "bf16")
VARIANT_NAMES = "full, intra-doc, intra-doc-reset, anchor"
MODEL_CONFIG_FILE = "model_config.json"


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

READING_GUIDE = """\
reading the table (each layout against the first, per variant and dtype):
  max|Δlogit|, mean|Δlogit|  over every window slot and the real vocabulary
  rel      max|Δlogit| / max|reference logit|, checked against the tolerance
  top-1    share of slots whose arg-max token agrees
  |Δloss|  masked mean loss of the window (checked relative to the loss)
  Δ‖g‖     relative difference of the gradient norm after one backward (checked)
  Δg       with --compare-grads: max|Δ gradient| / max|reference gradient| (checked)
expected: 0 where the arithmetic is the same; ~1e-7 (fp32 rounding) where only the
order of a reduction changes (TP all-reduce, CP gradient sums); a few bf16 ulps in
bf16. A wrong CP layout or TP split shows up as rel >> 1e-3 and low top-1.
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                     argparse.RawDescriptionHelpFormatter):
    """Defaults in the option help, and the reading guide kept as written."""

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-anchor-verify-parity",
        description="Compare logits, loss and gradients of one model and one packed window "
                    "across tensor/context-parallel layouts. Launch with torchrun and as many "
                    "processes as the largest TP×CP (other layouts use the extra ranks as "
                    "idle data-parallel replicas). Exit status 1 when a difference exceeds "
                    "its tolerance.",
        epilog=READING_GUIDE,
        formatter_class=_HelpFormatter,
    )
    run = parser.add_argument_group("what to compare")
    run.add_argument("--layouts", default="tp1cp1,tp2cp1,tp1cp2,tp2cp2",
                     help="comma-separated tp<N>cp<M> layouts; the first is the reference")
    run.add_argument("--variants", default="anchor,full",
                     help=f"comma-separated attention variants out of {VARIANT_NAMES}")
    run.add_argument("--dtypes", default="fp32,bf16",
                     help="comma-separated parameter/activation dtypes: fp32, bf16")
    run.add_argument("--fp32-rtol", type=float, default=1e-5,
                     help="fp32 tolerance on max|Δlogit|/max|logit|, |Δloss|/loss, Δ‖g‖/‖g‖ "
                          "(and Δg with --compare-grads): reduction-order rounding")
    run.add_argument("--bf16-tol", type=float, default=2.5e-2,
                     help="the same tolerance for bf16 runs (Transformer Engine's own bf16 "
                          "test tolerance)")
    run.add_argument("--compare-grads", action="store_true",
                     help="also gather every full gradient on rank 0 and report max|Δg|/max|g| "
                          "(memory: a full FP32 copy of the model's gradients per layout)")
    run.add_argument("--json", metavar="FILE", help="also write the table and settings as JSON")
    run.add_argument("--debug-wrong-cp-chunks", action="store_true", help=argparse.SUPPRESS)

    system = parser.add_argument_group("where it runs")
    system.add_argument("--cpu", action="store_true",
                        help="run on CPU over gloo (local attention backend only)")
    system.add_argument("--attention-backend", choices=("local", "te"), default="local",
                        help="core attention: pure-PyTorch local, or Transformer Engine (GPU)")
    system.add_argument("--cp-comm-type", choices=CP_COMM_TYPES, default="p2p",
                        help="Transformer Engine's CP communication (te backend); the local "
                             "backend always all-gathers K/V")
    system.add_argument("--sequence-parallel", action="store_true",
                        help="Megatron sequence parallelism in TP layouts (te backend only)")

    model = parser.add_argument_group(
        f"model (with --load, {MODEL_CONFIG_FILE} in the checkpoint directory wins over these)")
    model.add_argument("--load", metavar="DIR",
                       help="Megatron distributed checkpoint to take the weights from (a "
                            "checkpoint root with latest_checkpointed_iteration.txt, or one "
                            "iteration directory); without it the weights are initialised "
                            "from --seed")
    model.add_argument("--num-layers", type=int, default=2, help="transformer layers")
    model.add_argument("--hidden-size", type=int, default=256, help="model width")
    model.add_argument("--num-attention-heads", type=int, default=8, help="query heads")
    model.add_argument("--num-query-groups", type=int, default=4,
                       help="key/value heads (GQA); must divide by every TP size")
    model.add_argument("--ffn-hidden-size", type=int, default=None,
                       help="SwiGLU width; default Llama's 8/3·hidden rounded up to 64")
    model.add_argument("--vocab-size", type=int, default=1024,
                       help="real vocabulary (synthetic tokens are drawn below it)")
    model.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                       help="vocabulary padding; must stay the same for every TP size")
    model.add_argument("--rotary-base", type=float, default=10000.0, help="RoPE base")
    model.add_argument("--seed", type=int, default=1234,
                       help="seed of the initial weights and of the synthetic documents")

    data = parser.add_argument_group("batch")
    data.add_argument("--seq-length", type=int, default=4096,
                      help="window slots; a multiple of 2·CP for every CP in --layouts")
    data.add_argument("--data-path", nargs="+", default=None,
                      help="Megatron-style dataset prefix(es) (with weights); one window is "
                           "taken from it (needs megatron_anchor.data)")
    data.add_argument("--window-index", type=int, default=0,
                      help="which window of --data-path to check")
    data.add_argument("--doc-length-dist", default="lognormal:600,1.0",
                      help="synthetic document lengths: lognormal:MEAN,SIGMA (MEAN in tokens) | "
                           "uniform:A,B | fixed:N | list:N1,N2,... (used in order, cycled)")
    data.add_argument("--anchor-token-id", type=int, default=1,
                      help="the shared anchor token (the tokenizer's BOS)")
    data.add_argument("--pad-token-id", type=int, default=0, help="the padding token")
    return parser


def _split_list(text: str, allowed, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise ValueError(f"bad {what} {text!r}: choose from {', '.join(allowed)}")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    """Parsed and checked arguments; `args.model` is the ModelConfig every layout builds."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from megatron_anchor.layout import VARIANTS

    try:
        args.layouts = parse_layouts(args.layouts)
        args.variants = _split_list(args.variants, VARIANTS, "--variants")
        args.dtypes = _split_list(args.dtypes, DTYPES, "--dtypes")
        parse_length_distribution(args.doc_length_dist)
        args.model = base_model_config(args)
        _check_combinations(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def _check_combinations(args) -> None:
    if args.cpu and args.attention_backend == "te":
        raise ValueError("--attention-backend te needs GPUs (Transformer Engine); "
                         "drop --cpu or use --attention-backend local")
    if args.sequence_parallel and args.attention_backend != "te":
        raise ValueError("--sequence-parallel needs --attention-backend te")
    cp_multiple = common_cp_multiple(args.layouts)
    if cp_multiple > 1 and args.seq_length % (2 * cp_multiple):
        raise ValueError(f"--seq-length {args.seq_length} must be a multiple of "
                         f"2·lcm(CP sizes) = {2 * cp_multiple}")
    if args.debug_wrong_cp_chunks and cp_multiple == 1:
        raise ValueError("--debug-wrong-cp-chunks needs a layout with CP > 1")
    heads = args.model.num_attention_heads
    groups = args.model.num_query_groups or heads
    for layout in args.layouts:
        for what, count in (("--num-attention-heads", heads), ("--num-query-groups", groups)):
            if count % layout.tp:
                raise ValueError(f"{what} {count} does not divide by TP={layout.tp} "
                                 f"({layout.name})")
        if args.attention_backend == "te":
            check_te_cp_comm_type(args.cp_comm_type, layout.cp,
                                  heads_per_tp_rank=(heads // layout.tp, groups // layout.tp))


# ----------------------------------------------------------------------------------------
# The batch: one window, the same in every layout
# ----------------------------------------------------------------------------------------

def parse_length_distribution(text: str) -> Callable[[np.random.Generator, int], int]:
    """`--doc-length-dist` -> a function (rng, i) -> the i-th document's length (>= 1)."""
    kind, _, params = text.partition(":")
    try:
        values = [float(v) for v in params.split(",")] if params else []
    except ValueError:
        values = None
    shapes = {"lognormal": 2, "uniform": 2, "fixed": 1}
    if values is None or (kind in shapes and len(values) != shapes[kind]) or \
            (kind == "list" and not values) or kind not in (*shapes, "list"):
        raise ValueError(f"bad --doc-length-dist {text!r}: use lognormal:MEAN,SIGMA, "
                         "uniform:A,B, fixed:N or list:N1,N2,...")
    if any(v <= 0 for v in values[:1]) or (kind == "list" and min(values) < 1):
        raise ValueError(f"bad --doc-length-dist {text!r}: lengths must be >= 1")
    if kind == "lognormal":
        mean, sigma = values
        mu = math.log(mean) - sigma ** 2 / 2  # so that the mean length is `mean`
        return lambda rng, i: max(1, int(round(rng.lognormal(mu, sigma))))
    if kind == "uniform":
        low, high = int(values[0]), int(values[1])
        return lambda rng, i: int(rng.integers(low, high + 1))
    if kind == "fixed":
        return lambda rng, i: int(values[0])
    lengths = [int(v) for v in values]
    return lambda rng, i: lengths[i % len(lengths)]


def synthetic_documents(length_dist: str, seq_length: int, vocab_size: int, seed: int,
                        reserved: int = 2) -> list[list[int]]:
    """Random-token documents, enough to fill a window; ids below `reserved` are kept for
    padding and the anchor so they never appear inside a document."""
    rng = np.random.default_rng(seed)
    draw = parse_length_distribution(length_dist)
    documents, total = [], 0
    while total <= seq_length:
        length = draw(rng, len(documents))
        documents.append(rng.integers(reserved, vocab_size, size=length + 1).tolist()[:length])
        total += length + 1
    return documents


def make_batch(args, variant: str, cp_multiple: int):
    """The window (a PackedBatch) for `variant`, padded for every layout's CP; identical on
    every rank."""
    from megatron_anchor.layout import pack_documents

    if args.data_path:
        return _window_from_dataset(args, variant, cp_multiple)
    documents = synthetic_documents(args.doc_length_dist, args.seq_length,
                                    args.model.vocab_size, args.seed)
    return pack_documents(documents, args.seq_length, variant,
                          anchor_token_id=args.anchor_token_id, cp_size=cp_multiple,
                          pad_token_id=args.pad_token_id)


def _window_from_dataset(args, variant: str, cp_multiple: int):
    try:
        from megatron_anchor.data.windows import WindowConfig, WindowDataset
    except ImportError as error:
        raise RuntimeError(f"--data-path needs megatron_anchor.data.windows ({error})") from None
    config = WindowConfig(seq_length=args.seq_length, variant=variant,
                          anchor_token_id=args.anchor_token_id, pad_token_id=args.pad_token_id,
                          cp_size=cp_multiple, seed=args.seed)
    batch = WindowDataset(args.data_path, config)[args.window_index]
    top = int(batch.tokens.max())
    if top >= args.model.vocab_size:
        raise ValueError(f"token id {top} in --data-path is outside the model's vocabulary "
                         f"({args.model.vocab_size})")
    return batch


# ----------------------------------------------------------------------------------------
# The model: the same weights in every layout
# ----------------------------------------------------------------------------------------

def base_model_config(args):
    """The architecture: the checkpoint's model_config.json with --load, else the flags."""
    from megatron_anchor.model import ModelConfig

    saved = os.path.join(args.load, MODEL_CONFIG_FILE) if args.load else None
    if saved and os.path.exists(saved):
        with open(saved) as f:
            return ModelConfig.from_dict(json.load(f))
    return ModelConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        ffn_hidden_size=args.ffn_hidden_size, vocab_size=args.vocab_size,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        rotary_base=args.rotary_base,
    )


def model_config(args, dtype: str):
    """The architecture with this run's dtype, backend and parallel options."""
    return dataclasses.replace(
        args.model, bf16=dtype == "bf16", attention_backend=args.attention_backend,
        sequence_parallel=args.sequence_parallel, cp_comm_type=args.cp_comm_type)


def seeded_full_weights(args) -> dict[str, torch.Tensor]:
    """FP32 weights of the model initialised from --seed at TP=1 (call under a TP=1 layout)."""
    from megatron_anchor.distributed import manual_seed
    from megatron_anchor.model import build_model
    from megatron_anchor.parallel.sharding import full_state_dict

    manual_seed(args.seed, args.cpu)
    weights = full_state_dict(build_model(model_config(args, "fp32")))
    _check_same_on_every_rank(weights)
    return weights


def _check_same_on_every_rank(weights: dict[str, torch.Tensor]) -> None:
    """Seeded initialisation is deterministic; a cheap checksum proves it across ranks."""
    checksum = torch.tensor([sum(float(w.double().sum()) for w in weights.values())],
                            dtype=torch.float64, device=_device())
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if low.item() != high.item():
        raise RuntimeError("ranks initialised different weights from the same --seed; "
                           "use --load with a checkpoint instead")


def layout_model(args, dtype: str, weights: Optional[dict]):
    """The model for the current layout and dtype, holding the reference weights."""
    from megatron_anchor.model import build_model
    from megatron_anchor.parallel.sharding import load_full_state_dict

    model = build_model(model_config(args, dtype)).to(_device())
    if args.load:
        load_checkpoint_weights(model, args.load)
    else:
        load_full_state_dict(model, weights)
    model.eval()  # no dropout anywhere; eval() documents that nothing is random
    return model


def load_checkpoint_weights(model, directory: str) -> None:
    """Megatron distributed checkpoint -> this layout's shards (dist_checkpointing reshards TP).

    Accepts a Megatron-LM checkpoint root (with latest_checkpointed_iteration.txt) or one
    iteration directory; the model lives under the "model" key, as Megatron-LM saves it.
    """
    from megatron.core import dist_checkpointing

    tracker = os.path.join(directory, "latest_checkpointed_iteration.txt")
    if os.path.exists(tracker):
        with open(tracker) as f:
            iteration = f.read().strip()
        directory = os.path.join(directory, "release" if iteration == "release"
                                 else f"iter_{int(iteration):07d}")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--load: no checkpoint directory {directory}")
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, directory)
    model.load_state_dict(state["model"], strict=False)


# ----------------------------------------------------------------------------------------
# One forward + backward in the current layout
# ----------------------------------------------------------------------------------------

@dataclass
class RunResult:
    logits: torch.Tensor          # [T, V] full logits (CPU, the run's dtype)
    loss: float                   # masked mean loss of the window
    grad_norm: float
    grads: Optional[dict] = None  # full FP32 gradients, with --compare-grads


def _device() -> torch.device:
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_share(batch, wrong_chunks: bool = False):
    """This CP rank's tokens; `wrong_chunks` hands it the next rank's (to break parity)."""
    from megatron.core import parallel_state

    from megatron_anchor.layout import shard_for_cp

    cp = parallel_state.get_context_parallel_world_size()
    cp_rank = parallel_state.get_context_parallel_rank()
    source_rank = (cp_rank + 1) % cp if wrong_chunks else cp_rank
    return dataclasses.replace(shard_for_cp(batch, cp, source_rank), cp_rank=cp_rank)


def run_once(model, batch, compare_grads: bool, wrong_chunks: bool = False
             ) -> Optional[RunResult]:
    """Forward and backward of one window; the full result on world rank 0, else None."""
    from megatron_anchor.model import forward_packed, masked_mean_loss
    from megatron_anchor.parallel.gather import gather_full_logits, sum_over_cp
    from megatron_anchor.parallel.sharding import (
        full_gradients, gradient_norm, reduce_gradients_over_cp,
    )

    for param in model.parameters():
        param.grad = None
    local = local_share(batch, wrong_chunks).to(_device())
    logits, per_token_loss = forward_packed(model, local)
    loss_sum, count = masked_mean_loss(per_token_loss, local.loss_mask)
    trained_tokens = sum_over_cp(count)
    (loss_sum / trained_tokens).backward()
    reduce_gradients_over_cp(model)

    loss = float(sum_over_cp(loss_sum) / trained_tokens)
    grad_norm = gradient_norm(model)
    full_logits = gather_full_logits(logits, batch.cu_seqlens)
    grads = full_gradients(model) if compare_grads else None
    if world_rank() != 0:
        return None
    return RunResult(full_logits.cpu(), loss, grad_norm, grads)


# ----------------------------------------------------------------------------------------
# Comparison and report
# ----------------------------------------------------------------------------------------

def compare(reference: RunResult, other: RunResult, vocab_size: int, tolerance: float) -> dict:
    ref = reference.logits[:, :vocab_size].float()
    out = other.logits[:, :vocab_size].float()
    diff = (ref - out).abs()
    row = {
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "rel_logit_diff": float(diff.max() / ref.abs().max()),
        "top1_agreement": float((ref.argmax(-1) == out.argmax(-1)).float().mean()),
        "loss": other.loss,
        "abs_loss_diff": abs(other.loss - reference.loss),
        "rel_loss_diff": abs(other.loss - reference.loss) / abs(reference.loss),
        "grad_norm": other.grad_norm,
        "rel_grad_norm_diff": abs(other.grad_norm - reference.grad_norm) / reference.grad_norm,
        "rel_grad_diff": _relative_grad_diff(reference.grads, other.grads),
        "tolerance": tolerance,
    }
    checked = ("rel_logit_diff", "rel_loss_diff", "rel_grad_norm_diff", "rel_grad_diff")
    row["passed"] = all(row[k] is None or row[k] <= tolerance for k in checked)
    return row


def _relative_grad_diff(reference: Optional[dict], other: Optional[dict]) -> Optional[float]:
    if reference is None or other is None:
        return None
    worst = max(float((reference[n] - other[n]).abs().max()) for n in reference)
    scale = max(float(g.abs().max()) for g in reference.values())
    return worst / scale


def reference_row(result: RunResult, vocab_size: int) -> dict:
    return {"max_abs_logit": float(result.logits[:, :vocab_size].float().abs().max()),
            "loss": result.loss, "grad_norm": result.grad_norm, "reference": True}


def format_table(rows: list[dict]) -> str:
    header = (f"{'variant':<16}{'dtype':<6}{'layout':<8}{'max|Δlogit|':>12}"
              f"{'mean|Δlogit|':>13}{'rel':>10}{'top-1':>8}{'|Δloss|':>10}{'Δ‖g‖':>10}"
              f"{'Δg':>10}  result")
    lines = [header, "-" * len(header)]
    for row in rows:
        lead = f"{row['variant']:<16}{row['dtype']:<6}{row['layout']:<8}"
        if row.get("reference"):
            lines.append(f"{lead}reference: max|logit| {row['max_abs_logit']:.4g}, "
                         f"loss {row['loss']:.6g}, ‖g‖ {row['grad_norm']:.6g}")
            continue
        grad = "-" if row["rel_grad_diff"] is None else f"{row['rel_grad_diff']:.2e}"
        verdict = "ok" if row["passed"] else f"FAIL (tol {row['tolerance']:.1e})"
        lines.append(
            f"{lead}{row['max_abs_logit_diff']:>12.3e}{row['mean_abs_logit_diff']:>13.3e}"
            f"{row['rel_logit_diff']:>10.2e}{row['top1_agreement']:>8.2%}"
            f"{row['abs_loss_diff']:>10.2e}{row['rel_grad_norm_diff']:>10.2e}{grad:>10}"
            f"  {verdict}")
    return "\n".join(lines)


def batch_summary(batch) -> dict:
    documents = int(batch.document_ids.max()) + 1 if (batch.document_ids >= 0).any() else 0
    lengths = batch.segment_lengths.tolist()
    return {"variant": batch.variant, "seq_length": batch.seq_length,
            "documents": documents, "segments": len(lengths),
            "longest_segment": max(lengths), "trained_tokens": int(batch.loss_mask.sum()),
            "padded_for_cp": batch.cp_size}


# ----------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------

def _log(message: str) -> None:
    if world_rank() == 0:
        print(f"[verify-parity] {message}", file=sys.stderr, flush=True)


def run(argv=None) -> dict:
    """Run the check over the current world; returns the report (complete on rank 0)."""
    return run_parsed(parse_args(argv), argv)


def run_parsed(args, argv=None) -> dict:
    layouts = args.layouts
    use_layout(Layout(1, 1), args.cpu, args.seed)
    check_world_size(layouts, dist.get_world_size())
    weights = None if args.load else seeded_full_weights(args)
    cp_multiple = common_cp_multiple(layouts)
    batches = {v: make_batch(args, v, cp_multiple) for v in args.variants}

    references, rows = {}, []
    for layout in layouts:
        use_layout(layout, args.cpu, args.seed)
        rows += _run_layout(args, layout, weights, batches, references)
        dist.barrier()

    report = {
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "world_size": dist.get_world_size(),
        "layouts": [layout.name for layout in layouts],
        "reference_layout": layouts[0].name,
        "attention_backend": args.attention_backend,
        "cp_comm_type": args.cp_comm_type if args.attention_backend == "te" else "kv_all_gather",
        "tolerances": {"fp32": args.fp32_rtol, "bf16": args.bf16_tol},
        "model": dataclasses.asdict(args.model),
        "load": args.load,
        "batches": {v: batch_summary(b) for v, b in batches.items()},
        "rows": _ordered(rows, args),
    }
    report["passed"] = _agree_on_passed(all(r.get("passed", True) for r in rows))
    return report


def _run_layout(args, layout, weights, batches, references) -> list[dict]:
    """Every rank builds the model (loading a checkpoint is collective over the world);
    data-parallel replicas compute the same numbers, so only replica 0 runs the window."""
    rows = []
    wrong_chunks = args.debug_wrong_cp_chunks and layout.cp > 1
    for dtype in args.dtypes:
        model = layout_model(args, dtype, weights)
        if not is_first_replica():
            del model
            continue
        tolerance = args.fp32_rtol if dtype == "fp32" else args.bf16_tol
        for variant, batch in batches.items():
            started = time.perf_counter()
            result = run_once(model, batch, args.compare_grads, wrong_chunks)
            _log(f"{layout.name} {variant} {dtype}: {time.perf_counter() - started:.1f}s")
            if result is None:
                continue
            key = (variant, dtype)
            if key not in references:
                references[key] = result
                row = reference_row(result, args.model.vocab_size)
            else:
                row = compare(references[key], result, args.model.vocab_size, tolerance)
            rows.append({"variant": variant, "dtype": dtype, "layout": layout.name, **row})
        del model
    return rows


def _ordered(rows: list[dict], args) -> list[dict]:
    """Table order: variant, dtype, then layouts as given (the reference first)."""
    position = {layout.name: i for i, layout in enumerate(args.layouts)}
    return sorted(rows, key=lambda r: (args.variants.index(r["variant"]),
                                       args.dtypes.index(r["dtype"]), position[r["layout"]]))


def _agree_on_passed(passed_here: bool) -> bool:
    """Rank 0 holds the verdict; every rank must exit with the same status."""
    flag = torch.tensor([1 if passed_here else 0], device=_device())
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_anchor.distributed import destroy

    report = run_parsed(args, argv)
    if world_rank() == 0:
        print(format_table(report["rows"]))
        print(f"parity {'PASSED' if report['passed'] else 'FAILED'} "
              f"(reference {report['reference_layout']}, world size {report['world_size']})")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
    destroy()
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

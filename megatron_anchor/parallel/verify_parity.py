"""Check that every parallel layout computes the same numbers (docs/design.md §3, "Parity").

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

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_anchor import backends, runtime
from megatron_anchor.layout import check_seq_length, get_variant, shard_for_cp
from megatron_anchor.model import (
    build_model,
    check_parallel_layout,
    forward_packed,
    masked_mean_loss,
)
from megatron_anchor.parallel.gather import gather_full_logits, sum_over_cp
from megatron_anchor.parallel.layouts import (
    Layout,
    check_world_size,
    common_cp_multiple,
    is_first_replica,
    use_layout,
)
from megatron_anchor.parallel.parity_batch import (
    ParityError,
    make_batch,
    parse_length_distribution,
)
from megatron_anchor.parallel.sharding import (
    full_gradients,
    full_state_dict,
    gradient_norm,
    load_full_state_dict,
    reduce_gradients_over_cp,
)

DTYPES = ("fp32", "bf16")


@dataclass
class ParityConfig:
    """What to compare, where, on which model and batch (the CLI builds it from flags)."""
    layouts: List[Layout]
    model: object                       # ModelConfig: the checkpoint's with `checkpoint`
    variants: List[object] = field(default_factory=lambda: ["anchor", "full"])  # -> Variant
    dtypes: List[str] = field(default_factory=lambda: ["fp32", "bf16"])
    fp32_rtol: float = 1e-5
    bf16_tol: float = 2.5e-2
    compare_grads: bool = False
    cpu: Optional[bool] = None          # None: CPU when no GPU is visible
    attention_backend: str = "local"
    cp_comm_type: str = "p2p"
    sequence_parallel: bool = False
    checkpoint: Optional[object] = None  # checkpoint.Checkpoint: the weights (else --seed)
    seed: int = 1234
    seq_length: int = 4096
    data_path: Optional[List[str]] = None
    window_index: int = 0
    doc_length_dist: str = "lognormal:600,1.0"
    anchor_token_id: int = 1
    pad_token_id: int = 0
    debug_wrong_cp_chunks: bool = False
    argv: List[str] = field(default_factory=list)

    def __post_init__(self):
        """Every rule checked once, by the module that owns it, before any process group
        exists: a ParityConfig is valid by construction."""

        if len(self.layouts) < 2:
            raise ParityError("give at least two layouts to compare, e.g. --layouts tp1cp1,tp2cp1")
        self.variants = [get_variant(v) for v in self.variants]
        bad = [d for d in self.dtypes if d not in DTYPES]
        if bad or not self.dtypes:
            raise ParityError(f"bad --dtypes {','.join(self.dtypes)}: choose from "
                              f"{', '.join(DTYPES)}")
        parse_length_distribution(self.doc_length_dist)
        cp_multiple = common_cp_multiple(self.layouts)
        check_seq_length(self.seq_length, cp_multiple)
        if self.debug_wrong_cp_chunks and cp_multiple == 1:
            raise ParityError("--debug-wrong-cp-chunks needs a layout with CP > 1")
        m = self.model
        for layout in self.layouts:
            check_parallel_layout(m, layout.tp)
            backends.validate(self.attention_backend, cpu=bool(self.cpu), tp=layout.tp,
                              cp=layout.cp, sequence_parallel=self.sequence_parallel,
                              cp_comm_type=self.cp_comm_type,
                              num_attention_heads=m.num_attention_heads,
                              num_query_groups=m.num_query_groups)


# ----------------------------------------------------------------------------------------
# The model: the same weights in every layout
# ----------------------------------------------------------------------------------------

def model_config(args, dtype: str):
    """The architecture with this run's dtype, backend and parallel options."""
    return dataclasses.replace(
        args.model, bf16=dtype == "bf16", attention_backend=args.attention_backend,
        sequence_parallel=args.sequence_parallel, cp_comm_type=args.cp_comm_type)


def seeded_full_weights(args) -> dict[str, torch.Tensor]:
    """FP32 weights of the model initialised from --seed at TP=1 (call under a TP=1 layout)."""
    runtime.manual_seed(args.seed)
    weights = full_state_dict(build_model(model_config(args, "fp32")))
    _check_same_on_every_rank(weights)
    return weights


def _check_same_on_every_rank(weights: dict[str, torch.Tensor]) -> None:
    """Seeded initialisation is deterministic; a cheap checksum proves it across ranks."""
    checksum = torch.tensor([sum(float(w.double().sum()) for w in weights.values())],
                            dtype=torch.float64, device=runtime.device())
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if low.item() != high.item():
        raise RuntimeError("ranks initialised different weights from the same --seed; "
                           "use --load with a checkpoint instead")


def layout_model(args, dtype: str, weights: Optional[dict]):
    """The model for the current layout and dtype, holding the reference weights."""
    model = build_model(model_config(args, dtype)).to(runtime.device())
    if args.checkpoint:
        args.checkpoint.load_weights(model)
    else:
        load_full_state_dict(model, weights)
    model.eval()  # no dropout anywhere; eval() documents that nothing is random
    return model


# ----------------------------------------------------------------------------------------
# One forward + backward in the current layout
# ----------------------------------------------------------------------------------------

@dataclass
class RunResult:
    logits: torch.Tensor          # [T, V] full logits (CPU, the run's dtype)
    loss: float                   # masked mean loss of the window
    grad_norm: float
    grads: Optional[dict] = None  # full FP32 gradients, with --compare-grads


def local_share(batch, wrong_chunks: bool = False):
    """This CP rank's tokens; `wrong_chunks` hands it the next rank's (to break parity)."""
    cp = parallel_state.get_context_parallel_world_size()
    cp_rank = parallel_state.get_context_parallel_rank()
    source_rank = (cp_rank + 1) % cp if wrong_chunks else cp_rank
    return dataclasses.replace(shard_for_cp(batch, cp, source_rank), cp_rank=cp_rank)


def run_once(model, batch, compare_grads: bool, wrong_chunks: bool = False
             ) -> Optional[RunResult]:
    """Forward and backward of one window; the full result on world rank 0, else None."""
    for param in model.parameters():
        param.grad = None
    local = local_share(batch, wrong_chunks).to(runtime.device())
    logits, per_token_loss = forward_packed(model, local)
    loss_sum, count = masked_mean_loss(per_token_loss, local.loss_mask)
    trained_tokens = sum_over_cp(count)
    (loss_sum / trained_tokens).backward()
    reduce_gradients_over_cp(model)

    loss = float(sum_over_cp(loss_sum) / trained_tokens)
    grad_norm = gradient_norm(model)
    full_logits = gather_full_logits(logits, batch.cu_seqlens)
    grads = full_gradients(model) if compare_grads else None
    if runtime.rank() != 0:
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
    if runtime.rank() == 0:
        print(f"[verify-parity] {message}", file=sys.stderr, flush=True)


def run(args: ParityConfig) -> dict:
    """Run the check over the current world; returns the report (complete on rank 0)."""
    layouts = args.layouts
    args.cpu = runtime.decide_device(args.cpu)
    use_layout(Layout(1, 1), args.cpu, args.seed)
    check_world_size(layouts, dist.get_world_size())
    weights = None if args.checkpoint else seeded_full_weights(args)
    cp_multiple = common_cp_multiple(layouts)
    batches = {v: make_batch(args, v, cp_multiple) for v in args.variants}

    references, rows = {}, []
    for layout in layouts:
        use_layout(layout, args.cpu, args.seed)
        rows += _run_layout(args, layout, weights, batches, references)
        dist.barrier()

    report = {
        "argv": list(args.argv),
        "world_size": dist.get_world_size(),
        "layouts": [layout.name for layout in layouts],
        "reference_layout": layouts[0].name,
        "attention_backend": args.attention_backend,
        "cp_comm_type": args.cp_comm_type if args.attention_backend == "te" else "kv_all_gather",
        "tolerances": {"fp32": args.fp32_rtol, "bf16": args.bf16_tol},
        "model": dataclasses.asdict(args.model),
        "load": args.checkpoint.path if args.checkpoint else None,
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
    flag = torch.tensor([1 if passed_here else 0], device=runtime.device())
    dist.broadcast(flag, src=0)
    return bool(flag.item())

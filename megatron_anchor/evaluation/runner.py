"""Evaluate a loaded model on a grid of tasks x lengths (x depths), with controls and CIs.

`evaluate` returns an `EvalResult` (cells, per-sample rows); `average_checkpoints` turns
the results of the last K checkpoints into the paper's protocol: per task and length the
mean and spread over checkpoints, plus a row per checkpoint.

Data parallelism: when the world holds several model replicas, each replica scores every
DP-th sample and the verdicts are all-gathered, so every rank returns the same result.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from megatron_anchor.evaluation import scoring
from megatron_anchor.evaluation.tasks import (
    DEFAULT_DEPTHS, EvaluationError, Sample, check_task, generate_sample)

SCORINGS = ("teacher-forced", "generate")


@dataclass
class EvalConfig:
    tasks: Tuple[str, ...] = ("passkey",)
    lengths: Tuple[int, ...] = (1024,)
    samples: int = 8                        # per (task, length) cell
    depths: Tuple[float, ...] = DEFAULT_DEPTHS   # sample i sits at depths[i % len(depths)]
    seed: int = 42
    scoring: str = "teacher-forced"         # or "generate" (greedy + string_match_all)
    controls: bool = True                   # also score the needle-removed prompts
    tokens_per_batch: int = 16384           # windows per forward, by total tokens
    max_new_tokens: Optional[int] = None    # generation: default answer length + 4

    def validate(self) -> "EvalConfig":
        if not self.tasks:
            raise EvaluationError("no tasks given: pass --tasks, e.g. --tasks passkey")
        for t in self.tasks:
            check_task(t)
        if not self.lengths or any(int(n) < 64 for n in self.lengths):
            raise EvaluationError(f"--lengths must be token counts >= 64, got {list(self.lengths)}")
        if self.samples < 1:
            raise EvaluationError(f"--samples must be >= 1, got {self.samples}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise EvaluationError(f"--depths must lie in [0, 1], got {list(self.depths)}")
        if self.scoring not in SCORINGS:
            raise EvaluationError(f"unknown scoring {self.scoring!r}: choose one of "
                                  f"{', '.join(SCORINGS)}")
        if self.tokens_per_batch < 1:
            raise EvaluationError("--tokens-per-batch must be >= 1")
        return self


@dataclass
class SampleResult:
    task: str
    length: int
    index: int
    depth: Optional[float]
    control: bool
    score: float
    correct: bool
    items_correct: List[bool]
    predicted_ids: List[int]
    answer_ids: List[int]
    text: Optional[str] = None
    answer_nll: Optional[float] = None   # teacher-forced only (nats per answer token)


def _mean(values: List[Optional[float]]) -> Optional[float]:
    """The mean, or None when a value is missing (generation has no answer NLL)."""
    return None if not values or None in values else sum(values) / len(values)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> Tuple[float, float]:
    """Wilson score interval for a proportion (partial credit counts as fractional successes)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class CellResult:
    task: str
    length: int
    n: int
    score: float                 # mean score, 0..1 (RULER reports x100)
    num_correct: int             # samples with every item right
    ci_low: float                # Wilson 95% on the score
    ci_high: float
    chance: float
    control_score: Optional[float]
    seconds_per_sample: float
    by_depth: Dict[str, Tuple[int, float]] = field(default_factory=dict)
    answer_nll: Optional[float] = None   # mean over samples (teacher-forced scoring)


@dataclass
class EvalResult:
    label: str
    config: EvalConfig
    cells: List[CellResult]
    samples: List[SampleResult]

    def cell(self, task: str, length: int) -> CellResult:
        for c in self.cells:
            if (c.task, c.length) == (task, length):
                return c
        raise KeyError((task, length))

    def to_dict(self) -> dict:
        return {"label": self.label, "config": asdict(self.config),
                "cells": [asdict(c) for c in self.cells],
                "samples": [asdict(s) for s in self.samples]}


def _batches(samples: Sequence[Sample], tokens_per_batch: int) -> List[List[Sample]]:
    out, current, used = [], [], 0
    for s in samples:
        if current and used + s.num_tokens > tokens_per_batch:
            out.append(current)
            current, used = [], 0
        current.append(s)
        used += s.num_tokens
    if current:
        out.append(current)
    return out


def _data_parallel():
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1, 0, None
    return (parallel_state.get_data_parallel_world_size(),
            parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_group())


def _gather_over_dp(mine: list, dp: int, group) -> list:
    if dp == 1:
        return mine
    import torch.distributed as dist

    pieces = [None] * dp
    dist.all_gather_object(pieces, mine, group=group)
    return [row for piece in pieces for row in piece]


def _score(model, samples, tokenizer, vocab_size, config, device) -> list:
    if config.scoring == "teacher-forced":
        return scoring.teacher_forced(model, samples, tokenizer.bos, vocab_size, device)
    return scoring.generation_scored(model, samples, tokenizer.bos, vocab_size,
                                     tokenizer.decode, config.max_new_tokens, device,
                                     stop_token_ids=[tokenizer.eod])


def evaluate(model, tokenizer, vocab_size: int, config: EvalConfig, *, label: str = "",
             device=None, progress: Optional[Callable[[int, int], None]] = None) -> EvalResult:
    """Score `model` on every (task, length) cell of `config` (and the controls).

    `tokenizer` is an `EvalTokenizer` (encode/decode, `bos` = the anchor, `eod`);
    `vocab_size` is the real vocabulary (logits of padded rows are ignored).
    `progress(done, total)` is called after each batch with sample counts.
    """
    config.validate()
    dp, dp_rank, dp_group = _data_parallel()
    cells: List[CellResult] = []
    rows: List[SampleResult] = []
    grid = [(t, int(n)) for t in config.tasks for n in config.lengths]
    total = len(grid) * config.samples * (2 if config.controls else 1)
    done = 0
    for task, length in grid:
        prompts = [generate_sample(task, tokenizer, length, i, seed=config.seed,
                                   depths=config.depths) for i in range(config.samples)]
        controls = [generate_sample(task, tokenizer, length, i, seed=config.seed,
                                    depths=config.depths, control=True)
                    for i in range(config.samples)] if config.controls else []
        cell_seconds = 0.0
        results: Dict[bool, List[SampleResult]] = {}
        for is_control, group in ((False, prompts), (True, controls)):
            mine = list(group)[dp_rank::dp]
            local = []
            for batch in _batches(mine, config.tokens_per_batch):
                start = time.perf_counter()
                verdicts = _score(model, batch, tokenizer, vocab_size, config, device)
                if not is_control:
                    cell_seconds += time.perf_counter() - start
                for s, v in zip(batch, verdicts):
                    local.append(SampleResult(
                        task=task, length=length, index=s.index, depth=s.depth,
                        control=is_control, score=v.score, correct=v.correct,
                        items_correct=list(v.items_correct),
                        predicted_ids=list(v.predicted_ids), answer_ids=list(s.answer_ids),
                        text=v.text, answer_nll=v.answer_nll))
                done += len(batch) * dp
                if progress is not None:
                    progress(min(done, total), total)
            gathered = sorted(_gather_over_dp(local, dp, dp_group), key=lambda r: r.index)
            results[is_control] = gathered
            rows.extend(gathered)
        main = results[False]
        n = len(main)
        successes = sum(r.score for r in main)
        low, high = wilson_interval(successes, n)
        by_depth: Dict[str, Tuple[int, float]] = {}
        if check_task(task).uses_depth:
            for d in sorted({r.depth for r in main}):
                at = [r.score for r in main if r.depth == d]
                by_depth[f"{d:g}"] = (len(at), sum(at) / len(at))
        control = results.get(True) or []
        cells.append(CellResult(
            task=task, length=length, n=n, score=successes / n,
            num_correct=sum(r.correct for r in main), ci_low=low, ci_high=high,
            chance=sum(p.chance for p in prompts) / len(prompts),
            control_score=(sum(r.score for r in control) / len(control)) if control else None,
            seconds_per_sample=cell_seconds * dp / n, by_depth=by_depth,
            answer_nll=_mean([r.answer_nll for r in main])))
    return EvalResult(label=label, config=config, cells=cells, samples=rows)


@dataclass
class AveragedCell:
    task: str
    length: int
    mean: float
    std: float        # sample standard deviation over checkpoints (0 for one)
    min: float
    max: float
    per_checkpoint: Dict[str, float]


def average_checkpoints(results: Sequence[EvalResult]) -> List[AveragedCell]:
    """Per task and length: mean and spread of the score over checkpoints (paper protocol)."""
    if not results:
        return []
    out = []
    for cell in results[0].cells:
        scores = {r.label: r.cell(cell.task, cell.length).score for r in results}
        values = list(scores.values())
        out.append(AveragedCell(
            task=cell.task, length=cell.length, mean=statistics.fmean(values),
            std=statistics.stdev(values) if len(values) > 1 else 0.0,
            min=min(values), max=max(values), per_checkpoint=scores))
    return out

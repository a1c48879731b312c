"""The train loop: one optimizer step per global batch, validation, checkpoints.

A step, top to bottom:
1. this rank's micro-batches of the global batch (`data.MicroBatches`);
2. Megatron's `get_forward_backward_func()` runs forward + backward per micro-batch
   (gradient accumulation in DDP's FP32 buffers, grad sync after the last one);
   `loss_func` returns the masked loss *sum* and the trained-token count, and Megatron divides
   the gradients by the trained tokens of the whole global batch (all DP and CP ranks);
3. the optimizer clips the global gradient norm and steps; the LR scheduler steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_anchor.layout import PackedBatch
from megatron_anchor.model import forward_packed
from megatron_anchor.training.config import TrainConfig
from megatron_anchor.training.model_setup import TrainingComponents, current_lr


# ----------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------

def loss_func(batch: PackedBatch, per_token_loss: torch.Tensor):
    """Megatron's 3-tuple loss contract: (loss sum, trained tokens, report)."""
    mask = batch.loss_mask.to(per_token_loss.dtype)
    loss_sum = (per_token_loss * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().float(), mask.sum().detach().float()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    """Megatron `forward_step_func`: per-token loss of one micro-batch, and its loss_func."""
    batch = next(data_iterator)
    _, per_token_loss = forward_packed(model, batch, return_logits=False)
    return per_token_loss, partial(loss_func, batch)


def dp_cp_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def reduce_loss_reports(reports: List[dict]) -> float:
    """Mean loss over the trained tokens of the global batch (all micro-batches, DP, CP)."""
    total = torch.stack([r["lm loss"] for r in reports]).sum(0).cpu()
    if dist.is_initialized():
        dist.all_reduce(total, group=dp_cp_group())
    return float(total[0] / total[1].clamp(min=1))


def forward_backward(components: TrainingComponents, microbatches: List[PackedBatch],
                     cfg: TrainConfig) -> List[dict]:
    """Gradients of the global batch's per-token mean loss, in DDP's main_grad buffers."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    components.model.zero_grad_buffer()
    components.optimizer.zero_grad()
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=components.model,
        num_microbatches=len(microbatches),
        seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.data.micro_batch_size,
        forward_only=False,
    )


def train_step(components: TrainingComponents, microbatches: List[PackedBatch],
               cfg: TrainConfig) -> Dict[str, float]:
    reports = forward_backward(components, microbatches, cfg)
    updated, grad_norm, _ = components.optimizer.step()
    lr = current_lr(components.optimizer)  # the LR this step used
    if updated:
        components.scheduler.step(increment=1)
    return {"loss": reduce_loss_reports(reports), "grad_norm": float(grad_norm or 0.0),
            "lr": lr, "skipped": float(not updated)}


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, dataset, microbatches, eval_iters: int,
             domain_names: List[str]) -> Dict[str, float]:
    """Validation loss over `eval_iters` global batches, overall and per domain."""
    num_domains = len(domain_names)
    sums = torch.zeros(num_domains + 1, dtype=torch.float64)
    counts = torch.zeros(num_domains + 1, dtype=torch.float64)
    model.eval()
    for iteration in range(eval_iters):
        for batch in microbatches.for_iteration(dataset, iteration):
            _, loss = forward_packed(model, batch, return_logits=False)
            mask = batch.loss_mask.double().cpu()
            loss = loss.double().cpu() * mask
            # Slot domain -1 (padding) goes to the last bin and is never reported.
            domains = batch.domain_ids.cpu().clamp(min=-1) % (num_domains + 1)
            sums.index_add_(0, domains, loss)
            counts.index_add_(0, domains, mask)
    model.train()
    totals = torch.cat([sums, counts])
    if dist.is_initialized():
        dist.all_reduce(totals, group=dp_cp_group())
    sums, counts = totals[:num_domains + 1], totals[num_domains + 1:]
    result = {"all": float(sums[:num_domains].sum() / counts[:num_domains].sum().clamp(min=1))}
    for d, name in enumerate(domain_names):
        if counts[d] > 0:
            result[name] = float(sums[d] / counts[d])
    return result


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------

@dataclass
class RunSummary:
    # Means over the first and the last log interval: one step's loss depends on which
    # documents its few windows hold, so single steps are too noisy to compare.
    first_loss: Optional[float] = None
    last_loss: Optional[float] = None
    loss_window: int = 0
    first_valid: Dict[str, float] = field(default_factory=dict)
    losses: List[float] = field(default_factory=list)
    tokens_per_s: float = 0.0
    seconds: float = 0.0
    iterations: int = 0
    start_iteration: int = 0
    checkpoint: Optional[str] = None
    plot: Optional[str] = None
    valid: Dict[str, float] = field(default_factory=dict)


def train(cfg: TrainConfig, components: TrainingComponents, train_data, valid_data,
          microbatches, logger, start_iteration: int = 0, save_fn=None) -> RunSummary:
    """Run iterations start_iteration .. train_iters-1; validate and save on schedule."""
    log, summary = cfg.logging, RunSummary(start_iteration=start_iteration)
    slots_per_step = cfg.data.global_batch_size * cfg.data.seq_length
    domain_names = list(getattr(valid_data, "domain_names", []) or [])
    timed_seconds = timed_steps = 0.0
    components.model.train()
    for iteration in range(start_iteration, cfg.optim.train_iters):
        started = time.perf_counter()
        batches = microbatches.for_iteration(train_data, iteration)
        metrics = train_step(components, batches, cfg)
        metrics["step_time_s"] = time.perf_counter() - started
        metrics["tokens_per_s"] = slots_per_step / metrics["step_time_s"]
        done = iteration + 1
        if iteration > start_iteration:  # the first step pays one-off warm-up costs
            timed_seconds += metrics["step_time_s"]
            timed_steps += 1
        summary.losses.append(metrics["loss"])
        logger.train_step(done, metrics, log_line=done % log.log_interval == 0)

        exit_every = cfg.checkpoint.exit_interval
        last = done == cfg.optim.train_iters or bool(exit_every and done % exit_every == 0)
        if valid_data is not None and (last or (log.eval_interval and done % log.eval_interval == 0)):
            summary.valid = evaluate(components.model, valid_data, microbatches, log.eval_iters,
                                     domain_names)
            summary.first_valid = summary.first_valid or summary.valid
            logger.validation(done, summary.valid)
        interval = cfg.checkpoint.save_interval
        if save_fn is not None and (last or (interval and done % interval == 0)):
            summary.checkpoint = save_fn(done)
            logger.print(f"saved checkpoint {summary.checkpoint}")
        if last:
            break
    if summary.losses:
        n = summary.loss_window = max(1, min(log.log_interval, len(summary.losses) // 2))
        summary.first_loss = sum(summary.losses[:n]) / n
        summary.last_loss = sum(summary.losses[-n:]) / n
    summary.iterations = len(summary.losses)
    summary.seconds = timed_seconds
    if timed_steps:
        summary.tokens_per_s = slots_per_step * timed_steps / timed_seconds
    return summary

"""Model, DDP wrapper, optimizer and LR schedule, all Megatron-Core's own.

* `megatron.core.distributed.DistributedDataParallel`: contiguous FP32 gradient buffers,
  gradient all-reduce over the data-parallel (x context-parallel) group.
* `megatron.core.optimizer.get_megatron_optimizer` with `OptimizerConfig(optimizer="adam")`:
  AdamW from Transformer Engine (`FusedAdam`) or apex when installed; otherwise (CPU) it falls
  back to `torch.optim.AdamW`, wrapped in Megatron's `FP32Optimizer` (global-norm clipping,
  sharded state dicts). `--bf16` gives Megatron's mixed-precision optimizer (FP32 main weights).
* `--use-distributed-optimizer` (both configs, as in Megatron-LM): DDP reduce-scatters the
  gradients and Megatron's `DistributedOptimizer` keeps only this rank's shard of the FP32
  main weights and Adam moments, then all-gathers the updated weights. `--overlap-grad-reduce`
  and `--overlap-param-gather` overlap those collectives with backward / the next forward
  (the forward pre-hooks are switched off around validation and checkpoints, as Megatron-LM
  does, so the weights are complete there).
* `megatron.core.optimizer_param_scheduler.OptimizerParamScheduler`, stepped once per
  iteration (warmup and decay are counted in iterations).

The loss is a per-token mean over the global batch: `calculate_per_token_loss` makes the
schedule sum losses and trained-token counts over micro-batches, DDP sum gradients over the
data-parallel and context-parallel ranks, and `finalize_model_grads` divide by the total
number of trained tokens.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_anchor import runtime
from megatron_anchor.model import build_model
from megatron_anchor.training.config import TrainConfig


@dataclass
class TrainingComponents:
    model: torch.nn.Module          # the DDP wrapper (call it like the model)
    optimizer: object               # Megatron optimizer (ChainedOptimizer of FP32/MixedPrecision)
    scheduler: object               # OptimizerParamScheduler

    @property
    def module(self):
        """The bare GPTModel (for sharded state dicts)."""
        return self.model.module


def build_training_components(cfg: TrainConfig) -> TrainingComponents:
    gpt = build_model(cfg.model).to(runtime.device())
    # Per-token loss: DDP sums gradients, finalize_model_grads divides by all trained tokens.
    gpt.config.calculate_per_token_loss = True
    p = cfg.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.use_distributed_optimizer)
    model = DistributedDataParallel(gpt.config, ddp_config, gpt)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    # What Megatron's forward_backward_func calls around the micro-batches.
    gpt.config.no_sync_func = model.no_sync
    gpt.config.finalize_model_grads_func = finalize_model_grads
    gpt.config.grad_scale_func = optimizer.scale_loss
    return TrainingComponents(model, optimizer, scheduler)


def build_optimizer(cfg: TrainConfig, model):
    o = cfg.optim
    config = OptimizerConfig(
        optimizer="adam",  # Megatron's "adam" is AdamW (decoupled weight decay)
        lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad, bf16=cfg.model.bf16,
        params_dtype=torch.bfloat16 if cfg.model.bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather)
    return get_megatron_optimizer(config, [model])


def build_scheduler(cfg: TrainConfig, optimizer):
    o = cfg.optim
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_iters,
        lr_decay_steps=o.lr_decay_iters or o.train_iters,
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=o.train_iters, wd_incr_style="constant")


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def param_sync_paused(components: TrainingComponents):
    """Context for validation and checkpoints: with --overlap-param-gather the parameter
    all-gather of the last step is only waited for in forward pre-hooks; switch them off
    (forcing the all-gather) and back on afterwards, as Megatron-LM's train loop does."""

    model = components.model

    @contextlib.contextmanager
    def paused():
        hooked = getattr(model, "use_forward_hook", False)
        if hooked:
            model.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            if hooked:
                model.enable_forward_pre_hook()

    return paused()

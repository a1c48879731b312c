"""Pretraining entry point: `megatron-anchor-pretrain` / `python -m megatron_anchor.training.pretrain`.

    torchrun --nproc-per-node 2 -m megatron_anchor.training.pretrain --cpu \\
        --tensor-model-parallel-size 2 --data-path corpus_text_document \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer.json ...

Reads like Megatron-LM's `pretrain_gpt.py`: parse flags, initialise process groups, build
data, model and optimizer, optionally resume, train, save, summarise.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional


# Megatron-Core announces each missing optional accelerator package (TE, apex) at import;
# on CPU that is expected, and the fallbacks used are listed in the README.
_EXPECTED_WARNINGS = (r".*(Transformer Engine|Apex|apex).*not installed.*",
                      r".*full scope is deprecated.*")


def _quiet_expected_warnings() -> None:
    import warnings

    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def run(argv: Optional[List[str]] = None):
    """Parse, set up, train; returns the RunSummary (rank 0 prints it)."""
    _quiet_expected_warnings()
    from megatron_anchor.training.arguments import config_from_args, parse_args

    cfg = config_from_args(parse_args(argv))
    return run_config(cfg)


def run_config(cfg):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_anchor import distributed
    from megatron_anchor.training import checkpoint, data
    from megatron_anchor.training.logger import RunLogger
    from megatron_anchor.training.model_setup import build_training_components
    from megatron_anchor.training.train import train

    data.resolve_tokens(cfg, data.load_tokenizer(cfg))
    cfg.validate()
    p = cfg.parallel
    owns_world = _initialize(cfg)
    try:
        dp = cfg.validate_world(dist.get_world_size())
        rank0 = dist.get_rank() == 0
        train_data, valid_data = data.build_datasets(cfg)
        device = "cpu" if p.cpu else f"cuda:{__import__('torch').cuda.current_device()}"
        microbatches = data.MicroBatches(
            cfg, parallel_state.get_data_parallel_rank(), dp,
            parallel_state.get_context_parallel_rank(), p.context_parallel_size, device)
        components = build_training_components(cfg)

        start = 0
        if cfg.checkpoint.load and checkpoint.resolve_checkpoint(cfg.checkpoint.load):
            start, _ = checkpoint.load_checkpoint(cfg.checkpoint.load, components)
        elif cfg.checkpoint.pretrained_checkpoint:
            loaded = checkpoint.load_pretrained_weights(cfg.checkpoint.pretrained_checkpoint,
                                                        components)
            if rank0:
                print(f"starting from the weights of {loaded}", flush=True)
        elif cfg.checkpoint.load and rank0:
            print(f"--load {cfg.checkpoint.load}: no checkpoint yet, starting from scratch",
                  flush=True)

        output_dir = cfg.checkpoint.save or cfg.logging.tensorboard_dir
        logger = RunLogger(output_dir, cfg.logging.tensorboard_dir, cfg.optim.train_iters,
                           start, rank0, cfg.logging.progress_bar,
                           cfg.logging.log_interval)
        if rank0:
            _print_header(cfg, dp, train_data, logger)

        save_fn = None
        if cfg.checkpoint.save:
            def save_fn(iteration):
                state = {"consumed_windows": iteration * cfg.data.global_batch_size,
                         "data": train_data.state()}
                return checkpoint.save_checkpoint(cfg.checkpoint.save, iteration, components,
                                                  cfg, state)

        summary = train(cfg, components, train_data, valid_data, microbatches, logger,
                        start_iteration=start, save_fn=save_fn)
        summary.plot = logger.plot(os.path.join(output_dir or ".", "loss_curve.png"))
        logger.close()
        if rank0:
            _print_summary(summary)
        return summary
    finally:
        if owns_world:
            distributed.destroy()


def _initialize(cfg) -> bool:
    """Set up process groups, or reuse the caller's (tests, notebooks). True if set up here."""
    from megatron.core import parallel_state

    from megatron_anchor import distributed

    p = cfg.parallel
    if not parallel_state.model_parallel_is_initialized():
        distributed.initialize(p.tensor_model_parallel_size, p.context_parallel_size,
                               cpu=p.cpu, seed=cfg.seed)
        return True
    have = (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_context_parallel_world_size())
    if have != (p.tensor_model_parallel_size, p.context_parallel_size):
        raise ConfigError(f"process groups already exist with TP, CP = {have}; this run asks "
                          f"for {p.tensor_model_parallel_size}, {p.context_parallel_size}")
    if p.cpu:
        from megatron_anchor.cpu import enable_cpu_mode

        enable_cpu_mode()
    distributed.manual_seed(cfg.seed, p.cpu)
    return False


from megatron_anchor.training.config import ConfigError  # noqa: E402  (light import)


def _print_header(cfg, dp, train_data, logger) -> None:
    p, d, m = cfg.parallel, cfg.data, cfg.model
    logger.print(
        f"megatron-anchor pretrain | TP={p.tensor_model_parallel_size} "
        f"CP={p.context_parallel_size} DP={dp} | variant={d.variant} "
        f"backend={m.attention_backend} | {m.num_layers} layers, d={m.hidden_size}, "
        f"vocab={m.vocab_size} | {d.global_batch_size} windows x {d.seq_length} tokens/step, "
        f"{cfg.num_microbatches(dp)} micro-batch(es) of {d.micro_batch_size} per rank | "
        f"anchor id={d.anchor_token_id} pad id={d.pad_token_id} | "
        f"train windows={len(train_data)}")


def _losses(values: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in values.items())


def _print_summary(summary) -> None:
    lines = [
        "=" * 72,
        "run summary",
        f"  iterations       {summary.start_iteration} -> "
        f"{summary.start_iteration + summary.iterations}",
        f"  train loss       {summary.first_loss:.4f} -> {summary.last_loss:.4f} (means of the "
        f"first and last {summary.loss_window} steps)" if summary.first_loss is not None else "",
        f"  valid loss       {_losses(summary.first_valid)} -> {_losses(summary.valid)}"
        if summary.valid else "",
        f"  tokens/s         {summary.tokens_per_s:.0f} (window slots, all ranks; "
        "first step excluded)",
        f"  train time       {summary.seconds:.1f} s",
        f"  checkpoint       {summary.checkpoint}",
        f"  loss curve       {summary.plot}",
        "=" * 72,
    ]
    print("\n".join(line for line in lines if line), flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_anchor.data.indexed import DatasetError
    from megatron_anchor.training.config import ConfigError

    try:
        run(argv)
    except (ConfigError, DatasetError, FileNotFoundError) as err:
        print(f"megatron-anchor-pretrain: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

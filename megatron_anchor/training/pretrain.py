"""Pretraining entry point: `megatron-anchor-pretrain` / `python -m megatron_anchor.training.pretrain`.

    torchrun --nproc-per-node 2 -m megatron_anchor.training.pretrain --cpu \\
        --tensor-model-parallel-size 2 --data-path corpus_text_document \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer.json ...

Reads like Megatron-LM's `pretrain_gpt.py`: parse flags, initialise process groups, build
data, model and optimizer, optionally resume, train, save, summarise.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import List, Optional


def run(argv: Optional[List[str]] = None):
    """Parse, set up, train; returns the RunSummary (the caller prints it)."""
    # --exit-duration-in-mins counts from here, before the heavy imports and the set-up, as
    # Megatron-LM counts from the start of its process.
    started_at = time.time()
    from megatron_anchor.training.arguments import config_from_args, parse_args

    cfg = config_from_args(parse_args(argv))
    return run_config(cfg, started_at)


def run_config(cfg, started_at: Optional[float] = None):
    from megatron.core import parallel_state

    from megatron_anchor import checkpoint, runtime
    from megatron_anchor.training import data
    from megatron_anchor.training.logger import RunLogger
    from megatron_anchor.training.model_setup import build_training_components
    from megatron_anchor.training.stopping import ExitSignal, StopRules
    from megatron_anchor.training.train import Checkpointer, NonFiniteGuard, train

    started_at = time.time() if started_at is None else started_at
    c, p = cfg.checkpoint, cfg.parallel
    exit_signal = ExitSignal(c.exit_signal) if c.exit_signal_handler else None
    with exit_signal or contextlib.nullcontext():
        p.cpu = runtime.decide_device(True if p.cpu else None)
        resume, pretrained, notes = open_start_checkpoints(cfg)
        take_architecture_from_checkpoint(cfg, resume or pretrained)
        tokenizer = data.load_tokenizer(cfg)
        data.resolve_tokens(cfg, tokenizer)
        cfg.validate()
        window = cfg.window_layout()  # the packing rules, checked before any process group
        owns_world = _initialize(cfg)
        try:
            dp = cfg.validate_world(runtime.world_size())
            rank0 = runtime.is_rank0()
            for note in notes if rank0 else ():
                print(f"--load {c.load}: {note}", flush=True)
            train_data, valid_data = data.build_datasets(cfg, window)
            microbatches = data.MicroBatches(
                cfg, parallel_state.get_data_parallel_rank(), dp,
                parallel_state.get_context_parallel_rank(), p.context_parallel_size,
                runtime.device())
            components = build_training_components(cfg)

            start = 0
            if resume is not None:
                start, _ = checkpoint.load_training(resume, components,
                                                    load_optim=c.load_optim,
                                                    load_rng=c.load_rng)
                if rank0:
                    print(f"resuming from {resume.path}"
                          f"{' with a fresh optimizer (--no-load-optim)' if not c.load_optim else ''}",
                          flush=True)
            elif pretrained is not None:
                pretrained.load_weights(components.module)
                # --bf16 keeps FP32 main copies, made when the optimizer was built: refresh them.
                components.optimizer.reload_model_params()
                if rank0:
                    print(f"starting from the weights of {pretrained.path}", flush=True)
            elif c.load and rank0:
                print(f"--load {c.load}: no checkpoint yet, starting from scratch",
                      flush=True)

            output_dir = c.save or cfg.logging.tensorboard_dir
            logger = RunLogger(output_dir, cfg.logging.tensorboard_dir, cfg.optim.train_iters,
                               start, rank0, cfg.logging.progress_bar,
                               cfg.logging.log_interval)
            try:
                if rank0:
                    _print_header(cfg, dp, train_data, logger)
                checkpointer = None
                if c.save:
                    d = cfg.data
                    tokenizer_files = d.tokenizer_model or (d.vocab_file and
                                                            os.path.dirname(d.vocab_file))

                    def state_fn(iteration):
                        return {"consumed_windows": iteration * d.global_batch_size,
                                "data": train_data.state()}

                    checkpointer = Checkpointer(cfg, components, state_fn, logger,
                                                tokenizer=tokenizer_files)
                guard = None
                if cfg.optim.check_for_nan_in_loss_and_grad:
                    def newest_good():
                        # A background save scheduled before the failure holds good
                        # weights: complete it first, so the line can name it.
                        if checkpointer is not None:
                            checkpointer.wait()
                            if checkpointer.last:
                                return checkpointer.last
                        return checkpoint.newest_complete(c.save) or \
                            (resume.path if resume is not None else None)

                    guard = NonFiniteGuard(newest_good, c.save or c.load)
                summary = train(cfg, components, train_data, valid_data, microbatches,
                                logger, start_iteration=start, checkpointer=checkpointer,
                                stop_rules=StopRules(cfg, started_at, exit_signal),
                                guard=guard)
                _print_stop(logger, cfg, summary)
                summary.plot = logger.plot(os.path.join(output_dir or ".", "loss_curve.png"))
            finally:
                logger.close()
            return summary
        finally:
            if owns_world:
                runtime.destroy()


def _print_stop(logger, cfg, summary) -> None:
    """Why the run stopped early, and what to resume from."""
    c = cfg.checkpoint
    if summary.stop_reason is None or summary.stop_reason.startswith("--train-iters"):
        return
    done = summary.start_iteration + summary.iterations
    if summary.checkpoint:
        where = f"saved {summary.checkpoint}: resume with --load {c.save}"
    else:
        where = "nothing saved (no --save)"
    logger.print(f"stopped after iteration {done}: {summary.stop_reason}; {where}")


def open_start_checkpoints(cfg):
    """(the checkpoint to resume, the one to start from, lines to tell the user): --load
    when it holds one (the tracker's iteration, or --ckpt-step; unfinished saves skipped),
    else --pretrained-checkpoint; opened once."""
    from megatron_anchor import checkpoint

    c = cfg.checkpoint
    if c.load and c.ckpt_step is None and not os.path.isdir(c.load) and \
            os.path.exists(c.load):
        raise checkpoint.CheckpointError(f"--load {c.load}: not a directory")
    resume, notes = checkpoint.open_for_resume(c.load, step=c.ckpt_step) if c.load else \
        (None, [])
    if resume is not None:
        return resume, None, notes
    if c.pretrained_checkpoint:
        return None, checkpoint.open(c.pretrained_checkpoint), notes
    return None, None, notes


def take_architecture_from_checkpoint(cfg, source) -> None:
    """With a checkpoint to start from, the architecture is the checkpoint's.

    Architecture flags the user gave must agree with it (a one-line error otherwise); the
    run's own choices (backend, precision, window, parallel options) are kept.
    """
    from megatron_anchor import checkpoint

    if source is None:
        return
    m = cfg.model
    cfg.model = source.architecture(
        cfg.model_flags_given, **{name: getattr(m, name) for name in checkpoint.RUNTIME_FIELDS})


def _initialize(cfg) -> bool:
    """Set up process groups, or reuse the caller's (tests, notebooks). True if set up here."""
    from megatron.core import parallel_state

    from megatron_anchor import runtime

    p = cfg.parallel
    owns = not parallel_state.model_parallel_is_initialized()
    runtime.ensure_initialized(p.tensor_model_parallel_size, p.context_parallel_size,
                               cpu=p.cpu, seed=cfg.seed)
    if not owns:
        runtime.manual_seed(cfg.seed)
    return owns


def _print_header(cfg, dp, train_data, logger) -> None:
    p, d, m = cfg.parallel, cfg.data, cfg.model
    logger.print(
        f"megatron-anchor pretrain | TP={p.tensor_model_parallel_size} "
        f"CP={p.context_parallel_size} DP={dp} | variant={d.variant} "
        f"backend={m.attention_backend} | {m.num_layers} layers, d={m.hidden_size}, "
        f"vocab={m.vocab_size} | {d.global_batch_size} windows x {d.seq_length} tokens/step, "
        f"{cfg.num_microbatches(dp)} micro-batch(es) of {d.micro_batch_size} per rank | "
        f"anchor id={d.anchor_token_id} pad id={d.pad_token_id} | "
        f"train windows={len(train_data)}"
        f"{'' if d.shuffle_samples else ' (in stream order: --no-sample-shuffle)'}"
        f"{_memory_features(cfg)}")


def _memory_features(cfg) -> str:
    m, p = cfg.model, cfg.parallel
    parts = []
    if m.recompute_granularity == "full":
        parts.append(f"recompute full/{m.recompute_method}/{m.recompute_num_layers}")
    elif m.recompute_granularity == "selective":
        parts.append(f"recompute selective ({','.join(m.recompute_modules or ['core_attn'])})")
    if p.use_distributed_optimizer:
        parts.append("distributed optimizer")
    parts += [name for name, on in (("overlap grad reduce", p.overlap_grad_reduce),
                                    ("overlap param gather", p.overlap_param_gather)) if on]
    return f" | {', '.join(parts)}" if parts else ""


def _losses(values: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in values.items())


def format_summary(summary) -> str:
    """The run summary a person reads at the end (`main` prints it on rank 0)."""
    lines = [
        "=" * 72,
        "run summary",
        f"  iterations       {summary.start_iteration} -> "
        f"{summary.start_iteration + summary.iterations}",
        f"  train loss       {summary.first_loss:.4f} -> {summary.last_loss:.4f} (means of the "
        f"first and last {summary.loss_window} steps)" if summary.first_loss is not None else "",
        f"  valid loss       {_losses(summary.first_valid)} -> {_losses(summary.valid)}"
        if summary.valid else "",
        f"  unigram CE       {summary.valid_unigram_ce:.4f} on the validation targets (the "
        f"loss of training token frequencies alone; final valid loss "
        f"{summary.valid['all'] - summary.valid_unigram_ce:+.4f} vs it)"
        if summary.valid and getattr(summary, "valid_unigram_ce", None) is not None else "",
        f"  tokens/s         {summary.tokens_per_s:.0f} (window slots, all ranks; "
        "first step excluded)",
        f"  model TFLOP/s    {summary.tflops_per_rank:.4g} per rank over "
        f"{summary.world_size} rank(s)"
        + (f", MFU {100 * summary.mfu:.1f}% of {summary.peak_tflops:g} TFLOP/s peak"
           if summary.mfu is not None else ", MFU: no peak declared (--peak-tflops)")
        if hasattr(summary, "tflops_per_rank") and summary.iterations > 1 else "",
        f"  train time       {summary.seconds:.1f} s",
        f"  stopped          {summary.stop_reason}" if summary.stop_reason else "",
        f"  checkpoint       {summary.checkpoint}",
        f"  loss curve       {summary.plot}",
        "=" * 72,
    ]
    return "\n".join(line for line in lines if line)


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_anchor import runtime
    from megatron_anchor.tooling import run_tool

    def body(args):
        summary = run(args)
        if runtime.is_rank0():
            print(format_summary(summary), flush=True)
        return 0

    return run_tool("megatron-anchor-pretrain", body, argv)


if __name__ == "__main__":
    sys.exit(main())

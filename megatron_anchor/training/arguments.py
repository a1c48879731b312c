"""Megatron-style command line of the pretraining entry point -> `TrainConfig`.

Flag names follow Megatron-LM's `pretrain_gpt.py` wherever the meaning is the same, so launch
scripts read the same. Plugin-specific flags are grouped under "AnchorAttention".
"""

from __future__ import annotations

import argparse
from typing import List, Optional

from megatron_anchor.training.config import (
    LR_DECAY_STYLES,
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
)

from megatron_anchor.backends import BACKEND_NAMES
from megatron_anchor.data.tokenizer import TOKENIZER_TYPES
from megatron_anchor.layout import VARIANTS
from megatron_anchor.attention.te_cp import CP_COMM_TYPES
from megatron_anchor.training.stopping import SIGNALS
from megatron_anchor.tooling import (
    ToolParser,
    add_architecture_flags,
    architecture_flags_given,
    architecture_from_flags,
)


# The trainer's architecture flags and their defaults without a checkpoint (None for the
# vocabulary: the tokenizer's).
ARCHITECTURE_DEFAULTS = {
    "--num-layers": 2, "--hidden-size": 256, "--ffn-hidden-size": None,
    "--num-attention-heads": 4, "--num-query-groups": None, "--rotary-base": 10000.0,
    "--norm-epsilon": 1e-5, "--init-method-std": 0.02, "--make-vocab-size-divisible-by": 128,
    "--vocab-size": None,
}


def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(
        prog="megatron-anchor-pretrain",
        description="Long-context (continued) pretraining of a Llama-style Megatron-Core GPT "
                    "model with AnchorAttention. Launch with torchrun (one or many processes); "
                    "--cpu (automatic without a GPU) runs over gloo with Megatron-Core's CPU "
                    "shims. Bad flags: one line and exit status 2.",
    )
    _parallel_args(parser)
    _model_args(parser)
    _data_args(parser)
    _optim_args(parser)
    _checkpoint_and_logging_args(parser)
    _anchor_args(parser)
    _memory_args(parser)
    return parser


def _parallel_args(parser):
    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="tensor-parallel size (Megatron-Core's column/row-parallel layers)")
    g.add_argument("--context-parallel-size", type=int, default=1,
                   help="context-parallel size: each THD segment is split into 2*CP chunks")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="Megatron sequence parallelism (with --attention-backend te only)")
    g.add_argument("--bf16", action="store_true",
                   help="BF16 weights and activations with FP32 main weights (GPU)")
    g.add_argument("--cpu", action="store_true",
                   help="run on CPU: gloo process groups and the megatron_anchor.cpu shims")
    g.add_argument("--seed", type=int, default=1234,
                   help="seed of weights init, RNG trackers and the data order")


def _model_args(parser):
    g = parser.add_argument_group(
        "model (Llama-style: RMSNorm, SwiGLU, RoPE, GQA). With --load or "
        "--pretrained-checkpoint the architecture is the checkpoint's: these flags may be "
        "left out, and one that contradicts it is an error")
    add_architecture_flags(g, ARCHITECTURE_DEFAULTS)


def _data_args(parser):
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="indexed-dataset prefixes, Megatron style: 'prefix' or "
                        "'w1 prefix1 w2 prefix2 ...' (weights are token shares)")
    g.add_argument("--split", default="969,30,1",
                   help="train,valid,test proportions of the documents of each prefix")
    g.add_argument("--seq-length", type=int, default=1024, help="token slots per window")
    g.add_argument("--micro-batch-size", type=int, default=1,
                   help="windows per micro-batch, collated into one THD sequence")
    g.add_argument("--global-batch-size", type=int, default=8,
                   help="windows per optimizer step over all data-parallel ranks "
                        "(gradient accumulation = global / (micro x DP))")
    g.add_argument("--data-cache-path", default=None,
                   help="directory caching the window sample index (reused across runs)")
    g.add_argument("--no-sample-shuffle", action="store_true",
                   help="ablation: serve the packed windows in stream order instead of "
                        "Megatron's seeded sample shuffle (documents are still shuffled)")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                   help="tokenizer of the preprocessed data (finds the anchor/EOD/pad ids "
                        "and the vocabulary size)")
    g.add_argument("--tokenizer-model", default=None,
                   help="tokenizer.json (HuggingFaceTokenizer) or .model (SentencePiece)")
    g.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: merges.txt")


def _optim_args(parser):
    g = parser.add_argument_group("optimizer (Megatron-Core AdamW) and LR schedule")
    g.add_argument("--lr", type=float, default=2e-5, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of decay")
    g.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default="cosine",
                   help="decay after warmup")
    g.add_argument("--lr-warmup-iters", type=int, default=0,
                   help="linear warmup from 0 (Megatron: the first step runs at LR 0)")
    g.add_argument("--lr-decay-iters", type=int, default=None,
                   help="iterations of decay (default: --train-iters)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--clip-grad", type=float, default=1.0,
                   help="clip the global gradient norm to this (0: no clipping)")
    g.add_argument("--train-iters", type=int, default=100, help="optimizer steps in total")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", action="store_false",
                   dest="check_for_nan_in_loss_and_grad",
                   help="do not stop at the first non-finite loss, gradient norm or "
                        "validation loss (by default the run stops there with one line, "
                        "before saving, exit status 2)")


def _checkpoint_and_logging_args(parser):
    g = parser.add_argument_group("checkpoints and logging")
    g.add_argument("--save", default=None,
                   help="checkpoint directory (Megatron dist_checkpointing, iter_NNNNNNN/); "
                        "also receives metrics.jsonl and loss_curve.png")
    g.add_argument("--load", default=None,
                   help="resume from the latest checkpoint in this directory (exact: model, "
                        "optimizer, LR schedule, data position, RNG)")
    g.add_argument("--ckpt-step", type=int, default=None, metavar="N",
                   help="resume --load from iteration N instead of the one its "
                        "latest_checkpointed_iteration.txt names (e.g. an older, undamaged one)")
    g.add_argument("--pretrained-checkpoint", default=None,
                   help="start from these model weights (a Megatron dist checkpoint, e.g. a "
                        "converted Hugging Face model) when --load has no checkpoint yet")
    g.add_argument("--save-interval", type=int, default=None,
                   help="save every N iterations (default: only at the end)")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop after the iteration that is a multiple of N (saving first if "
                        "--save); the LR schedule still spans --train-iters")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on --exit-signal, finish the iteration, save it (with --save) and "
                        "exit 0; the ranks agree, so all stop after the same iteration")
    g.add_argument("--exit-signal", choices=tuple(SIGNALS), default="SIGTERM",
                   help="the signal --exit-signal-handler catches (SLURM: ask for it ahead "
                        "of the time limit with #SBATCH --signal=USR1@600)")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="stop (saving first) after the iteration that ends this many minutes "
                        "after the trainer started; the slowest rank's clock decides")
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints in the background (Megatron-Core's async "
                        "dist_checkpointing) while training goes on; a save is complete, and "
                        "the tracker points at it, only once every rank's writes are done")
    g.add_argument("--no-save-optim", action="store_false", dest="save_optim",
                   help="save without the optimizer state (evaluation checkpoints: a resume "
                        "from one needs --no-load-optim)")
    g.add_argument("--no-save-rng", action="store_false", dest="save_rng",
                   help="save without the RNG states")
    g.add_argument("--no-load-optim", action="store_false", dest="load_optim",
                   help="--load: restore the model, LR schedule and data position but start "
                        "a fresh optimizer from the loaded weights")
    g.add_argument("--no-load-rng", action="store_false", dest="load_rng",
                   help="--load: do not restore the RNG states")
    g.add_argument("--keep-last-checkpoints", type=int, default=None, metavar="K",
                   help="retention: keep the newest K complete checkpoints (what the eval's "
                        "--last-checkpoints K reads) and delete older ones once a newer save "
                        "is complete (default: keep all)")
    g.add_argument("--save-retain-interval", type=int, default=None, metavar="N",
                   help="retention (Megatron-LM's flag): also keep every checkpoint whose "
                        "iteration is a multiple of N; alone, it keeps those and the newest")
    g.add_argument("--log-interval", type=int, default=10, help="log every N iterations")
    g.add_argument("--eval-interval", type=int, default=None,
                   help="validate every N iterations (default: only at the end)")
    g.add_argument("--eval-iters", type=int, default=0,
                   help="validation iterations of --global-batch-size windows of the valid "
                        "split (0: no validation)")
    g.add_argument("--tensorboard-dir", default=None, help="write TensorBoard scalars here")
    g.add_argument("--no-progress-bar", action="store_true", help="no tqdm bar on rank 0")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="dense peak TFLOP/s of one GPU, for MFU (model TFLOP/s per GPU / peak) "
                        "in the log lines, metrics.jsonl and the summary. Default: looked up "
                        "from the GPU name for --bf16 runs (H100/H200 SXM 989, A100 312, "
                        "B200 2250); none on CPU")


def _anchor_args(parser):
    g = parser.add_argument_group("AnchorAttention")
    g.add_argument("--attention-variant", choices=VARIANTS, default="anchor",
                   help="who sees whom in a packed window (docs/design.md §2)")
    g.add_argument("--domain-tags", action="store_true",
                   help="anchor variant: put each document's domain name (tokenized) after its "
                        "anchor; tag tokens are never loss targets")
    g.add_argument("--attention-backend", choices=BACKEND_NAMES, default="local",
                   help="local: pure PyTorch (CPU/GPU); te: Transformer Engine THD (GPU); "
                        "varlen: torch's varlen_attn, FlashAttention-2 (GPU, no TE needed)")
    g.add_argument("--cp-comm-type", default="p2p", choices=CP_COMM_TYPES,
                   help="Transformer Engine context-parallel communication")
    g.add_argument("--rope-bf16", action="store_true",
                   help="diagnostic: RoPE tables and rotation in BF16 instead of FP32")
    g.add_argument("--anchor-token-id", type=int, default=None,
                   help="anchor token id (default: the tokenizer's BOS, else its EOS)")
    g.add_argument("--pad-token-id", type=int, default=None,
                   help="padding id (default: the tokenizer's <|pad|>, else EOD)")
    g.add_argument("--short-doc-keep-fraction", type=float, default=1.0,
                   help="UpSampledMix: keep this fraction of documents under 4096 tokens")
    g.add_argument("--interleave-chunks", type=int, choices=(2, 3), default=None,
                   help="ablation (intra-doc, anchor): cut each document into 2 or 3 chunks "
                   "and interleave the chunks of a window's documents")


def _memory_args(parser):
    g = parser.add_argument_group(
        "memory (Megatron-Core's activation recomputation and distributed optimizer)")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None,
                   help="full: recompute whole transformer layers in the backward (keeps only "
                        "each recomputed chunk's input); selective: recompute only "
                        "--recompute-modules (default core attention)")
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None,
                   help="full recompute: uniform checkpoints chunks of --recompute-num-layers "
                        "layers (all layers); block recomputes the first "
                        "--recompute-num-layers layers and stores the rest")
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="layers per chunk (uniform) or layers recomputed (block)")
    g.add_argument("--recompute-modules", nargs="+", default=None,
                   help="selective recompute: submodules among core_attn, mlp, layernorm "
                        "(default: core_attn)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard the optimizer state and FP32 main weights over the "
                        "data-parallel ranks (Megatron's distributed optimizer, ZeRO-1): "
                        "reduce-scatter the gradients, all-gather the updated weights")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="overlap the gradient all-reduce / reduce-scatter with the backward")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="overlap the parameter all-gather with the next forward "
                        "(needs --use-distributed-optimizer)")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A validated TrainConfig; tokenizer ids are resolved later (`data.resolve_tokens`)."""
    from megatron_anchor.model import ModelConfig

    architecture = architecture_from_flags(args, ARCHITECTURE_DEFAULTS)
    architecture["vocab_size"] = architecture["vocab_size"] or 0
    model = ModelConfig(
        **architecture,
        max_sequence_length=max(args.seq_length, 1),
        rope_fp32=not args.rope_bf16,
        attention_backend=args.attention_backend,
        bf16=args.bf16,
        sequence_parallel=args.sequence_parallel,
        cp_comm_type=args.cp_comm_type,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        recompute_modules=args.recompute_modules,
    )
    return TrainConfig(
        model=model,
        parallel=ParallelConfig(args.tensor_model_parallel_size, args.context_parallel_size,
                                args.sequence_parallel, args.cpu,
                                use_distributed_optimizer=args.use_distributed_optimizer,
                                overlap_grad_reduce=args.overlap_grad_reduce,
                                overlap_param_gather=args.overlap_param_gather),
        data=DataConfig(
            data_path=list(args.data_path or []), split=args.split, seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
            variant=args.attention_variant, domain_tags=args.domain_tags,
            anchor_token_id=args.anchor_token_id,
            pad_token_id=args.pad_token_id if args.pad_token_id is not None else -1,
            tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
            vocab_file=args.vocab_file, merge_file=args.merge_file,
            data_cache_path=args.data_cache_path,
            short_doc_keep_fraction=args.short_doc_keep_fraction,
            interleave_chunks=args.interleave_chunks,
            shuffle_samples=not args.no_sample_shuffle),
        optim=OptimConfig(
            lr=args.lr, min_lr=args.min_lr, lr_decay_style=args.lr_decay_style,
            lr_warmup_iters=args.lr_warmup_iters, lr_decay_iters=args.lr_decay_iters,
            weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad,
            train_iters=args.train_iters,
            check_for_nan_in_loss_and_grad=args.check_for_nan_in_loss_and_grad),
        checkpoint=CheckpointConfig(
            save=args.save, load=args.load, save_interval=args.save_interval,
            pretrained_checkpoint=args.pretrained_checkpoint,
            exit_interval=args.exit_interval, ckpt_step=args.ckpt_step,
            exit_signal_handler=args.exit_signal_handler, exit_signal=args.exit_signal,
            exit_duration_in_mins=args.exit_duration_in_mins,
            save_optim=args.save_optim, save_rng=args.save_rng, load_optim=args.load_optim,
            load_rng=args.load_rng, async_save=args.async_save,
            keep_last_checkpoints=args.keep_last_checkpoints,
            save_retain_interval=args.save_retain_interval),
        logging=LoggingConfig(args.log_interval, args.eval_interval, args.eval_iters,
                              args.tensorboard_dir, not args.no_progress_bar,
                              peak_tflops=args.peak_tflops),
        seed=args.seed,
        model_flags_given=architecture_flags_given(args, ARCHITECTURE_DEFAULTS),
    )

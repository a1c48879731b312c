"""The configuration of a training run, as data.

`arguments.config_from_args` builds a `TrainConfig` from Megatron-style flags; tests and
other tools build one directly. `TrainConfig.validate()` checks what does not depend on the
launch (world size is checked in `validate_world`), and every error names the flag to change.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from megatron_anchor.errors import UserError
from megatron_anchor import backends, layout, runtime
from megatron_anchor.model import ModelConfig

LR_DECAY_STYLES = ("constant", "linear", "cosine")
RECOMPUTE_GRANULARITIES = (None, "full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")  # Megatron's, for a dense model


class ConfigError(UserError):
    """A bad combination of flags; the message names what to change."""


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    cpu: bool = False
    # Megatron-Core's DistributedDataParallelConfig / OptimizerConfig: ZeRO-1 style sharding
    # of the optimizer state (and FP32 main weights) over the data-parallel ranks, and
    # overlapping the gradient reduce-scatter / parameter all-gather with compute.
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False


@dataclass
class DataConfig:
    data_path: List[str] = field(default_factory=list)  # Megatron style: [w1] p1 [w2 p2 ...]
    split: str = "969,30,1"
    seq_length: int = 1024
    micro_batch_size: int = 1      # windows per micro-batch (collated into one THD sequence)
    global_batch_size: int = 8     # windows per optimizer step, over all DP ranks
    variant: layout.Variant = layout.Variant.ANCHOR
    domain_tags: bool = False
    anchor_token_id: Optional[int] = None
    pad_token_id: int = 0
    tokenizer_type: Optional[str] = None
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    data_cache_path: Optional[str] = None
    short_doc_keep_fraction: float = 1.0
    interleave_chunks: Optional[int] = None
    shuffle_samples: bool = True   # serve windows in a seeded order (Megatron's shuffle_index)

    def __post_init__(self):
        # The edge of the data config (flags, train_config.json): a name becomes the variant.
        self.variant = layout.get_variant(self.variant)


@dataclass
class OptimConfig:
    lr: float = 2e-5
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None   # None: --train-iters
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    train_iters: int = 100
    # Stop at the first non-finite loss, gradient norm or validation loss, before saving
    # (Megatron-LM's check, on by default: --no-check-for-nan-in-loss-and-grad).
    check_for_nan_in_loss_and_grad: bool = True


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None    # None: save once, at the end (if --save)
    pretrained_checkpoint: Optional[str] = None  # model weights only, when not resuming
    exit_interval: Optional[int] = None    # stop (after saving) when iteration % N == 0
    ckpt_step: Optional[int] = None        # --load this iteration instead of the tracker's
    # Stopping cleanly (training/stopping.py): on a signal, after a time, saving first.
    exit_signal_handler: bool = False
    exit_signal: str = "SIGTERM"
    exit_duration_in_mins: Optional[float] = None
    # What a save holds, and what a resume restores (Megatron-LM's --no-save-optim, ...).
    save_optim: bool = True
    save_rng: bool = True
    load_optim: bool = True
    load_rng: bool = True
    async_save: bool = False
    # Retention: the newest K complete checkpoints, plus every multiple of N (None: all).
    keep_last_checkpoints: Optional[int] = None
    save_retain_interval: Optional[int] = None


@dataclass
class LoggingConfig:
    log_interval: int = 10
    eval_interval: Optional[int] = None    # None: evaluate only at the end (if --eval-iters)
    eval_iters: int = 0
    tensorboard_dir: Optional[str] = None
    progress_bar: bool = True
    # Dense peak TFLOP/s of one GPU for MFU (None: looked up from the GPU name for BF16 runs).
    peak_tflops: Optional[float] = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 1234
    # Token ids the data needs, resolved from the tokenizer (tag tokens per domain name).
    domain_tag_ids: Optional[Dict[str, List[int]]] = None
    # Architecture flags given on the command line (checked against a checkpoint's).
    model_flags_given: Dict[str, object] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        sections = {"model": ModelConfig, "parallel": ParallelConfig, "data": DataConfig,
                    "optim": OptimConfig, "checkpoint": CheckpointConfig,
                    "logging": LoggingConfig}
        kwargs = dict(values)
        for name, section in sections.items():
            if name in kwargs:
                kwargs[name] = (ModelConfig.from_dict(kwargs[name]) if section is ModelConfig
                                else section(**kwargs[name]))
        return cls(**kwargs)

    def validate(self) -> "TrainConfig":
        d, o, p, m = self.data, self.optim, self.parallel, self.model
        if not d.data_path:
            raise ConfigError("--data-path is required (Megatron style: [weight] prefix ...)")
        if m.hidden_size % m.num_attention_heads:
            raise ConfigError(f"--hidden-size {m.hidden_size} is not divisible by "
                              f"--num-attention-heads {m.num_attention_heads}")
        if d.micro_batch_size < 1 or d.global_batch_size < 1:
            raise ConfigError("--micro-batch-size and --global-batch-size must be >= 1")
        if d.global_batch_size % d.micro_batch_size:
            raise ConfigError(f"--global-batch-size {d.global_batch_size} must be a multiple of "
                              f"--micro-batch-size {d.micro_batch_size}")
        if d.domain_tags and not d.variant.anchor:
            raise ConfigError("--domain-tags goes with --attention-variant anchor")
        if o.lr_decay_style not in LR_DECAY_STYLES:
            raise ConfigError(f"--lr-decay-style must be one of {LR_DECAY_STYLES}")
        if o.train_iters < 1:
            raise ConfigError("--train-iters must be >= 1")
        if o.min_lr > o.lr:
            raise ConfigError(f"--min-lr {o.min_lr} is above --lr {o.lr}")
        decay = o.lr_decay_iters or o.train_iters
        if o.lr_warmup_iters >= decay:  # Megatron's scheduler asserts warmup < decay
            raise ConfigError(f"--lr-warmup-iters {o.lr_warmup_iters} must be below "
                              f"{'--lr-decay-iters' if o.lr_decay_iters else '--train-iters'} "
                              f"{decay}")
        backends.validate(m.attention_backend, cpu=p.cpu, tp=p.tensor_model_parallel_size,
                          cp=p.context_parallel_size, sequence_parallel=p.sequence_parallel,
                          cp_comm_type=m.cp_comm_type,
                          num_attention_heads=m.num_attention_heads,
                          num_query_groups=m.num_query_groups)
        if self.logging.eval_interval is not None and self.logging.eval_interval < 1:
            raise ConfigError("--eval-interval must be >= 1")
        self.validate_memory_features()
        self.validate_checkpointing()
        return self

    def window_layout(self) -> layout.WindowLayout:
        """The packed-window layout of this run (its rules checked as it is built); build it
        once, after the tokenizer ids are resolved, and hand it to every dataset."""
        d = self.data
        return layout.WindowLayout(
            seq_length=d.seq_length, variant=d.variant, anchor_token_id=d.anchor_token_id,
            pad_token_id=d.pad_token_id, cp_size=self.parallel.context_parallel_size,
            interleave_chunks=d.interleave_chunks)

    def validate_memory_features(self) -> None:
        """Activation recomputation and the distributed optimizer, as Megatron checks them."""
        m, p = self.model, self.parallel
        granularity = m.recompute_granularity
        if granularity not in RECOMPUTE_GRANULARITIES:
            raise ConfigError(f"--recompute-granularity must be one of "
                              f"{RECOMPUTE_GRANULARITIES[1:]}, got {granularity!r}")
        if granularity == "full":
            if m.recompute_method not in RECOMPUTE_METHODS:
                raise ConfigError("--recompute-granularity full needs --recompute-method "
                                  f"{' or '.join(RECOMPUTE_METHODS)}")
            if not m.recompute_num_layers or not 1 <= m.recompute_num_layers <= m.num_layers:
                raise ConfigError(f"--recompute-granularity full needs --recompute-num-layers "
                                  f"between 1 and --num-layers {m.num_layers}")
        elif m.recompute_method is not None or m.recompute_num_layers is not None:
            raise ConfigError("--recompute-method and --recompute-num-layers go with "
                              "--recompute-granularity full")
        if m.recompute_modules and granularity != "selective":
            raise ConfigError("--recompute-modules goes with --recompute-granularity selective")
        unknown = sorted(set(m.recompute_modules or ()) - set(RECOMPUTE_MODULES))
        if unknown:
            raise ConfigError(f"--recompute-modules {unknown} unknown for this dense model; "
                              f"choose from {RECOMPUTE_MODULES}")
        if p.overlap_param_gather and not (p.use_distributed_optimizer and p.overlap_grad_reduce):
            raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer and "
                              "--overlap-grad-reduce (as in Megatron-LM)")
        if self.logging.peak_tflops is not None and self.logging.peak_tflops <= 0:
            raise ConfigError(f"--peak-tflops must be positive, got {self.logging.peak_tflops}")

    def validate_checkpointing(self) -> None:
        """Saving, stopping and retention flags."""
        from megatron_anchor.training.stopping import SIGNALS

        c = self.checkpoint
        for flag, value in (("--save-interval", c.save_interval),
                            ("--exit-interval", c.exit_interval),
                            ("--keep-last-checkpoints", c.keep_last_checkpoints),
                            ("--save-retain-interval", c.save_retain_interval)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if c.exit_duration_in_mins is not None and c.exit_duration_in_mins <= 0:
            raise ConfigError(f"--exit-duration-in-mins must be positive, got "
                              f"{c.exit_duration_in_mins}")
        if c.exit_signal not in SIGNALS:
            raise ConfigError(f"--exit-signal must be one of {', '.join(SIGNALS)}, got "
                              f"{c.exit_signal!r}")
        needs_save = [flag for flag, on in (
            ("--keep-last-checkpoints", c.keep_last_checkpoints is not None),
            ("--save-retain-interval", c.save_retain_interval is not None),
            ("--async-save", c.async_save), ("--no-save-optim", not c.save_optim),
            ("--no-save-rng", not c.save_rng)) if on]
        if needs_save and not c.save:
            raise ConfigError(f"{needs_save[0]} goes with --save")
        if c.save_retain_interval and c.save_interval and \
                c.save_retain_interval % c.save_interval:
            # Megatron-LM's rule: a retained iteration must be one that is saved.
            raise ConfigError(f"--save-retain-interval {c.save_retain_interval} must be a "
                              f"multiple of --save-interval {c.save_interval}")

    def validate_world(self, world_size: int) -> int:
        """The data-parallel size for this world; checks the batch divides over it."""
        p = self.parallel
        dp = runtime.check_world_size(
            world_size, (p.tensor_model_parallel_size, p.context_parallel_size))
        per_step = self.data.micro_batch_size * dp
        if self.data.global_batch_size % per_step:
            raise ConfigError(
                f"--global-batch-size {self.data.global_batch_size} must be a multiple of "
                f"--micro-batch-size x data-parallel size = {self.data.micro_batch_size} x {dp}")
        return dp

    def num_microbatches(self, dp: int) -> int:
        return self.data.global_batch_size // (self.data.micro_batch_size * dp)

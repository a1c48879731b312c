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

from megatron_anchor.model import ModelConfig

LR_DECAY_STYLES = ("constant", "linear", "cosine")


class ConfigError(ValueError):
    """A bad combination of flags; the message names what to change."""


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    cpu: bool = False


@dataclass
class DataConfig:
    data_path: List[str] = field(default_factory=list)  # Megatron style: [w1] p1 [w2 p2 ...]
    split: str = "969,30,1"
    seq_length: int = 1024
    micro_batch_size: int = 1      # windows per micro-batch (collated into one THD sequence)
    global_batch_size: int = 8     # windows per optimizer step, over all DP ranks
    variant: str = "anchor"
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


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None    # None: save once, at the end (if --save)
    pretrained_checkpoint: Optional[str] = None  # model weights only, when not resuming
    exit_interval: Optional[int] = None    # stop (after saving) when iteration % N == 0


@dataclass
class LoggingConfig:
    log_interval: int = 10
    eval_interval: Optional[int] = None    # None: evaluate only at the end (if --eval-iters)
    eval_iters: int = 0
    tensorboard_dir: Optional[str] = None
    progress_bar: bool = True


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
        if d.seq_length <= 0:
            raise ConfigError(f"--seq-length must be positive, got {d.seq_length}")
        cp = p.context_parallel_size
        if cp > 1 and d.seq_length % (2 * cp):
            raise ConfigError(f"--seq-length {d.seq_length} must be a multiple of 2 x "
                              f"--context-parallel-size = {2 * cp}")
        if d.micro_batch_size < 1 or d.global_batch_size < 1:
            raise ConfigError("--micro-batch-size and --global-batch-size must be >= 1")
        if d.global_batch_size % d.micro_batch_size:
            raise ConfigError(f"--global-batch-size {d.global_batch_size} must be a multiple of "
                              f"--micro-batch-size {d.micro_batch_size}")
        if d.variant == "anchor" and d.anchor_token_id is None:
            raise ConfigError("--attention-variant anchor needs an anchor token: pass "
                              "--tokenizer-type/--tokenizer-model (BOS is used, else EOS) or "
                              "--anchor-token-id")
        if d.domain_tags and d.variant != "anchor":
            raise ConfigError("--domain-tags goes with --attention-variant anchor")
        if o.lr_decay_style not in LR_DECAY_STYLES:
            raise ConfigError(f"--lr-decay-style must be one of {LR_DECAY_STYLES}")
        if o.train_iters < 1:
            raise ConfigError("--train-iters must be >= 1")
        if o.min_lr > o.lr:
            raise ConfigError(f"--min-lr {o.min_lr} is above --lr {o.lr}")
        if o.lr_warmup_iters > (o.lr_decay_iters or o.train_iters):
            raise ConfigError("--lr-warmup-iters is longer than the decay (--train-iters or "
                              "--lr-decay-iters)")
        if p.sequence_parallel and m.attention_backend != "te":
            raise ConfigError("--sequence-parallel needs --attention-backend te")
        if m.attention_backend == "te" and p.cpu:
            raise ConfigError("--attention-backend te needs a GPU: drop --cpu or use "
                              "--attention-backend local")
        if m.bf16 and p.cpu:
            raise ConfigError("--bf16 is for GPU runs (Megatron's BF16 optimizer keeps FP32 "
                              "main weights on the GPU); drop it with --cpu")
        if self.logging.eval_interval is not None and self.logging.eval_interval < 1:
            raise ConfigError("--eval-interval must be >= 1")
        return self

    def validate_world(self, world_size: int) -> int:
        """The data-parallel size for this world; checks the batch divides over it."""
        p = self.parallel
        model_parallel = p.tensor_model_parallel_size * p.context_parallel_size
        if world_size % model_parallel:
            raise ConfigError(f"{world_size} processes do not divide into TP x CP = "
                              f"{model_parallel}; launch a multiple of {model_parallel}")
        dp = world_size // model_parallel
        per_step = self.data.micro_batch_size * dp
        if self.data.global_batch_size % per_step:
            raise ConfigError(
                f"--global-batch-size {self.data.global_batch_size} must be a multiple of "
                f"--micro-batch-size x data-parallel size = {self.data.micro_batch_size} x {dp}")
        return dp

    def num_microbatches(self, dp: int) -> int:
        return self.data.global_batch_size // (self.data.micro_batch_size * dp)

"""Training data: token ids from the tokenizer, window datasets, and each rank's micro-batches.

The global batch of iteration i is windows ``[i*G, (i+1)*G)`` of the train `WindowDataset`
(G = --global-batch-size). As in Megatron's `MegatronPretrainingSampler`, micro-batch k of
data-parallel rank r holds windows ``i*G + k*m*dp + r*m + [0, m)`` (m = --micro-batch-size).
The m windows are collated into one THD sequence, then cut to this rank's context-parallel
share. The data position is therefore just the iteration number: resuming needs nothing
else, and the windows do not depend on the number of ranks.
"""

from __future__ import annotations

import os
from typing import List, Optional

from megatron_anchor.data.tokenizer import TokenizerConfig, anchor_token_id, build_tokenizer
from megatron_anchor.layout import PackedBatch, WindowLayout, collate, shard_for_cp
from megatron_anchor.training.config import ConfigError, TrainConfig

PAD_TOKEN_NAMES = ("<|pad|>", "<pad>", "[PAD]")
TAG_TEMPLATE = "{name}\n"


# ----------------------------------------------------------------------------------------
# Token ids
# ----------------------------------------------------------------------------------------

def load_tokenizer(cfg: TrainConfig):
    """The data helper's tokenizer for --tokenizer-type, or None without one."""
    d = cfg.data
    if not d.tokenizer_type:
        return None
    return build_tokenizer(TokenizerConfig(
        tokenizer_type=d.tokenizer_type, tokenizer_model=d.tokenizer_model,
        vocab_file=d.vocab_file, merge_file=d.merge_file,
        vocab_size=cfg.model.vocab_size or None))


def _named_token_id(tokenizer, names) -> Optional[int]:
    lookup = getattr(getattr(tokenizer, "_tok", None), "token_to_id", None)
    for name in names if lookup else ():
        token_id = lookup(name)
        if token_id is not None:
            return int(token_id)
    return getattr(tokenizer, "pad", None)


def resolve_tokens(cfg: TrainConfig, tokenizer) -> TrainConfig:
    """Fill in vocabulary size, anchor (BOS, else EOS), pad and domain-tag ids."""
    d, m = cfg.data, cfg.model
    if tokenizer is not None:
        if not m.vocab_size:
            m.vocab_size = int(tokenizer.vocab_size)
        if d.anchor_token_id is None:
            d.anchor_token_id = anchor_token_id(tokenizer)
        if d.pad_token_id < 0:
            pad = _named_token_id(tokenizer, PAD_TOKEN_NAMES)
            d.pad_token_id = int(pad if pad is not None else tokenizer.eod)
    if not m.vocab_size:
        raise ConfigError("the vocabulary size is unknown: pass --tokenizer-type/"
                          "--tokenizer-model or --vocab-size")
    if d.pad_token_id < 0:
        d.pad_token_id = 0
    for name, value in (("--anchor-token-id", d.anchor_token_id), ("--pad-token-id", d.pad_token_id)):
        if value is not None and not 0 <= value < m.vocab_size:
            raise ConfigError(f"{name} {value} is outside the vocabulary (size {m.vocab_size})")
    if d.domain_tags:
        if tokenizer is None:
            raise ConfigError("--domain-tags tokenizes the domain names: pass --tokenizer-type "
                              "and --tokenizer-model")
        names = domain_names(cfg)
        cfg.domain_tag_ids = {n: [int(t) for t in tokenizer.encode_batch([TAG_TEMPLATE.format(name=n)])[0]]
                              for n in names}
    return cfg


def domain_names(cfg: TrainConfig) -> List[str]:
    """Domain names of the blend (tag store names, else the prefix's file name)."""
    from megatron_anchor.data.indexed import merge_domain_names, open_dataset
    from megatron_anchor.data.windows import parse_data_path

    prefixes, _ = parse_data_path(cfg.data.data_path)
    names, _ = merge_domain_names([open_dataset(p).domain_table(os.path.basename(p))
                                   for p in prefixes])
    return names


# ----------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------

def build_dataset(cfg: TrainConfig, split_name: str, num_windows: int,
                  window: Optional[WindowLayout] = None):
    """A `WindowDataset` of `num_windows` windows of one split (epochs repeat as needed).

    `window`: the run's window layout (`TrainConfig.window_layout()`), built once."""
    from megatron_anchor.data.indexed import DatasetError
    from megatron_anchor.data.windows import WindowConfig, WindowDataset

    d = cfg.data
    config = WindowConfig(
        layout=window or cfg.window_layout(), seed=cfg.seed, split=d.split,
        split_name=split_name, num_samples=num_windows,
        short_doc_keep_fraction=d.short_doc_keep_fraction, shuffle_samples=d.shuffle_samples,
        domain_tag_ids=cfg.domain_tag_ids if d.domain_tags else None,
        index_cache_dir=d.data_cache_path)
    try:
        return WindowDataset(d.data_path, config)
    except DatasetError as err:
        hint = (" (give the valid split documents with --split, or pass --eval-iters 0)"
                if split_name == "valid" else "")
        raise ConfigError(f"cannot build the {split_name} windows: {err}{hint}") from None


def build_datasets(cfg: TrainConfig, window: WindowLayout):
    """Train windows for every iteration, and fixed validation windows (or None)."""
    g = cfg.data.global_batch_size
    train = build_dataset(cfg, "train", cfg.optim.train_iters * g, window)
    valid = None
    if cfg.logging.eval_iters > 0:
        valid = build_dataset(cfg, "valid", cfg.logging.eval_iters * g, window)
    return train, valid


# ----------------------------------------------------------------------------------------
# Micro-batches of one rank
# ----------------------------------------------------------------------------------------

class MicroBatches:
    """This rank's micro-batches of a global batch (DP slice, collated, CP share)."""

    def __init__(self, cfg: TrainConfig, dp_rank: int, dp_size: int, cp_rank: int,
                 cp_size: int, device):
        self.m = cfg.data.micro_batch_size
        self.g = cfg.data.global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.cp_rank, self.cp_size = cp_rank, cp_size
        self.device = device
        self.num_microbatches = cfg.num_microbatches(dp_size)

    def window_indices(self, iteration: int) -> List[List[int]]:
        start = iteration * self.g
        return [[start + k * self.m * self.dp_size + self.dp_rank * self.m + j
                 for j in range(self.m)] for k in range(self.num_microbatches)]

    def for_iteration(self, dataset, iteration: int) -> List[PackedBatch]:
        return [self.assemble([dataset[i] for i in indices])
                for indices in self.window_indices(iteration)]

    def assemble(self, windows: List[PackedBatch]) -> PackedBatch:
        return assemble_microbatch(windows, self.cp_size, self.cp_rank, self.device)


def assemble_microbatch(windows: List[PackedBatch], cp_size: int, cp_rank: int,
                        device) -> PackedBatch:
    """Windows collated into one THD sequence, cut to this rank's CP share, on `device`."""
    return shard_for_cp(collate(windows), cp_size, cp_rank).to(device)

"""Glue for Megatron-LM's own trainer (`megatron.training`, `pretrain_gpt.py`).

Where Megatron-LM is installed (a Megatron-LM checkout on PYTHONPATH, or megatron-core >= 0.19
wheels, which ship `megatron/training` for Python >= 3.12), AnchorAttention runs under
Megatron-LM's trainer with three pieces from here:

* the layer spec: ``--spec megatron_anchor.megatron_lm_spec anchor_layer_spec --position-embedding-type none``
  (RoPE is applied by our core attention at window positions; Megatron's own would restart
  per segment);
* `train_valid_test_datasets_provider`: our document-aware window packer (`WindowDataset`),
  served as this data-parallel rank's micro-batches in Megatron's sample order
  (`MicroBatchIterator`, for ``--dataloader-type external``);
* `forward_step`: builds `AnchorPackedSeqParams` from the packed batch and returns the
  per-token-loss contract Megatron-LM expects (use ``--calculate-per-token-loss``).

A `pretrain_gpt.py`-style launcher (save as e.g. ``pretrain_anchor_mlm.py`` in a Megatron-LM
checkout)::

    from megatron_anchor.training import megatron_lm

    if __name__ == "__main__":
        megatron_lm.pretrain_main()

(`pretrain_main` calls Megatron-LM's `pretrain()` with the providers below, in the form the
installed trainer takes: up to megatron-core 0.18 `pretrain(provider, model_provider, ...,
extra_args_provider=)`; from 0.19 the arguments are parsed first into a
`PretrainConfigContainer`, the new first argument.)

    torchrun --nproc-per-node 8 pretrain_anchor_mlm.py \
        --spec megatron_anchor.megatron_lm_spec anchor_layer_spec --position-embedding-type none \
        --calculate-per-token-loss --micro-batch-size 1 --dataloader-type external ... \
        --attention-variant anchor --anchor-token-id 1

`--dataloader-type external`: Megatron-LM then hands the provider's objects to `forward_step`
as its data iterators (Megatron's own DataLoader cannot collate packed windows). A
micro-batch of `--micro-batch-size` windows is collated into one THD sequence.
Megatron-LM's `--seq-length` is the window.

Nothing here imports `megatron.training` at import time, so this module is importable (and its
batch logic testable) with megatron-core alone.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import warnings
from functools import partial

from megatron_anchor import backends
from megatron_anchor.layout import VARIANTS, PackedBatch, WindowLayout
from megatron_anchor.model import forward_packed
from megatron_anchor.training.data import assemble_microbatch
from megatron_anchor.training.train import loss_func  # Megatron's per-token-loss contract

# The plugin's flags under Megatron-LM, named as megatron-anchor-pretrain names them; the
# earlier --anchor-* spellings are kept as deprecated aliases.
DEPRECATED_FLAGS = {"--anchor-variant": "--attention-variant",
                    "--anchor-pad-token-id": "--pad-token-id",
                    "--anchor-rope-bf16": "--rope-bf16"}


def megatron_lm_available() -> bool:
    try:
        import megatron.training  # noqa: F401
    except ImportError:
        return False
    return True


def _require_megatron_lm():
    if not megatron_lm_available():
        raise ImportError(
            "megatron.training (Megatron-LM) is not importable: use a Megatron-LM checkout on "
            "PYTHONPATH or megatron-core >= 0.19 on Python >= 3.12; otherwise use "
            "megatron-anchor-pretrain, which needs megatron-core only")


class _Deprecated(argparse.Action):
    """Stores like the flag it stands for, and says once that the old name is deprecated."""

    def __init__(self, option_strings, dest, store_true=False, **kwargs):
        self.store_true = store_true
        super().__init__(option_strings, dest, nargs=0 if store_true else None, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in DEPRECATED_FLAGS:
            warnings.warn(f"{option_string} is deprecated: use {DEPRECATED_FLAGS[option_string]}",
                          FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, True if self.store_true else values)


def add_anchor_args(parser):
    """Megatron-LM `extra_args_provider`: the plugin's flags (the trainer's names)."""
    group = parser.add_argument_group("AnchorAttention")
    group.add_argument("--attention-variant", "--anchor-variant", dest="attention_variant",
                       default="anchor", choices=VARIANTS, action=_Deprecated,
                       help="who sees whom in a packed window (docs/design.md §2)")
    group.add_argument("--anchor-token-id", type=int, default=None,
                       help="the shared anchor token (the tokenizer's BOS, else its EOS)")
    group.add_argument("--pad-token-id", "--anchor-pad-token-id", dest="pad_token_id",
                       type=int, default=0, action=_Deprecated, help="the padding token")
    group.add_argument("--rope-bf16", "--anchor-rope-bf16", dest="rope_bf16", default=False,
                       action=_Deprecated, store_true=True,
                       help="diagnostic: RoPE tables and rotation in BF16 instead of FP32")
    return parser


def pretrain_main(argv=None):
    """Megatron-LM's `pretrain()` with this module's dataset provider, model provider,
    forward step and flags; `argv` replaces the command line (default: `sys.argv`)."""
    _require_megatron_lm()
    from megatron.core.enums import ModelType
    from megatron.training import pretrain

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    train_valid_test_datasets_provider.is_distributed = True
    if next(iter(inspect.signature(pretrain).parameters), None) == "cfg_container":
        # megatron-core >= 0.19: arguments parsed (and global) before pretrain() is called.
        from megatron.training.argument_utils import pretrain_cfg_container_from_args
        from megatron.training.arguments import parse_and_validate_args

        args = parse_and_validate_args(extra_args_provider=add_anchor_args)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"(?s).*recommended to use a ModelConfig")
            cfg_container = pretrain_cfg_container_from_args(args)
        return pretrain(cfg_container, train_valid_test_datasets_provider,
                        ModelType.encoder_or_decoder, forward_step, model_provider=model_provider)
    return pretrain(train_valid_test_datasets_provider, model_provider,
                    ModelType.encoder_or_decoder, forward_step,
                    extra_args_provider=add_anchor_args)


def backend_for_transformer_impl(transformer_impl: str) -> backends.AttentionBackend:
    """Megatron-LM's `--transformer-impl` mapped to our backend of the same kind."""
    return backends.get("te" if transformer_impl == "transformer_engine" else "local")


def layer_spec_from_args(args):
    """The layer spec for Megatron-LM's parsed arguments (what `megatron_lm_spec` exports)."""
    from megatron_anchor.errors import UserError
    from megatron_anchor.spec import get_anchor_layer_spec

    if getattr(args, "position_embedding_type", "none") != "none":
        raise UserError(
            "megatron_anchor.megatron_lm_spec applies RoPE itself at window positions: "
            "run pretrain_gpt.py with --position-embedding-type none (and keep --rotary-base)")
    backend = backend_for_transformer_impl(getattr(args, "transformer_impl", "local"))
    # Megatron-LM's --use-rope-scaling is Llama-3.1's rule with Megatron-Core's fixed bands.
    scaling = {"rope_type": "llama3", "factor": getattr(args, "rope_scaling_factor", 8.0),
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192} \
        if getattr(args, "use_rope_scaling", False) else None
    return get_anchor_layer_spec(backend, rotary_base=getattr(args, "rotary_base", 10000),
                                 rope_fp32=not getattr(args, "rope_bf16", False),
                                 qk_layernorm=getattr(args, "qk_layernorm", False),
                                 rope_scaling=scaling)


def model_provider(pre_process=True, post_process=True, *unused, **unused_kw):
    """GPTModel from Megatron-LM's args with the AnchorAttention spec."""
    _require_megatron_lm()
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.spec_utils import import_module
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    args = get_args()
    validate_megatron_lm_args(args)
    config = core_transformer_config_from_args(args)
    return GPTModel(config=config, transformer_layer_spec=import_module(
                        ("megatron_anchor.megatron_lm_spec", "anchor_layer_spec")),
                    vocab_size=args.padded_vocab_size, max_sequence_length=args.seq_length,
                    pre_process=pre_process, post_process=post_process,
                    position_embedding_type="none",
                    share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                    parallel_output=True)


def validate_megatron_lm_args(args) -> None:
    """The plugin's rules on Megatron-LM's parsed arguments (the same registry and layout
    checks as megatron-anchor-pretrain), before Megatron builds anything."""
    from megatron_anchor import runtime

    cp = getattr(args, "context_parallel_size", 1)
    comm_types = getattr(args, "cp_comm_type", "p2p")
    backend = backend_for_transformer_impl(getattr(args, "transformer_impl", "local"))
    for comm_type in (comm_types if isinstance(comm_types, (list, tuple)) else [comm_types]):
        backend.validate(
            cpu=runtime.is_cpu(), tp=args.tensor_model_parallel_size, cp=cp,
            sequence_parallel=getattr(args, "sequence_parallel", False),
            cp_comm_type=comm_type, num_attention_heads=args.num_attention_heads,
            num_query_groups=getattr(args, "num_query_groups", None))
    window_layout_from_args(args)


def window_layout_from_args(args) -> WindowLayout:
    """The packed-window layout of Megatron-LM's arguments (its rules checked as built)."""
    return WindowLayout(seq_length=args.seq_length, variant=args.attention_variant,
                        anchor_token_id=args.anchor_token_id, pad_token_id=args.pad_token_id,
                        cp_size=args.context_parallel_size)


def window_config_from_args(args, split_name: str, num_samples: int):
    from megatron_anchor.data.windows import WindowConfig

    return WindowConfig(layout=window_layout_from_args(args), seed=args.seed, split=args.split,
                        split_name=split_name, num_samples=num_samples,
                        index_cache_dir=getattr(args, "data_cache_path", None))


class MicroBatchIterator:
    """One data-parallel rank's micro-batches of a window dataset, in Megatron's sample order.

    As Megatron-LM's `MegatronPretrainingSampler`: the samples from `consumed_samples` on are
    taken m·dp at a time (m = micro-batch size), and this rank gets its m of them. Each item
    is a list of m `PackedBatch` windows (`forward_step` collates them). `cyclic` wraps around
    (validation and test, which Megatron reads again at every evaluation); otherwise the
    iterator ends with the dataset.
    """

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0, cyclic: bool = False):
        self.dataset, self.micro_batch_size = dataset, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples, self.cyclic = consumed_samples, cyclic

    def __iter__(self):
        return self

    def __next__(self) -> list:
        m, total = self.micro_batch_size, len(self.dataset)
        start = self.consumed_samples + self.dp_rank * m
        if not self.cyclic and self.consumed_samples + m * self.dp_size > total:
            raise StopIteration
        self.consumed_samples += m * self.dp_size
        return [self.dataset[i % total] for i in range(start, start + m)]


def train_valid_test_datasets_provider(train_val_test_num_samples):
    """Megatron-LM dataset provider: each split's `WindowDataset` as this rank's
    `MicroBatchIterator` (None for an empty split), resuming at Megatron's consumed samples."""
    _require_megatron_lm()
    from megatron.core import parallel_state
    from megatron.training import get_args

    from megatron_anchor.data.indexed import DatasetError
    from megatron_anchor.data.windows import WindowDataset

    args = get_args()
    consumed = {"train": getattr(args, "consumed_train_samples", 0) or 0,
                "valid": getattr(args, "consumed_valid_samples", 0) or 0, "test": 0}
    iterators = []
    for name, count in zip(("train", "valid", "test"), train_val_test_num_samples):
        try:
            dataset = (WindowDataset(args.data_path, window_config_from_args(args, name, count))
                       if count else None)
        except DatasetError:
            if name == "train":
                raise
            dataset = None
        iterators.append(None if dataset is None else MicroBatchIterator(
            dataset, args.micro_batch_size, parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size(), consumed[name],
            cyclic=name != "train"))
    return tuple(iterators)


def get_batch(data_iterator, cp_size: int, cp_rank: int, device) -> PackedBatch:
    """Next micro-batch (a window or a list of windows), this rank's CP share, on `device`."""
    batch = next(data_iterator)
    windows = list(batch) if isinstance(batch, (list, tuple)) else [batch]
    return assemble_microbatch(windows, cp_size, cp_rank, device)


def forward_step(data_iterator, model):
    """Megatron-LM `forward_step_func` for packed windows (THD + AnchorPackedSeqParams)."""
    from megatron.core import parallel_state

    device = next(model.parameters()).device
    batch = get_batch(data_iterator, parallel_state.get_context_parallel_world_size(),
                      parallel_state.get_context_parallel_rank(), device)
    _, per_token_loss = forward_packed(model, batch, return_logits=False)
    return per_token_loss, partial(loss_func, batch)

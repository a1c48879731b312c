"""megatron-anchor: AnchorAttention for long-context continued pretraining on Megatron-Core.

The packed-batch contract is re-exported lazily: importing the package (e.g. for a tool's
--help) does not import Megatron-Core.
"""

__version__ = "0.1.0"

_LAYOUT_EXPORTS = (
    "VARIANTS", "AnchorPackedSeqParams", "PackedBatch", "collate", "cp_partition_indices",
    "pack_documents", "shard_for_cp",
)
__all__ = list(_LAYOUT_EXPORTS)


def __getattr__(name):
    if name in _LAYOUT_EXPORTS:
        from megatron_anchor import layout

        return getattr(layout, name)
    raise AttributeError(f"module 'megatron_anchor' has no attribute {name!r}")

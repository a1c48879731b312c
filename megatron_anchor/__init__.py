"""megatron-anchor: AnchorAttention for long-context continued pretraining on Megatron-Core."""

__version__ = "0.1.0"

from megatron_anchor.layout import (  # noqa: F401
    VARIANTS,
    AnchorPackedSeqParams,
    PackedBatch,
    collate,
    cp_partition_indices,
    pack_documents,
    shard_for_cp,
)

"""megatron-anchor: AnchorAttention for long-context continued pretraining on Megatron-Core.

The packed-batch contract (`megatron_anchor.layout`, which imports neither Megatron nor a
model) is re-exported lazily, so importing the package (e.g. for a tool's --help) is cheap.
"""

__version__ = "0.1.0"


def _quiet_expected_megatron_warnings() -> None:
    """Megatron-Core warns once per module that TE/Apex are missing; where they are, it
    does not. `megatron_anchor.runtime` says it once, in one line, on CPU runs."""
    import warnings

    for pattern in (r".*(Transformer Engine|Apex).*(is|are) not installed.*",
                    r".*full scope is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)


_quiet_expected_megatron_warnings()

_LAYOUT_EXPORTS = (
    "VARIANTS", "PackedBatch", "Variant", "WindowLayout", "collate", "cp_partition_indices",
    "pack_documents", "shard_for_cp",
)
__all__ = list(_LAYOUT_EXPORTS)


def __getattr__(name):
    if name in _LAYOUT_EXPORTS:
        from megatron_anchor import layout

        return getattr(layout, name)
    raise AttributeError(f"module 'megatron_anchor' has no attribute {name!r}")

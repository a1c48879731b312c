"""Core attention for packed (THD) windows: `local` (pure PyTorch), `te` (Transformer Engine),
`varlen` (torch's varlen_attn), and the FP64 dense reference. `megatron_anchor.backends`
says which backend supplies which class and when each can run."""

from megatron_anchor.errors import UserError


class BackendError(UserError):
    """A backend that is unknown, not installed, or asked for an option it does not support."""

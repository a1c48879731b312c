"""Attention backends: one registry of backend objects that say what they supply and need.

As Megatron-Core's `BackendSpecProvider` (`models/backends.py`), a backend is an object
passed once to the spec builder (`spec.get_anchor_layer_spec(backend, ...)`): it names the
pieces it supplies (the base GPT layer spec it plugs into, its core-attention class) and
owns the rules for its options (`validate`). The trainer, the parity tool, the Megatron-LM
glue and every CLI take their choices (`BACKEND_NAMES`) and their checks from here; a name
given on the command line is resolved into the object once (`get`).

| backend | where | core attention |
|---|---|---|
| `local` | anywhere (CPU CI, GPUs) | `attention.core.LocalAnchorAttention`: exact pure PyTorch, CP by K/V all-gather |
| `te` | GPU clusters with Transformer Engine | `attention.te`: Megatron's `TEDotProductAttention`, THD `padding_causal`, TE's CP |
| `varlen` | GPUs without Transformer Engine (torch >= 2.10) | `attention.varlen`: torch's `varlen_attn` (FlashAttention-2), THD, CP by K/V all-gather |

Megatron-Core is imported inside the methods, so a tool's `--help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

# Defined beside the attention modules (they raise it too); callers use backends.BackendError.
from megatron_anchor.attention import BackendError  # noqa: F401


def _local_core_attention():
    from megatron_anchor.attention.core import LocalAnchorAttention

    return LocalAnchorAttention


def _te_core_attention():
    from megatron_anchor.attention.te import te_anchor_attention_class

    return te_anchor_attention_class()


def _varlen_core_attention():
    from megatron_anchor.attention.varlen import VarlenAnchorAttention

    return VarlenAnchorAttention


def _varlen_missing():
    from megatron_anchor.attention.varlen import varlen_unavailable_reason

    return varlen_unavailable_reason()


def _local_layer_spec(qk_layernorm: bool):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm)


def _te_layer_spec(qk_layernorm: bool):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)


def transformer_engine_available() -> bool:
    """A real import: Megatron-Core binds missing TE classes to MagicMock stand-ins."""
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401  (the part we use)
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    description: str
    needs_gpu: bool
    needs_transformer_engine: bool
    supports_sequence_parallel: bool
    uses_cp_comm_type: bool
    _core_attention: Callable[[], type]
    _layer_spec: Callable[[bool], object]
    # What else it needs: a check returning why it cannot run here, or None.
    _needs: Optional[Callable[[], Optional[str]]] = None

    def core_attention(self) -> type:
        """The core-attention class to put in `self_attention.submodules.core_attention`."""
        self.require_installed()
        return self._core_attention()

    def base_layer_spec(self, qk_layernorm: bool = False):
        """Megatron-Core's own GPT layer spec this backend plugs into."""
        self.require_installed()
        return self._layer_spec(qk_layernorm)

    def require_installed(self) -> None:
        missing = self._needs() if self._needs is not None else None
        if missing:
            raise BackendError(f"attention backend {self.name!r} {missing}: use "
                               "--attention-backend local")
        if self.needs_transformer_engine and not transformer_engine_available():
            raise BackendError(
                f"attention backend {self.name!r} needs Transformer Engine, which is not "
                "importable here: install it (pip install 'megatron-anchor[te]' on a CUDA "
                "machine, or use an NGC PyTorch container), or use --attention-backend local")

    def validate(self, *, cpu: bool = False, tp: int = 1, cp: int = 1,
                 sequence_parallel: bool = False, cp_comm_type: Optional[str] = "p2p",
                 num_attention_heads: Optional[int] = None,
                 num_query_groups: Optional[int] = None,
                 te_version: Optional[str] = None) -> "AttentionBackend":
        """Refuse, with the flag to change, what this backend cannot run; returns itself."""
        if self.needs_gpu and cpu:
            raise BackendError(f"--attention-backend {self.name} needs a GPU: drop --cpu, or "
                               "use --attention-backend local")
        if sequence_parallel and not self.supports_sequence_parallel:
            raise BackendError(f"--sequence-parallel needs --attention-backend te (it shards "
                               f"activations along the THD token axis); {self.name!r} cannot")
        if self.uses_cp_comm_type and cp > 1:
            from megatron_anchor.attention.te_cp import TEVersionError, check_te_cp_comm_type

            heads = None
            if num_attention_heads is not None:
                groups = num_query_groups or num_attention_heads
                heads = (num_attention_heads // tp, groups // tp)
            try:
                check_te_cp_comm_type(cp_comm_type, cp, te_version=te_version,
                                      heads_per_tp_rank=heads)
            except TEVersionError as err:
                raise BackendError(str(err)) from None
        if te_version is None and not cpu:
            self.require_installed()
        return self


BACKENDS = {
    "local": AttentionBackend(
        name="local", description="pure PyTorch, exact, any device; CP by K/V all-gather",
        needs_gpu=False, needs_transformer_engine=False, supports_sequence_parallel=False,
        uses_cp_comm_type=False, _core_attention=_local_core_attention,
        _layer_spec=_local_layer_spec),
    "te": AttentionBackend(
        name="te", description="Transformer Engine fused attention, THD padding_causal, TE CP",
        needs_gpu=True, needs_transformer_engine=True, supports_sequence_parallel=True,
        uses_cp_comm_type=True, _core_attention=_te_core_attention,
        _layer_spec=_te_layer_spec),
    "varlen": AttentionBackend(
        name="varlen", description="torch varlen_attn (FlashAttention-2), THD, CP by K/V all-gather",
        needs_gpu=True, needs_transformer_engine=False, supports_sequence_parallel=False,
        uses_cp_comm_type=False, _core_attention=_varlen_core_attention,
        _layer_spec=_local_layer_spec, _needs=_varlen_missing),
}
BACKEND_NAMES = tuple(BACKENDS)


def get(name: str) -> AttentionBackend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise BackendError(f"unknown attention backend {name!r}: choose "
                           f"{' or '.join(BACKEND_NAMES)}") from None


def validate(name: str, **options) -> AttentionBackend:
    return get(name).validate(**options)

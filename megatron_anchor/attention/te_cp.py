"""Which Transformer Engine CP communication types run THD (packed) batches.

Read from TE's `attn_forward_func_with_cp` and the CP autograd functions in
`transformer_engine/pytorch/attention/dot_product_attention/context_parallel.py`:

* ``p2p`` (KV ring exchange): THD with padded cu_seqlens since TE 1.x (we require 1.13).
* ``a2a`` (QKVO all-to-all, "Ulysses"): `AttnFuncWithCPAndQKVOA2A` asserted
  ``qkv_format != "thd"`` up to TE 2.9; THD runs from TE 2.10. It also needs the number
  of query heads and of key/value heads per TP rank to be divisible by CP.
* ``all_gather`` (KV all-gather): asserted ``qkv_format != "thd"`` up to TE 2.17; THD
  runs from TE 2.18.
* ``a2a+p2p`` (hierarchical): asserted ``qkv_format != "thd"`` up to TE 2.18; THD runs
  from TE 2.19. Megatron also needs `--hierarchical-context-parallel-sizes`.

An older TE fails inside the first forward with a bare AssertionError; we refuse the
combination up front with the version needed instead.
"""

from __future__ import annotations

from typing import Optional

from megatron_anchor.errors import UserError

CP_COMM_TYPES = ("p2p", "a2a", "all_gather", "a2a+p2p")


class TEVersionError(UserError):
    """A CP communication type the installed Transformer Engine cannot run on THD batches."""

# Oldest Transformer Engine whose CP implementation accepts qkv_format="thd".
THD_MIN_TE_VERSION = {
    "p2p": (1, 13),
    "a2a": (2, 10),
    "all_gather": (2, 18),
    "a2a+p2p": (2, 19),
}


def _version_tuple(version: str) -> tuple[int, ...]:
    numbers = []
    for part in version.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        numbers.append(int(digits))
        if not part.isdigit():  # "0rc1", "20dev0": the numeric head counts, the rest ends it
            break
    return tuple(numbers)


def installed_te_version() -> Optional[str]:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    for dist_name in ("transformer-engine", "transformer_engine", "transformer-engine-torch"):
        try:
            return version(dist_name)
        except PackageNotFoundError:
            continue
    return None


def check_te_cp_comm_type(cp_comm_type: str, context_parallel_size: int,
                          te_version: Optional[str] = None,
                          heads_per_tp_rank: Optional[tuple[int, int]] = None) -> None:
    """Raise TEVersionError when TE `te_version` cannot run THD batches with this CP setup.

    `heads_per_tp_rank`: (query heads, key/value heads) per TP rank, checked for ``a2a``.
    """
    if context_parallel_size <= 1:
        return
    if cp_comm_type not in CP_COMM_TYPES:
        raise TEVersionError(f"--cp-comm-type {cp_comm_type!r} is not one of "
                         f"{', '.join(CP_COMM_TYPES)}")
    te_version = te_version if te_version is not None else installed_te_version()
    if te_version is None:
        raise TEVersionError("the te attention backend with context parallelism needs Transformer "
                         "Engine; it is not installed (use --attention-backend local)")
    needed = THD_MIN_TE_VERSION[cp_comm_type]
    if _version_tuple(te_version) < needed:
        supported = [t for t in CP_COMM_TYPES
                     if _version_tuple(te_version) >= THD_MIN_TE_VERSION[t]]
        raise TEVersionError(
            f"Transformer Engine {te_version} cannot run packed (THD) batches with "
            f"--cp-comm-type {cp_comm_type}: that needs TE >= "
            f"{'.'.join(map(str, needed))}. With this TE use --cp-comm-type "
            f"{' or '.join(supported) or 'p2p (after upgrading TE)'}"
        )
    if cp_comm_type == "a2a" and heads_per_tp_rank is not None \
            and any(h % context_parallel_size for h in heads_per_tp_rank):
        q_heads, kv_heads = heads_per_tp_rank
        raise TEVersionError(
            f"--cp-comm-type a2a scatters attention heads over CP ranks: {q_heads} query and "
            f"{kv_heads} key/value heads per TP rank must both divide by "
            f"CP={context_parallel_size}; use p2p"
        )

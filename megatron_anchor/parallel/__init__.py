"""Parallel layouts and parity: the same model and batch must give the same numbers in
every tensor/context-parallel layout (docs/design.md §3).

* `layouts`: ``tp2cp2``-style layout names, and re-initialising Megatron-Core's process
  groups for one layout over an existing world (data-parallel replicas fill the rest).
* `sharding`: Megatron's tensor-parallel split of a full (TP=1) state dict, and the
  inverse gather of gradients, both read from the parameters' own TP attributes.
* `gather`: full logits from vocab-parallel, CP-sharded ones.
* `verify_parity`: the ``megatron-anchor-verify-parity`` tool.
"""

from megatron_anchor.parallel.layouts import Layout, parse_layouts  # noqa: F401

"""Merge indexed-dataset shards into one, domain tags included.

Like Megatron-LM's `tools/merge_datasets.py` (`--input DIR` takes every `.bin`/`.idx` pair in a
directory, in sorted order), or `--datasets PREFIX ...` in the order given. The token data and
index are concatenated by Megatron-Core's `IndexedDatasetBuilder.add_index`. Tag stores are
merged alongside (`indexed.merge_domain_names`): the names tables are unioned in
first-appearance order and each shard's ids are remapped into the union.

`merge_datasets(MergeConfig) -> summary` is the library entry; the flags, the printed summary
and the exit status are `megatron_anchor.cli.merge_datasets`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from megatron_anchor.data.indexed import (
    AtomicOutput,
    DatasetError,
    bin_path,
    dom_path,
    idx_path,
    megatron_indexed,
    merge_domain_names,
    open_dataset,
    write_domain_store,
)


@dataclass
class MergeConfig:
    """Shards to merge, in order, and where to write the result."""

    prefixes: List[str]
    output_prefix: str
    default_domain: Optional[str] = None  # for shards without a tag store


def shard_prefixes(directory: str) -> List[str]:
    if not os.path.isdir(directory):
        raise DatasetError(f"--input: not a directory: {directory}")
    prefixes = sorted(
        os.path.join(directory, name[:-4]) for name in os.listdir(directory)
        if name.endswith(".idx") and os.path.isfile(os.path.join(directory, name[:-4] + ".bin"))
    )
    if not prefixes:
        raise DatasetError(f"--input: no .bin/.idx pairs in {directory}")
    return prefixes


def merge_datasets(config: MergeConfig) -> dict:
    """Merge the shards (validated first) into `config.output_prefix`; returns a summary."""
    prefixes, output_prefix = config.prefixes, config.output_prefix
    if not prefixes:
        raise DatasetError("no shards to merge: give --datasets or --input")
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in prefixes}:
        raise DatasetError(f"--output-prefix {output_prefix} is one of the inputs")
    shards = [open_dataset(p) for p in prefixes]
    dtypes = {np.dtype(s.dtype).name for s in shards}
    if len(dtypes) > 1:
        listing = ", ".join(f"{s.prefix} ({np.dtype(s.dtype).name})" for s in shards)
        raise DatasetError(f"cannot merge shards of different token dtypes: {listing}; "
                           "were they tokenized with different tokenizers?")
    names, ids = _merged_domains(shards, config.default_domain)

    with AtomicOutput(output_prefix) as output:
        builder = megatron_indexed().IndexedDatasetBuilder(
            bin_path(output.prefix), dtype=shards[0].dtype)
        for shard in shards:
            builder.add_index(shard.prefix)
        builder.finalize(idx_path(output.prefix))
        if names is not None:
            write_domain_store(dom_path(output.prefix), ids, names, idx_path(output.prefix))
        output.commit()
    return {
        "output": output_prefix,
        "shards": prefixes,
        "documents": sum(s.num_documents for s in shards),
        "tokens": int(sum(int(s.document_lengths().sum()) for s in shards)),
        "domains": None if names is None else _counts(names, ids),
    }


def _merged_domains(shards, default_domain):
    """(names, ids) of the union of the shards' tag stores, or (None, None) if none has one."""
    tagged = [s for s in shards if s.domains is not None]
    if not tagged:
        return None, None
    untagged = [s.prefix for s in shards if s.domains is None]
    if untagged and default_domain is None:
        raise DatasetError(f"shards without a domain tag store: {', '.join(untagged)}; pass "
                           "--default-domain to tag their documents")
    names, ids = merge_domain_names([s.domain_table(default_domain) for s in shards])
    return names, np.concatenate(ids)


def _counts(names, ids) -> dict:
    per_id = np.bincount(ids, minlength=len(names))
    return {name: int(n) for name, n in zip(names, per_id)}

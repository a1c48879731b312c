"""Merge indexed-dataset shards into one, domain tags included.

Like Megatron-LM's `tools/merge_datasets.py` (`--input DIR` takes every `.bin`/`.idx` pair in a
directory, in sorted order), or `--datasets PREFIX ...` in the order given. The token data and
index are concatenated by Megatron-Core's `IndexedDatasetBuilder.add_index`. Tag stores are
merged alongside: the names tables are unioned in first-appearance order and each shard's ids
are remapped into the union.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import List

import numpy as np

from megatron_anchor.data.indexed import (
    AtomicOutput,
    DatasetError,
    bin_path,
    dom_path,
    idx_path,
    megatron_indexed,
    open_dataset,
    write_domain_store,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="merge_datasets.py",
        description="Merge Megatron indexed datasets (.bin/.idx) and their domain tag stores "
                    "(.dom) into one dataset, shard order preserved.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="directory holding the shards (every PREFIX.idx with a "
                                        "PREFIX.bin, merged in sorted order)")
    source.add_argument("--datasets", nargs="+", help="shard prefixes, merged in this order")
    parser.add_argument("--output-prefix", required=True, help="prefix of the merged dataset")
    parser.add_argument("--default-domain", default=None,
                        help="domain for shards that have no tag store (otherwise mixing tagged "
                             "and untagged shards is an error)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


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


def merge_datasets(prefixes: List[str], output_prefix: str,
                   default_domain: str | None = None) -> dict:
    """Merge `prefixes` (validated first) into `output_prefix`; returns a summary."""
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in prefixes}:
        raise DatasetError(f"--output-prefix {output_prefix} is one of the inputs")
    shards = [open_dataset(p) for p in prefixes]
    dtypes = {np.dtype(s.dtype).name for s in shards}
    if len(dtypes) > 1:
        listing = ", ".join(f"{s.prefix} ({np.dtype(s.dtype).name})" for s in shards)
        raise DatasetError(f"cannot merge shards of different token dtypes: {listing}; "
                           "were they tokenized with different tokenizers?")
    names, ids = _merged_domains(shards, default_domain)

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
    names: List[str] = []
    merged_ids = []
    for shard in shards:
        shard_names = shard.domains.names if shard.domains else [default_domain]
        shard_ids = shard.domains.ids if shard.domains else np.zeros(shard.num_documents, np.int64)
        remap = []
        for name in shard_names:
            if name not in names:
                names.append(name)
            remap.append(names.index(name))
        merged_ids.append(np.asarray(remap, dtype=np.int64)[shard_ids.astype(np.int64)])
    return names, np.concatenate(merged_ids)


def _counts(names, ids) -> dict:
    per_id = np.bincount(ids, minlength=len(names))
    return {name: int(n) for name, n in zip(names, per_id)}


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        prefixes = args.datasets or shard_prefixes(args.input)
        summary = merge_datasets(prefixes, args.output_prefix, args.default_domain)
    except DatasetError as err:
        raise SystemExit(f"merge_datasets: error: {err}") from None
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"merged {len(prefixes)} shards into {summary['output']}: "
              f"{summary['documents']:,} documents, {summary['tokens']:,} tokens")
        if summary["domains"]:
            print("documents per domain: " + ", ".join(
                f"{k}={v:,}" for k, v in summary["domains"].items()))
    return summary


if __name__ == "__main__":
    main()

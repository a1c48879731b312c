"""Megatron indexed datasets (`.bin`/`.idx`) plus our per-document domain tag store (`.dom`).

The `.bin`/`.idx` pair is written and read by Megatron-Core's own `IndexedDatasetBuilder` and
`IndexedDataset`; this module only adds:

* the domain tag store: one small file `{prefix}.dom` holding a domain id per document and the
  table of domain names, tied to its `.idx` by the document count and the `.idx` SHA-256;
* `open_dataset(prefix)`: validates the pair (truncated `.bin`, unexpected dtype, a tag store
  that belongs to another index) and raises `DatasetError` with a clear message instead of the
  asserts or garbage reads Megatron would give;
* `AtomicOutput`: temporaries in the output directory, renamed into place only on success.

`.dom` layout (little endian): 8-byte magic ``MADOM\\x00\\x00\\x01``, uint64 header length,
a UTF-8 JSON header ``{"dtype", "num_documents", "idx_sha256", "names"}``, then
`num_documents` ids of `dtype` (int16 or int32). It is deterministic byte for byte (no
timestamps), which `.npz` would not be.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_anchor.errors import UserError

DOMAIN_SUFFIX = ".dom"
_DOMAIN_MAGIC = b"MADOM\x00\x00\x01"
# Token dtypes a GPT dataset can hold; Megatron picks uint16 below 65500 ids, else int32.
TOKEN_DTYPES = (np.uint16, np.int32, np.int64)


class DatasetError(UserError):
    """A dataset or input problem the user must fix; tools print it without a traceback."""


def megatron_indexed():
    """Megatron-Core's indexed_dataset module (imported lazily: it pulls in all of mcore)."""
    with warnings.catch_warnings():
        # Megatron-Core warns at import time that TE/apex are missing; irrelevant for data.
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def token_dtype(vocab_size: int):
    """The `.bin` dtype Megatron uses for a vocabulary of `vocab_size` ids."""
    return megatron_indexed().DType.optimal_dtype(vocab_size)


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def dom_path(prefix: str) -> str:
    return prefix + DOMAIN_SUFFIX


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------
# Domain tag store
# ----------------------------------------------------------------------------------------

@dataclass
class DomainStore:
    """Per-document domain ids and the names they index."""

    ids: np.ndarray  # one id per document, int16 or int32
    names: List[str]

    def name_of(self, document: int) -> str:
        return self.names[int(self.ids[document])]


def merge_domain_names(tables: Sequence[Tuple[Sequence[str], Optional[Sequence[int]]]]
                       ) -> Tuple[List[str], List[Optional[np.ndarray]]]:
    """Merge per-part domain tables (shards, sources, partitions) into one.

    `tables` holds a `(names, ids)` pair per part (`ids` index `names`, or None when only the
    names matter). Returns the union of the names in first-appearance order, as one pass over
    all parts in order would number them, and each part's ids remapped into it (int64).
    """
    names: List[str] = []
    position: Dict[str, int] = {}
    merged_ids: List[Optional[np.ndarray]] = []
    for part_names, ids in tables:
        remap = []
        for name in part_names:
            if name not in position:
                position[name] = len(names)
                names.append(name)
            remap.append(position[name])
        merged_ids.append(None if ids is None else
                          np.asarray(remap, dtype=np.int64)[np.asarray(ids, dtype=np.int64)])
    return names, merged_ids


def domain_id_dtype(num_names: int):
    return np.int16 if num_names <= np.iinfo(np.int16).max else np.int32


def write_domain_store(path: str, ids: Sequence[int], names: Sequence[str], idx_file: str) -> None:
    """Write the tag store for the index at `idx_file` (whose hash it records)."""
    ids = np.asarray(ids, dtype=domain_id_dtype(len(names)))
    if ids.size and (ids.min() < 0 or ids.max() >= len(names)):
        raise DatasetError(f"domain ids out of range 0..{len(names) - 1} for {path}")
    header = json.dumps(
        {
            "dtype": ids.dtype.name,
            "num_documents": int(ids.size),
            "idx_sha256": file_sha256(idx_file),
            "names": list(names),
        },
        sort_keys=True,
    ).encode("utf-8")
    with open(path, "wb") as f:
        f.write(_DOMAIN_MAGIC + struct.pack("<Q", len(header)) + header)
        f.write(ids.tobytes(order="C"))


def read_domain_store(path: str, idx_file: Optional[str] = None,
                      num_documents: Optional[int] = None) -> DomainStore:
    """Read and validate a tag store; with `idx_file`, check it belongs to that index."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:8] != _DOMAIN_MAGIC or len(raw) < 16:
        raise DatasetError(f"{path}: not a megatron-anchor domain tag store (bad magic)")
    (header_len,) = struct.unpack("<Q", raw[8:16])
    try:
        header = json.loads(raw[16:16 + header_len].decode("utf-8"))
        dtype = np.dtype(header["dtype"])
        count, names = int(header["num_documents"]), list(header["names"])
    except (ValueError, KeyError, TypeError) as err:
        raise DatasetError(f"{path}: corrupt domain tag store header ({err})") from None
    body = raw[16 + header_len:]
    if len(body) != count * dtype.itemsize:
        raise DatasetError(
            f"{path}: truncated or corrupt domain tag store: {len(body)} bytes of ids, "
            f"expected {count} x {dtype.itemsize}"
        )
    if num_documents is not None and count != num_documents:
        raise DatasetError(
            f"{path}: domain tag store has {count} documents but the dataset has "
            f"{num_documents}: the tag store belongs to another dataset"
        )
    if idx_file is not None and header["idx_sha256"] != file_sha256(idx_file):
        raise DatasetError(
            f"{path}: domain tag store does not match {idx_file} (index checksum differs): "
            "it was written for another version of the dataset; re-run preprocessing or merge"
        )
    ids = np.frombuffer(body, dtype=dtype)
    if ids.size and (ids.min() < 0 or ids.max() >= len(names)):
        raise DatasetError(f"{path}: domain id out of range of its {len(names)} names")
    return DomainStore(ids=ids, names=names)


# ----------------------------------------------------------------------------------------
# Opening a dataset with validation
# ----------------------------------------------------------------------------------------

@dataclass
class AnchorDataset:
    """A validated Megatron `IndexedDataset` plus its optional domain tags.

    Documents are Megatron documents (`document_indices`); our preprocessing writes one
    sequence per document, but sentence-level Megatron-LM datasets also work.
    """

    prefix: str
    indexed: object  # megatron.core.datasets.indexed_dataset.IndexedDataset
    domains: Optional[DomainStore]

    @property
    def dtype(self):
        return self.indexed.index.dtype

    @property
    def num_documents(self) -> int:
        return len(self.indexed.document_indices) - 1

    def document_lengths(self) -> np.ndarray:
        """Tokens per document (int64)."""
        seq_lengths = self.indexed.sequence_lengths.astype(np.int64)
        bounds = self.indexed.document_indices.astype(np.int64)
        if len(seq_lengths) == self.num_documents:  # one sequence per document: fast path
            return seq_lengths
        cumulative = np.concatenate([[0], np.cumsum(seq_lengths)])
        return cumulative[bounds[1:]] - cumulative[bounds[:-1]]

    def document(self, index: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens of one document (a read-only view into the memory-mapped `.bin`); like a
        slice, `length` stops at the document's end."""
        first, last = self.indexed.document_indices[index:index + 2]
        if last - first == 1:
            # IndexedDataset.get reads `length` tokens whatever the sequence's size, i.e.
            # into the next document; clamp as the multi-sequence branch's slice does.
            available = int(self.indexed.sequence_lengths[first]) - offset
            length = available if length is None else min(length, available)
            return self.indexed.get(int(first), offset=offset, length=length)
        parts = [self.indexed[int(s)] for s in range(first, last)]
        whole = np.concatenate(parts)
        return whole[offset:None if length is None else offset + length]

    def domain_table(self, default: str) -> Tuple[List[str], np.ndarray]:
        """(names, per-document ids): the tag store's, or every document in `default`."""
        if self.domains is None:
            return [default], np.zeros(self.num_documents, dtype=np.int64)
        return list(self.domains.names), self.domains.ids.astype(np.int64)


def open_dataset(prefix: str, expected_dtype=None, vocab_size: Optional[int] = None,
                 require_domains: bool = False) -> AnchorDataset:
    """Open `prefix` with Megatron-Core's `IndexedDataset` after checking it is sound.

    Raises `DatasetError` for: missing files, a bad `.idx` header, a token dtype other than
    `expected_dtype` (or too narrow for `vocab_size`), a `.bin` whose size disagrees with the
    index (truncated or padded), or a tag store of another dataset.
    """
    for path in (idx_path(prefix), bin_path(prefix)):
        if not os.path.isfile(path):
            raise DatasetError(f"dataset file not found: {path}")
    dtype, count, expected_bin_bytes = _inspect_index(prefix)
    if expected_dtype is not None and np.dtype(dtype) != np.dtype(expected_dtype):
        raise DatasetError(
            f"{idx_path(prefix)}: token dtype is {np.dtype(dtype).name}, expected "
            f"{np.dtype(expected_dtype).name} (was it preprocessed with another tokenizer?)"
        )
    if vocab_size is not None and vocab_size - 1 > np.iinfo(dtype).max:
        raise DatasetError(
            f"{idx_path(prefix)}: token dtype {np.dtype(dtype).name} cannot hold ids of a "
            f"{vocab_size}-token vocabulary"
        )
    actual = os.path.getsize(bin_path(prefix))
    if actual != expected_bin_bytes:
        raise DatasetError(
            f"{bin_path(prefix)}: {actual} bytes but its index describes {expected_bin_bytes} "
            f"({'truncated' if actual < expected_bin_bytes else 'trailing data'}); "
            "the dataset is corrupt or the .bin/.idx come from different runs"
        )
    indexed = megatron_indexed().IndexedDataset(prefix)
    num_documents = len(indexed.document_indices) - 1
    domains = None
    if os.path.isfile(dom_path(prefix)):
        domains = read_domain_store(dom_path(prefix), idx_path(prefix), num_documents)
    elif require_domains:
        raise DatasetError(f"domain tag store not found: {dom_path(prefix)}")
    return AnchorDataset(prefix=prefix, indexed=indexed, domains=domains)


def _inspect_index(prefix: str):
    """(dtype, sequence count, expected .bin size) read from the `.idx` header and tail."""
    mod = megatron_indexed()
    path = idx_path(prefix)
    with open(path, "rb") as f:
        header = f.read(9 + 8 + 1 + 8 + 8)
    if len(header) < 34 or header[:9] != mod._INDEX_HEADER:
        raise DatasetError(f"{path}: not a Megatron indexed-dataset index (bad header)")
    (version,) = struct.unpack("<Q", header[9:17])
    code = header[17]
    if version != 1:
        raise DatasetError(f"{path}: unsupported index version {version}")
    try:
        dtype = mod.DType.dtype_from_code(code)
    except ValueError:
        raise DatasetError(f"{path}: unknown token dtype code {code}") from None
    if dtype not in TOKEN_DTYPES:
        raise DatasetError(
            f"{path}: token dtype {np.dtype(dtype).name} is not a token-id dtype "
            f"(expected one of {', '.join(np.dtype(d).name for d in TOKEN_DTYPES)})"
        )
    sequence_count, document_count = struct.unpack("<QQ", header[18:34])
    expected_size = 34 + sequence_count * (4 + 8) + document_count * 8
    if os.path.getsize(path) < expected_size:
        raise DatasetError(f"{path}: truncated index")
    if sequence_count == 0:
        return dtype, 0, 0
    lengths = np.memmap(path, dtype=np.int32, mode="r", offset=34, shape=(sequence_count,))
    pointers = np.memmap(path, dtype=np.int64, mode="r", offset=34 + 4 * sequence_count,
                         shape=(sequence_count,))
    end = int(pointers[-1]) + int(lengths[-1]) * np.dtype(dtype).itemsize
    return dtype, sequence_count, end


# ----------------------------------------------------------------------------------------
# Atomic output
# ----------------------------------------------------------------------------------------

class AtomicOutput:
    """Temporary paths next to the final ones, renamed into place by `commit()`.

    Use as a context manager: leaving the block without `commit()` (an error, Ctrl-C)
    deletes every temporary, so a failed run never leaves a partial dataset at the
    output prefix. The `.idx` is renamed last because Megatron treats a prefix as present
    when its `.idx` and `.bin` exist.
    """

    RENAME_ORDER = (DOMAIN_SUFFIX, ".bin", ".idx")

    def __init__(self, final_prefix: str):
        self.final_prefix = final_prefix
        directory = os.path.dirname(os.path.abspath(final_prefix))
        os.makedirs(directory, exist_ok=True)
        self._tmpdir = tempfile.mkdtemp(
            prefix="." + os.path.basename(final_prefix) + ".tmp-", dir=directory
        )
        self.prefix = os.path.join(self._tmpdir, "out")

    def scratch_prefix(self, name: str) -> str:
        """A further temporary prefix (e.g. one per partition), removed with the rest."""
        return os.path.join(self._tmpdir, name)

    def commit(self) -> None:
        for suffix in self.RENAME_ORDER:
            tmp = self.prefix + suffix
            if os.path.exists(tmp):
                os.replace(tmp, self.final_prefix + suffix)
            elif os.path.exists(self.final_prefix + suffix):
                os.remove(self.final_prefix + suffix)  # a stale tag store of an older run
        self._cleanup()

    def _cleanup(self) -> None:
        if os.path.isdir(self._tmpdir):
            for name in os.listdir(self._tmpdir):
                os.remove(os.path.join(self._tmpdir, name))
            os.rmdir(self._tmpdir)

    def __enter__(self) -> "AtomicOutput":
        return self

    def __exit__(self, *exc) -> None:
        self._cleanup()

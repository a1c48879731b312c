"""JSONL -> Megatron indexed datasets (`{output_prefix}_{json_key}_document.bin/.idx`).

Mirrors Megatron-LM's `tools/preprocess_data.py` (same flags, same output naming), with
what long-context packing needs on top:

* one sequence per document, also under `--split-sentences` (the sentences of a document are
  tokenized one by one, as Megatron-LM does, and concatenated), so Megatron's GPT sampling
  and our window packer both see documents;
* a per-document domain tag store `{prefix}.dom` from `--domain-key` (a dotted path into each
  JSON object, e.g. `meta.redpajama_set_name`);
* bad lines stop the run with `file:line: reason`, or are skipped and counted with
  `--skip-bad-lines`;
* output bytes depend only on the input, the tokenizer and the flags, never on `--workers`
  or `--partitions` (results are written in input order; partitions are contiguous ranges of
  lines merged back in order);
* nothing appears at the output prefix unless the whole run succeeded.

`preprocess(PreprocessConfig) -> summary` is the library entry; the flags, the printed summary
and the exit status are `megatron_anchor.cli.preprocess_data`.
"""

from __future__ import annotations

import glob
import gzip
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import numpy as np

from megatron_anchor.data.indexed import (
    AtomicOutput,
    DatasetError,
    bin_path,
    dom_path,
    idx_path,
    megatron_indexed,
    merge_domain_names,
    token_dtype,
    write_domain_store,
)
from megatron_anchor.data.tokenizer import TokenizerConfig, build_tokenizer

# Lines handed to a worker at once: one `encode_batch` call per task amortises the Rust call
# and the pickling (this is the `chunksize` of Megatron's `pool.imap`, counted in lines).
LINES_PER_TASK = 256
BYTES_PER_TASK = 4 << 20

# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------

@dataclass
class PreprocessConfig:
    """One preprocessing run (the `megatron-anchor-preprocess` flags, typed)."""

    input_files: List[str]  # JSONL files, plain or .gz (see `expand_inputs` for globs)
    output_prefix: str  # outputs are {output_prefix}_{json_key}_document.{bin,idx,dom}
    tokenizer: TokenizerConfig
    json_keys: List[str] = field(default_factory=lambda: ["text"])
    split_sentences: bool = False
    keep_newlines: bool = False
    lang: str = "english"
    domain_key: Optional[str] = None  # dotted path into each JSON object
    default_domain: Optional[str] = None
    skip_bad_lines: bool = False
    append_eod: bool = False
    workers: int = 1
    partitions: int = 1
    log_interval: int = 10000


def validate(config: PreprocessConfig) -> PreprocessConfig:
    """Raise `DatasetError` naming the flag to change; returns `config`."""
    if config.workers < 1 or config.partitions < 1:
        raise DatasetError("--workers and --partitions must be >= 1")
    if config.keep_newlines and not config.split_sentences:
        raise DatasetError("--keep-newlines only applies with --split-sentences")
    if not config.json_keys:
        raise DatasetError("--json-keys needs at least one key")
    missing = [p for p in config.input_files if not os.path.isfile(p)]
    if not config.input_files or missing:
        raise DatasetError(f"--input: no such file: {missing[0] if missing else '(none given)'}")
    return config


def expand_inputs(patterns: List[str]) -> List[str]:
    """Files named by `patterns`, glob patterns expanded (sorted); DatasetError if none."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        missing = [m for m in matches if not os.path.isfile(m)]
        if not matches or missing:
            raise DatasetError(f"--input: no such file: {missing[0] if missing else pattern}")
        files.extend(matches)
    return files


def output_prefix_for(config: PreprocessConfig, key: str) -> str:
    return f"{config.output_prefix}_{key}_document"


# ----------------------------------------------------------------------------------------
# Reading lines
# ----------------------------------------------------------------------------------------

def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def count_lines(files: List[str]) -> int:
    total = 0
    for path in files:
        with _open_binary(path) as f:
            for _ in f:
                total += 1
    return total


def read_lines(files: List[str], start: int = 0, stop: Optional[int] = None) -> Iterator[tuple]:
    """(file index, 1-based line number, raw bytes) for global lines start..stop-1."""
    seen = 0
    for file_index, path in enumerate(files):
        with _open_binary(path) as f:
            for line_no, raw in enumerate(f, 1):
                if stop is not None and seen >= stop:
                    return
                if seen >= start:
                    yield file_index, line_no, raw
                seen += 1


def batched_lines(lines: Iterator[tuple]) -> Iterator[List[tuple]]:
    batch, size = [], 0
    for line in lines:
        batch.append(line)
        size += len(line[2])
        if len(batch) >= LINES_PER_TASK or size >= BYTES_PER_TASK:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# ----------------------------------------------------------------------------------------
# Encoding (runs in the worker processes)
# ----------------------------------------------------------------------------------------

class BadLine(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def lookup_dotted(obj, dotted: str):
    """obj['a']['b'] for 'a.b'; KeyError if any step is missing or not an object."""
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(dotted)
        obj = obj[part]
    return obj


class Encoder:
    """Turns raw JSONL lines into token arrays; state lives in the class, per process,
    set by `initialize` (the Pool initializer), as in Megatron-LM's Encoder."""

    tokenizer = None
    splitter = None
    dtype = None

    def __init__(self, config: PreprocessConfig):
        self.config = config

    def initialize(self, in_pool: bool = False) -> None:
        if in_pool:
            # One Rust thread per worker process: the pool already spreads work over the
            # cores, and nested thread pools would oversubscribe them.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        Encoder.tokenizer = build_tokenizer(self.config.tokenizer)
        Encoder.dtype = token_dtype(Encoder.tokenizer.vocab_size)
        Encoder.splitter = None
        if self.config.split_sentences:
            from megatron_anchor.data.sentences import build_sentence_splitter

            Encoder.splitter = build_sentence_splitter(self.config.lang, self.config.keep_newlines)

    def encode_batch(self, batch: List[tuple]) -> List[tuple]:
        """Per line: ('ok', ref, arrays per key, domain, n_bytes) or ('bad', ref, reason, msg)
        or ('blank', ref)."""
        results, pending = [], []
        for file_index, line_no, raw in batch:
            ref = (file_index, line_no)
            if not raw.strip():
                results.append(("blank", ref))
                continue
            try:
                texts, domain = self._parse(raw)
            except BadLine as bad:
                results.append(("bad", ref, bad.reason, str(bad)))
                continue
            results.append(None)  # filled once the whole batch is tokenized
            pending.append((len(results) - 1, ref, texts, domain, len(raw)))
        for slot, encoded in zip([p[0] for p in pending], self._tokenize(pending)):
            results[slot] = encoded
        return results

    def _parse(self, raw: bytes):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadLine("invalid-utf8", f"invalid UTF-8 at byte {err.start}") from None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise BadLine("malformed-json", f"malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise BadLine("malformed-json", "the line is JSON but not an object")
        texts = [self._text(record, key) for key in self.config.json_keys]
        return texts, self._domain(record)

    def _text(self, record: dict, key: str):
        if key not in record:
            raise BadLine("missing-key", f"missing key {key!r}")
        text = record[key]
        # A list of strings is a pre-split document (accepted by Megatron-LM too).
        is_list = isinstance(text, list) and all(isinstance(t, str) for t in text)
        if not isinstance(text, str) and not is_list:
            raise BadLine("non-string-text", f"key {key!r} holds {type(text).__name__}, not text")
        pieces = text if is_list else [text]
        if not any(p.strip() for p in pieces):
            raise BadLine("empty-text", f"key {key!r} holds empty text")
        try:  # JSON escapes can smuggle in lone surrogates, which are not valid UTF-8
            for p in pieces:
                p.encode("utf-8")
        except UnicodeEncodeError:
            raise BadLine("invalid-utf8", f"key {key!r} holds a lone surrogate (invalid UTF-8)") from None
        if self.splitter is not None:
            pieces = [s for p in pieces for s in self.splitter.tokenize(p)]
        return pieces

    def _domain(self, record: dict) -> Optional[str]:
        if self.config.domain_key is None:
            return self.config.default_domain
        try:
            value = lookup_dotted(record, self.config.domain_key)
        except KeyError:
            value = None
        if value is None:
            if self.config.default_domain is None:
                raise BadLine("missing-domain", f"missing domain key {self.config.domain_key!r} "
                                                "(give --default-domain to use a fallback)")
            return self.config.default_domain
        if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
            raise BadLine("bad-domain", f"domain {self.config.domain_key!r} is {value!r}, not a name")
        return str(value)

    def _tokenize(self, pending: List[tuple]) -> List[tuple]:
        """Tokenize every piece of every pending line in one batch call."""
        pieces = [piece for p in pending for texts in p[2] for piece in texts]
        try:
            ids = self.tokenizer.encode_batch(pieces)
        except Exception:  # find the culprit line(s) one by one, so only they are reported
            return [self._tokenize_one(p) for p in pending]
        out, cursor = [], 0
        for _, ref, texts, domain, n_bytes in pending:
            arrays = []
            for key_pieces in texts:
                arrays.append(self._document(ids[cursor:cursor + len(key_pieces)]))
                cursor += len(key_pieces)
            out.append(self._result(ref, arrays, domain, n_bytes))
        return out

    def _tokenize_one(self, p: tuple) -> tuple:
        _, ref, texts, domain, n_bytes = p
        try:
            arrays = [self._document(self.tokenizer.encode_batch(t)) for t in texts]
        except Exception as err:
            return ("bad", ref, "tokenize-error", f"tokenizer failed: {err}")
        return self._result(ref, arrays, domain, n_bytes)

    def _document(self, piece_ids: List[List[int]]) -> np.ndarray:
        count = sum(len(ids) for ids in piece_ids)
        eod = [self.tokenizer.eod] if count and self.config.append_eod else []
        # np.fromiter over a chain converts in C, without a flattened Python list.
        return np.fromiter(itertools.chain(*piece_ids, eod), dtype=self.dtype,
                           count=count + len(eod))

    def _result(self, ref, arrays, domain, n_bytes) -> tuple:
        if any(a.size == 0 for a in arrays):
            return ("bad", ref, "empty-text", "text tokenizes to no tokens")
        return ("ok", ref, arrays, domain, n_bytes)


# ----------------------------------------------------------------------------------------
# Writing one partition
# ----------------------------------------------------------------------------------------

class Progress:
    """tqdm bar on a terminal, a log line every --log-interval documents otherwise."""

    def __init__(self, log_interval: int, label: str, position: int):
        from tqdm import tqdm

        self.log_interval, self.label = max(1, log_interval), label
        self.start = time.perf_counter()
        self.docs = self.tokens = self.bytes = 0
        self.bar = tqdm(desc=label, unit="doc", position=position, leave=position == 0,
                        dynamic_ncols=True, disable=not sys.stderr.isatty())

    def update(self, tokens: int, n_bytes: int) -> None:
        self.docs += 1
        self.tokens += tokens
        self.bytes += n_bytes
        self.bar.update(1)
        if self.docs % self.log_interval == 0:
            rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
            if self.bar.disable:
                elapsed = time.perf_counter() - self.start
                print(f"{self.label}: {self.docs} documents ({self.docs / elapsed:,.0f} docs/s, "
                      f"{rate:,.0f} tokens/s, {self.bytes / elapsed / 2**20:.1f} MB/s)",
                      file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def process_partition(config: PreprocessConfig, start: int, stop: Optional[int],
                      out_prefixes: List[str], workers: int, position: int = 0) -> dict:
    """Tokenize global lines [start, stop) into one dataset per key at `out_prefixes`.

    Returns the partition's statistics and its per-document domain names (in order).
    """
    encoder = Encoder(config)
    encoder.initialize()
    dtype = Encoder.dtype
    builders = [megatron_indexed().IndexedDatasetBuilder(bin_path(p), dtype=dtype)
                for p in out_prefixes]
    stats = {"documents": 0, "tokens": [0] * len(out_prefixes), "bytes": 0,
             "skipped": Counter(), "domain_names": [], "domain_ids": []}
    progress = Progress(config.log_interval, f"partition {position}" if config.partitions > 1
                        else "preprocess", position)
    batches = batched_lines(read_lines(config.input_files, start, stop))
    try:
        for results in _encoded_batches(encoder, batches, workers):
            for result in results:
                _write_result(config, result, builders, stats, progress)
    finally:
        progress.close()
    for builder, prefix in zip(builders, out_prefixes):
        builder.finalize(idx_path(prefix))
    stats["dtype"] = np.dtype(dtype).name
    stats["vocab_size"] = Encoder.tokenizer.vocab_size
    return stats


def _encoded_batches(encoder: Encoder, batches, workers: int):
    if workers == 1:  # no pool: avoids pickling, and is the easiest path to debug
        yield from map(encoder.encode_batch, batches)
        return
    context = multiprocessing.get_context("fork")
    with context.Pool(workers, initializer=encoder.initialize, initargs=(True,)) as pool:
        # imap keeps input order, which is what makes the output independent of --workers.
        yield from pool.imap(encoder.encode_batch, batches, chunksize=1)


def _write_result(config: PreprocessConfig, result: tuple, builders, stats: dict, progress: Progress) -> None:
    kind, (file_index, line_no) = result[0], result[1]
    if kind == "blank":
        stats["skipped"]["blank-line"] += 1
        return
    if kind == "bad":
        reason, message = result[2], result[3]
        where = f"{config.input_files[file_index]}:{line_no}"
        if not config.skip_bad_lines:
            raise DatasetError(f"{where}: {message} [{reason}]; fix the line or pass "
                               "--skip-bad-lines to skip and count such lines")
        stats["skipped"][reason] += 1
        return
    arrays, domain, n_bytes = result[2], result[3], result[4]
    for k, (builder, array) in enumerate(zip(builders, arrays)):
        builder.add_document(array, [array.size])
        stats["tokens"][k] += int(array.size)
    if domain is not None:
        names = stats["domain_names"]
        if domain not in names:
            names.append(domain)
        stats["domain_ids"].append(names.index(domain))
    stats["documents"] += 1
    stats["bytes"] += n_bytes
    progress.update(int(arrays[0].size), n_bytes)


# ----------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------

def preprocess(config: PreprocessConfig) -> dict:
    """Run the whole preprocessing; returns the summary (documents, tokens, domains, skipped
    lines by reason, throughput). Raises `DatasetError` (file:line for a bad line)."""
    validate(config)
    started = time.perf_counter()
    keys = config.json_keys
    final_prefixes = [output_prefix_for(config, key) for key in keys]
    outputs = [AtomicOutput(p) for p in final_prefixes]
    try:
        if config.partitions == 1:
            stats = process_partition(config, 0, None, [o.prefix for o in outputs], config.workers)
        else:
            stats = _run_partitions(config, outputs)
        if stats["documents"] == 0:
            files = ", ".join(config.input_files)
            raise DatasetError(f"{files}: no documents to write (empty input, or every line "
                               f"was skipped: {dict(stats['skipped'])})")
        with_tags = config.domain_key is not None or config.default_domain is not None
        for output in outputs:
            if with_tags:
                write_domain_store(dom_path(output.prefix), stats["domain_ids"],
                                   stats["domain_names"], idx_path(output.prefix))
            output.commit()
    finally:
        for output in outputs:
            output.__exit__(None, None, None)
    return _summary(config, stats, final_prefixes, time.perf_counter() - started)


def _run_partitions(config: PreprocessConfig, outputs: List[AtomicOutput]) -> dict:
    """Contiguous line ranges processed in parallel, then merged in order."""
    total = count_lines(config.input_files)
    bounds = [total * p // config.partitions for p in range(config.partitions + 1)]
    workers = max(1, config.workers // config.partitions)
    part_prefixes = [[o.scratch_prefix(f"part{p}") for o in outputs]
                     for p in range(config.partitions)]
    with ProcessPoolExecutor(config.partitions, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(process_partition, config, bounds[p], bounds[p + 1],
                               part_prefixes[p], workers, p) for p in range(config.partitions)]
        parts = [f.result() for f in futures]  # re-raises a partition's DatasetError
    merged = _merge_stats(parts)
    for k, output in enumerate(outputs):
        builder = megatron_indexed().IndexedDatasetBuilder(
            bin_path(output.prefix), dtype=np.dtype(merged["dtype"]).type)
        for p, part in enumerate(parts):
            if part["documents"]:
                builder.add_index(part_prefixes[p][k])
        builder.finalize(idx_path(output.prefix))
    return merged


def _merge_stats(parts: List[dict]) -> dict:
    # Domain names in first-appearance order over the parts in order, as one pass would.
    names, ids = merge_domain_names([(p["domain_names"], p["domain_ids"]) for p in parts])
    merged = {"documents": 0, "tokens": [0] * len(parts[0]["tokens"]), "bytes": 0,
              "skipped": Counter(), "domain_names": names,
              "domain_ids": np.concatenate(ids).tolist(),
              "dtype": parts[0]["dtype"], "vocab_size": parts[0]["vocab_size"]}
    for part in parts:
        merged["documents"] += part["documents"]
        merged["bytes"] += part["bytes"]
        merged["skipped"].update(part["skipped"])
        merged["tokens"] = [a + b for a, b in zip(merged["tokens"], part["tokens"])]
    return merged


def _summary(config: PreprocessConfig, stats: dict, prefixes: List[str], elapsed: float) -> dict:
    names, ids = stats["domain_names"], stats["domain_ids"]
    per_domain = Counter(names[i] for i in ids)
    tokens = dict(zip(config.json_keys, stats["tokens"]))
    return {
        "outputs": prefixes,
        "documents": stats["documents"],
        "tokens": tokens,
        "input_bytes": stats["bytes"],
        "dtype": stats["dtype"],
        "vocab_size": stats["vocab_size"],
        "domains": {name: per_domain[name] for name in names},
        "skipped": dict(sorted(stats["skipped"].items())),
        "elapsed_s": round(elapsed, 3),
        "docs_per_s": round(stats["documents"] / max(elapsed, 1e-9), 1),
        "tokens_per_s": round(sum(tokens.values()) / max(elapsed, 1e-9), 1),
    }

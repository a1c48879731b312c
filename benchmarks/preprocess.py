"""Throughput of the data pipeline on the embedded sample corpus with a real BPE tokenizer.

1. Preprocessing, tokens/s: `preprocess_data` with 1 and 2 workers, next to a straightforward
   loop (read a line, `json.loads`, `Tokenizer.encode`, `add_document`) with the same
   tokenizer writing the same dataset (the outputs are checked to be byte-identical, so both
   do the same work). Each is run `--repeats` times, interleaved, and the best time is kept:
   the CI/dev machines are shared and noisy.
2. Packing, windows/s: `WindowDataset.__getitem__` (read the documents of a window from the
   memory-mapped `.bin` and pack them with `layout.pack_documents`) at 32K and 128K tokens,
   anchor variant, plus the one-off cost of building the sample index.

    python benchmarks/preprocess.py [--work-dir DIR] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def prepare_inputs(work_dir: str, corpus: str | None, tokenizer: str | None, max_bytes: int):
    from megatron_anchor.cli.build_sample_corpus import main as build_corpus
    from megatron_anchor.cli.train_tokenizer import main as train_tokenizer

    corpus = corpus or os.path.join(work_dir, "corpus.jsonl")
    if not os.path.exists(corpus):
        with contextlib.redirect_stdout(io.StringIO()):
            build_corpus(["--output", corpus, "--max-bytes", str(max_bytes)])
    tokenizer = tokenizer or os.path.join(work_dir, "tokenizer.json")
    if not os.path.exists(tokenizer):
        with contextlib.redirect_stdout(io.StringIO()):
            train_tokenizer(["--input", corpus, "--output", tokenizer, "--vocab-size", "8192"])
    return corpus, tokenizer


def naive_preprocess(corpus: str, tokenizer_path: str, prefix: str) -> int:
    """The straightforward loop: one line, one encode, one write at a time."""
    from tokenizers import Tokenizer

    from megatron_anchor.data.indexed import megatron_indexed

    indexed = megatron_indexed()
    tok = Tokenizer.from_file(tokenizer_path)
    eod = tok.token_to_id("<|endoftext|>")
    builder = indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    tokens = 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            ids = tok.encode(json.loads(line)["text"]).ids + [eod]
            builder.add_document(np.array(ids), [len(ids)])
            tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return tokens


def tool_preprocess(corpus: str, tokenizer_path: str, prefix: str, workers: int) -> int:
    from megatron_anchor.cli.preprocess_data import build_parser, config_from_args
    from megatron_anchor.data.preprocess import preprocess

    argv = ["--input", corpus, "--output-prefix", prefix, "--tokenizer-type",
            "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_path, "--append-eod",
            "--domain-key", "meta.source", "--workers", str(workers), "--log-interval", "1000000"]
    with contextlib.redirect_stdout(io.StringIO()):
        summary = preprocess(config_from_args(build_parser().parse_args(argv)))
    return summary["tokens"]["text"]


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def bench_preprocess(corpus, tokenizer, work_dir, repeats: int) -> dict:
    runs = {"naive loop": [], "preprocess_data --workers 1": [], "preprocess_data --workers 2": []}
    tokens = {}
    for _ in range(repeats):  # interleaved, so a noisy neighbour hurts all alike
        seconds, tokens["naive loop"] = timed(naive_preprocess, corpus, tokenizer,
                                              os.path.join(work_dir, "naive"))
        runs["naive loop"].append(seconds)
        for workers in (1, 2):
            name = f"preprocess_data --workers {workers}"
            seconds, tokens[name] = timed(tool_preprocess, corpus, tokenizer,
                                          os.path.join(work_dir, f"tool{workers}"), workers)
            runs[name].append(seconds)
    same = all(_read(os.path.join(work_dir, "naive.bin")) ==
               _read(os.path.join(work_dir, f"tool{w}_text_document.bin")) for w in (1, 2))
    best = {name: min(times) for name, times in runs.items()}
    return {
        "tokens": tokens["naive loop"],
        "identical_output": same,
        "rows": [{"method": name, "seconds": round(best[name], 3),
                  "tokens_per_s": round(tokens[name] / best[name]),
                  "speedup_vs_naive": round(best["naive loop"] / best[name], 2)}
                 for name in runs],
    }


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def bench_packer(prefix: str, seq_lengths, windows: int) -> list:
    from megatron_anchor.data.windows import WindowConfig, WindowDataset
    from megatron_anchor.layout import WindowLayout

    rows = []
    for seq_length in seq_lengths:
        config = WindowConfig(layout=WindowLayout(seq_length, "anchor", anchor_token_id=1),
                              split="100,0,0", num_samples=windows)
        build_s, ds = timed(WindowDataset, prefix, config)
        ds[0]  # warm the page cache and code paths
        start = time.perf_counter()
        for i in range(len(ds)):
            ds[i]
        per_window = (time.perf_counter() - start) / len(ds)
        rows.append({"seq_length": seq_length, "windows": len(ds),
                     "ms_per_window": round(per_window * 1000, 2),
                     "windows_per_s": round(1 / per_window, 1),
                     "index_build_ms_per_window": round(build_s / len(ds) * 1000, 2)})
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default=None, help="keep inputs/outputs here (default: temp)")
    parser.add_argument("--corpus", default=None, help="JSONL to use instead of the sample corpus")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of "
                                                          "training one on the corpus")
    parser.add_argument("--corpus-max-bytes", type=int, default=4 << 20,
                        help="sample corpus budget per domain")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--windows", type=int, default=64, help="windows per packer measurement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work_dir = args.work_dir or tmp
        os.makedirs(work_dir, exist_ok=True)
        corpus, tokenizer = prepare_inputs(work_dir, args.corpus, args.tokenizer,
                                           args.corpus_max_bytes)
        result = {"cpu_count": os.cpu_count(), "corpus_bytes": os.path.getsize(corpus),
                  "preprocess": bench_preprocess(corpus, tokenizer, work_dir, args.repeats)}
        result["packer"] = bench_packer(os.path.join(work_dir, "tool1_text_document"),
                                        (32768, 131072), args.windows)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_tables(result)
    return result


def print_tables(result: dict) -> None:
    pre = result["preprocess"]
    print(f"preprocessing {result['corpus_bytes'] / 2**20:.1f} MiB, {pre['tokens']:,} tokens "
          f"({result['cpu_count']} CPUs; outputs identical: {pre['identical_output']})")
    print(f"{'method':32s} {'seconds':>8s} {'tokens/s':>12s} {'vs naive':>9s}")
    for row in pre["rows"]:
        print(f"{row['method']:32s} {row['seconds']:8.2f} {row['tokens_per_s']:12,} "
              f"{row['speedup_vs_naive']:8.2f}x")
    print(f"\n{'window packing (anchor)':24s} {'windows':>8s} {'ms/window':>10s} "
          f"{'windows/s':>10s} {'index ms/window':>16s}")
    for row in result["packer"]:
        print(f"{row['seq_length']:>24,} {row['windows']:8d} {row['ms_per_window']:10.2f} "
              f"{row['windows_per_s']:10.1f} {row['index_build_ms_per_window']:16.2f}")


if __name__ == "__main__":
    main()

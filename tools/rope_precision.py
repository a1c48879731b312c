#!/usr/bin/env python
"""BF16 vs RoPE: attention change under constant position shifts; see --help."""
import sys

from megatron_anchor.cli.rope_precision import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""RULER-style long-context evaluation of a megatron-anchor checkpoint; see --help."""
import sys

from megatron_anchor.cli.eval_long_context import main

if __name__ == "__main__":
    sys.exit(main())

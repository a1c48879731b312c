#!/usr/bin/env python
"""Parity of logits, loss and gradients across TP×CP layouts; see --help."""
import sys

from megatron_anchor.cli.verify_parity import main

if __name__ == "__main__":
    sys.exit(main())

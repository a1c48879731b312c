#!/usr/bin/env python
"""Hugging Face checkpoints in and out of Megatron checkpoints; see --help."""
import sys

from megatron_anchor.cli.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())

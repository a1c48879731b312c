#!/usr/bin/env python
"""Merge indexed-dataset shards and their domain tag stores into one; see --help."""
import sys

from megatron_anchor.cli.merge_datasets import main

if __name__ == "__main__":
    sys.exit(main())

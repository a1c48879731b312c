#!/usr/bin/env python
"""Thin wrapper; the logic and --help live in megatron_anchor.data.sample_corpus."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_anchor.data.sample_corpus import main  # noqa: E402

if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""JSONL -> Megatron indexed datasets, one sequence per document, with domain tags; see --help."""
import sys

from megatron_anchor.cli.preprocess_data import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Build a multi-domain JSONL corpus from text already on this machine; see --help."""
import sys

from megatron_anchor.cli.build_sample_corpus import main

if __name__ == "__main__":
    sys.exit(main())

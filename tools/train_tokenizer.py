#!/usr/bin/env python
"""Train a byte-level BPE tokenizer.json on JSONL text; see --help."""
import sys

from megatron_anchor.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())

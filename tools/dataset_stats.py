#!/usr/bin/env python
"""Document-length and window-packing statistics of an indexed dataset; see --help."""
import sys

from megatron_anchor.cli.dataset_stats import main

if __name__ == "__main__":
    sys.exit(main())

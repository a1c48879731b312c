#!/usr/bin/env python
"""BF16 vs RoPE shift diagnostic on a pretrained model (see --help).

    python tools/rope_precision.py --output-dir runs/rope_precision --json runs/rope_precision/summary.json
    python tools/rope_precision.py --quick      # ~1-2 minutes on 2 CPU cores
"""

import sys

from megatron_anchor.diagnostics.rope_precision import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Parity of logits, loss and gradients across TP×CP layouts (see --help).

    torchrun --nproc-per-node 4 tools/verify_parity.py --cpu --layouts tp1cp1,tp2cp1,tp1cp2,tp2cp2
"""

import sys

from megatron_anchor.parallel.verify_parity import main

if __name__ == "__main__":
    sys.exit(main())

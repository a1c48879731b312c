"""Hugging Face checkpoints in and out (docs/design.md §9): llama, mistral and qwen2 families.

`import_checkpoint(hf_dir, output)` writes a Megatron checkpoint through
`megatron_anchor.checkpoint`; `export_checkpoint(load, output)` writes safetensors shards, the
index and config.json that `transformers.AutoModelForCausalLM.from_pretrained` loads as is.
Only `safetensors` is needed at run time; transformers is the reference in tests.
"""

from megatron_anchor.convert.hf import (  # noqa: F401
    ConversionSummary, SafetensorsDir, base_hf_config, export_checkpoint, import_checkpoint,
    load_hf_model, write_hf_weights)
from megatron_anchor.convert.hf_config import (  # noqa: F401
    ConversionError, hf_config_from_model_config, model_config_from_hf, read_hf_config)
from megatron_anchor.convert.mapping import fuse_qkv, split_qkv  # noqa: F401

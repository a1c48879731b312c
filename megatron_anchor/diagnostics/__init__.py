"""Diagnostics: the BF16-RoPE shift experiment (docs/design.md §1).

* `shift_metrics`: the attention-difference and first-token metrics of docs/design.md §1.
* `rope_precision`: the BF16-RoPE shift experiment (`run(RopePrecisionConfig) -> Results`);
  `rope_inputs`: the model, tokenizer and text it runs on.

The model it measures is the plain PyTorch reference Llama (`convert.reference_llama`) with
the weights of SmolLM2-135M (`convert.gguf`) or of a Megatron checkpoint
(`convert.reference`). The tool's flags, tables, figures and exit codes are in
`megatron_anchor.cli.rope_precision`.
"""

"""Long-context evaluation on Megatron checkpoints: RULER-style tasks, exact scoring, averaging.

* `tasks`: offline generators with fixed seeds, prompts token-exact for the model's tokenizer.
* `scoring`: teacher-forced exact match (one forward) and greedy generation +
  RULER's `string_match_all`, on THD batches of `anchor` windows, at any TP/CP.
* `runner`: `evaluate(model, tokenizer, vocab_size, EvalConfig)` -> `EvalResult` with
  controls and Wilson intervals; `average_checkpoints` for the last-K protocol.

The command line is `megatron_anchor.cli.eval_long_context` (`megatron-anchor-eval`).
"""

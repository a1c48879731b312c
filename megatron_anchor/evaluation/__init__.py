"""Long-context evaluation on Megatron checkpoints: RULER-style tasks, exact scoring, averaging."""

"""Training on Megatron-Core: pretraining entry point, checkpoints, Megatron-LM integration.

Modules, in the order a run uses them:

* `arguments`  - Megatron-style command line -> `TrainConfig` (config is data);
* `config`     - the dataclasses, with validation that names the flag to change;
* `data`       - tokenizer ids, window datasets, DP/CP sharding of each global batch;
* `setup`      - model, DDP wrapper, optimizer and LR scheduler from Megatron-Core;
* `train`      - the train loop (forward/backward over micro-batches, eval, logging);
* (checkpoints: `megatron_anchor.checkpoint`, shared with every tool);
* `logger`     - progress bar, TensorBoard, metrics file, loss-curve plot;
* `pretrain`   - `main()` (console script `megatron-anchor-pretrain`);
* `megatron_lm`- glue for Megatron-LM's `pretrain_gpt.py` where it is installed.

Submodules import Megatron-Core lazily so `--help` is fast.
"""

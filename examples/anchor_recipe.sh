#!/usr/bin/env bash
# The paper's continued-pretraining recipe (docs/design.md §8), shared by every
# pretrain_<model>_<context>.sh: AdamW (weight decay 0.1, betas 0.9/0.95), LR 2e-5 with cosine
# decay, 2000 steps of 8 windows, AnchorAttention over packed documents, Transformer Engine,
# BF16, sequence parallelism. A launch script sets PRETRAINED (the base model imported with
# megatron-anchor-convert: the architecture and tokenizer come from it), MODEL_ARGS (what the
# recipe changes: the RoPE base, checked against the checkpoint), PARALLEL_ARGS,
# TOKENIZER_ARGS, SEQ_LENGTH, NNODES, DATA_PATH and SAVE (and optionally MEMORY_ARGS:
# activation recomputation, distributed optimizer), then sources this file, which launches
# one node's 8 ranks. Extra
# flags given to the launch script come last and win. Throughput is logged as model TFLOP/s
# per GPU and MFU against --peak-tflops (default: looked up from the GPU name, H100 989).
#
# Environment: NODE_RANK, MASTER_ADDR, MASTER_PORT (examples/slurm_anchor.sbatch sets them on
# a cluster). --pretrained-checkpoint starts from the base model's weights; --load resumes
# this run's own checkpoints exactly once there are some.
#
# Runs that last (docs/training.md, "Runs that last"): on SIGUSR1 (EXIT_SIGNAL) every rank
# finishes its iteration, the iteration is saved and the job exits 0; the SLURM template asks
# for that signal 10 minutes before the time limit, and a requeued job resumes from --load.
# Only the trainer's ranks act on it: this shell and torchrun ignore it (a scheduler signals
# every process of the job). By hand: kill -USR1 -- -<process group of this script>. The
# newest 5 checkpoints (what the evaluation's --last-checkpoints 5 averages) and every 500th
# are kept; older ones are deleted once a newer save is complete.
set -euo pipefail

NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
EXIT_SIGNAL=${EXIT_SIGNAL:-SIGUSR1}

DATA_ARGS=(
  --data-path "$DATA_PATH" --split 969,30,1 --data-cache-path "$SAVE/cache"
  --seq-length "$SEQ_LENGTH" --micro-batch-size 1 --global-batch-size 8
  --attention-variant anchor
)
TRAIN_ARGS=(
  --lr 2e-5 --min-lr 2e-6 --lr-decay-style cosine --lr-warmup-iters 20
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
  --train-iters 2000 --seed 1234
)
OUTPUT_ARGS=(
  --save "$SAVE" --load "$SAVE" --save-interval 10
  --keep-last-checkpoints 5 --save-retain-interval 500
  --exit-signal-handler --exit-signal "$EXIT_SIGNAL"
  --log-interval 1 --eval-interval 200 --eval-iters 1 --tensorboard-dir "$SAVE/tensorboard"
  --no-progress-bar --pretrained-checkpoint "$PRETRAINED"
)

# The signal is the trainer's to handle: ignored here, and so in torchrun, which inherits it.
trap '' "${EXIT_SIGNAL#SIG}"
torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node 8 \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m megatron_anchor.training.pretrain \
  "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${TOKENIZER_ARGS[@]}" "${DATA_ARGS[@]}" \
  "${TRAIN_ARGS[@]}" ${MEMORY_ARGS[@]+"${MEMORY_ARGS[@]}"} "${OUTPUT_ARGS[@]}" "$@"

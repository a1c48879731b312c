#!/usr/bin/env bash
# AnchorAttention continued pretraining of Llama-2-7B at 64K tokens on 1 x 8 H100 80GB.
# Paper recipe (DESIGN.md section 8): AdamW (wd 0.1, betas 0.9/0.95), LR 2e-5, 2000 steps,
# 8 windows per step, RoPE base 5000000.
#   8 windows x 65536 tokens = 524,288 tokens per step.
# Layout: TP=8 + sequence parallel on one node: ~37 GB of activations and ~14 GB of weights+AdamW per GPU.
# Tokenizer: SentencePieceTokenizer; BOS <s> is the anchor.
#
# Run inside an NGC PyTorch container (Transformer Engine and apex are there), with this
# repository pip-installed. Single node: bash pretrain_llama2_7b_64k.sh; several nodes: examples/slurm_anchor.sbatch
# (it sets NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT), or set them yourself.
# Weights: convert the Hugging Face checkpoint to a Megatron dist checkpoint (Megatron-Bridge
# or Megatron-LM's checkpoint converter) and pass it as PRETRAINED (model weights only);
# --load resumes this run's own checkpoints exactly.
set -euo pipefail

DATA_PATH=${DATA_PATH:-/data/slimpajama_64k_text_document}
PRETRAINED=${PRETRAINED:-}
SAVE=${SAVE:-checkpoints/llama2_7b_64k_anchor}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

MODEL_ARGS=(
  --num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008
  --num-attention-heads 32 --num-query-groups 32
  --vocab-size 32000 --norm-epsilon 1e-5 --rotary-base 5000000
)
PARALLEL_ARGS=(
  --tensor-model-parallel-size 8 --context-parallel-size 1 --sequence-parallel
  --cp-comm-type p2p --attention-backend te --bf16
)
DATA_ARGS=(
  --data-path "$DATA_PATH" --split 969,30,1 --data-cache-path "$SAVE/cache"
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "${TOKENIZER_MODEL:-/models/Llama-2-7b-hf/tokenizer.model}"
  --seq-length 65536 --micro-batch-size 1 --global-batch-size 8
  --attention-variant anchor
)
TRAIN_ARGS=(
  --lr 2e-5 --min-lr 2e-6 --lr-decay-style cosine --lr-warmup-iters 20
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
  --train-iters 2000 --seed 1234
)
OUTPUT_ARGS=(
  --save "$SAVE" --load "$SAVE" --save-interval 10
  --log-interval 1 --eval-interval 200 --eval-iters 1 --tensorboard-dir "$SAVE/tensorboard"
  --no-progress-bar
)
if [ -n "$PRETRAINED" ]; then OUTPUT_ARGS+=(--pretrained-checkpoint "$PRETRAINED"); fi

torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node 8 \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m megatron_anchor.training.pretrain \
  "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAIN_ARGS[@]}" \
  "${OUTPUT_ARGS[@]}" "$@"

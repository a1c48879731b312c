#!/usr/bin/env bash
# AnchorAttention continued pretraining of Mistral-7B-v0.3 at 128K tokens on 2 x 8 H100 80GB.
# Paper recipe (DESIGN.md section 8): AdamW (wd 0.1, betas 0.9/0.95), LR 2e-5, 2000 steps,
# 8 windows per step, RoPE base 10000000.
#   8 windows x 131072 tokens = 1,048,576 tokens per step.
# Layout: two nodes, TP=8 x CP=2: each CP rank holds 64K tokens, the same per-GPU activations as 64K.
# Tokenizer: SentencePieceTokenizer; BOS <s> is the anchor.
#
# Run inside an NGC PyTorch container (Transformer Engine and apex are there), with this
# repository pip-installed. Single node: bash pretrain_mistral_7b_v0.3_128k.sh; several nodes: examples/slurm_anchor.sbatch
# (it sets NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT), or set them yourself.
# Weights: convert the Hugging Face checkpoint to a Megatron dist checkpoint (Megatron-Bridge
# or Megatron-LM's checkpoint converter) and pass it as PRETRAINED (model weights only);
# --load resumes this run's own checkpoints exactly.
set -euo pipefail

DATA_PATH=${DATA_PATH:-/data/slimpajama_128k_text_document}
PRETRAINED=${PRETRAINED:-}
SAVE=${SAVE:-checkpoints/mistral_7b_v0.3_128k_anchor}
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

MODEL_ARGS=(
  --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336
  --num-attention-heads 32 --num-query-groups 8
  --vocab-size 32768 --norm-epsilon 1e-5 --rotary-base 10000000
)
PARALLEL_ARGS=(
  --tensor-model-parallel-size 8 --context-parallel-size 2 --sequence-parallel
  --cp-comm-type p2p --attention-backend te --bf16
)
DATA_ARGS=(
  --data-path "$DATA_PATH" --split 969,30,1 --data-cache-path "$SAVE/cache"
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "${TOKENIZER_MODEL:-/models/Mistral-7B-v0.3/tokenizer.model}"
  --seq-length 131072 --micro-batch-size 1 --global-batch-size 8
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

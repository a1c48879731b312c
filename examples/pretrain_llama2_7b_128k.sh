#!/usr/bin/env bash
# AnchorAttention continued pretraining of Llama-2-7B at 128K tokens on one node of 8 x 80 GB GPUs.
# RoPE base 10000000; the rest of the recipe: examples/anchor_recipe.sh.
#   8 windows x 131072 tokens = 1,048,576 tokens per step.
# Layout: one node, TP=4 x CP=2 (64K tokens per rank), full activation recomputation of
# every layer and the distributed optimizer sharded over the 2 CP ranks (memory estimate
# per rank: examples/README.md).
#
# Inside an NGC PyTorch container (Transformer Engine, apex) with this repository
# pip-installed: bash examples/pretrain_llama2_7b_128k.sh [extra flags]; on SLURM:
# sbatch --nodes N examples/slurm_anchor.sbatch examples/pretrain_llama2_7b_128k.sh
#
# Step 1, once (CPU is enough): the Hugging Face base model as a Megatron checkpoint, RoPE
# base raised to the recipe's 1e7 (the tokenizer files are copied into it):
#   megatron-anchor-convert import --hf-dir /models/Llama-2-7b-hf --output "$PRETRAINED" \
#       --rotary-base 10000000 --dtype bf16
# After training: megatron-anchor-convert export --load "$SAVE" --output <hf dir>.
set -euo pipefail

PRETRAINED=${PRETRAINED:-checkpoints/llama2_7b_base_rope1e7}

DATA_PATH=${DATA_PATH:-/data/slimpajama_128k_text_document}
SAVE=${SAVE:-checkpoints/llama2_7b_128k_anchor}
NNODES=${NNODES:-1}
SEQ_LENGTH=131072

# The architecture and the tokenizer come from the imported checkpoint; only what the recipe
# changes is set here. --rotary-base is checked against the checkpoint (import with it).
MODEL_ARGS=(--rotary-base 10000000)
PARALLEL_ARGS=(
  --tensor-model-parallel-size 4 --context-parallel-size 2 --sequence-parallel
  --cp-comm-type p2p --attention-backend te --bf16
)
MEMORY_ARGS=(
  --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
  --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
)
TOKENIZER_ARGS=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$PRETRAINED/tokenizer")
source "$(dirname "${BASH_SOURCE[0]}")/anchor_recipe.sh"

#!/usr/bin/env bash
# AnchorAttention continued pretraining of Llama-3-8B at 128K tokens on one node of 8 x 80 GB GPUs.
# RoPE base 10000000; the rest of the recipe: examples/anchor_recipe.sh.
#   8 windows x 131072 tokens = 1,048,576 tokens per step.
# Layout: one node, TP=4 x CP=2 (64K tokens per rank), full activation recomputation of
# every layer and the distributed optimizer sharded over the 2 CP ranks (memory estimate
# per rank: examples/README.md).
# Tokenizer: HuggingFaceTokenizer; BOS <|begin_of_text|> is the anchor.
#
# Inside an NGC PyTorch container (Transformer Engine, apex) with this repository
# pip-installed: bash examples/pretrain_llama3_8b_128k.sh [extra flags]; on SLURM:
# sbatch --nodes N examples/slurm_anchor.sbatch examples/pretrain_llama3_8b_128k.sh
set -euo pipefail

DATA_PATH=${DATA_PATH:-/data/slimpajama_128k_text_document}
SAVE=${SAVE:-checkpoints/llama3_8b_128k_anchor}
NNODES=${NNODES:-1}
SEQ_LENGTH=131072

MODEL_ARGS=(
  --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336
  --num-attention-heads 32 --num-query-groups 8
  --vocab-size 128256 --norm-epsilon 1e-5 --rotary-base 10000000
)
PARALLEL_ARGS=(
  --tensor-model-parallel-size 4 --context-parallel-size 2 --sequence-parallel
  --cp-comm-type p2p --attention-backend te --bf16
)
MEMORY_ARGS=(
  --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
  --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
)
TOKENIZER_ARGS=(
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model "${TOKENIZER_MODEL:-/models/Meta-Llama-3-8B}"
)
source "$(dirname "${BASH_SOURCE[0]}")/anchor_recipe.sh"

#!/usr/bin/env bash
# AnchorAttention continued pretraining of Qwen-1.5-1.8B at 64K tokens on 1 x 8 H100 80GB.
# RoPE base 5000000; the rest of the recipe: examples/anchor_recipe.sh.
#   8 windows x 65536 tokens = 524,288 tokens per step.
# Layout: TP=4 + sequence parallel, DP=2 on one node.
#
# Inside an NGC PyTorch container (Transformer Engine, apex) with this repository
# pip-installed: bash examples/pretrain_qwen1.5_1.8b_64k.sh [extra flags]; on SLURM:
# sbatch --nodes N examples/slurm_anchor.sbatch examples/pretrain_qwen1.5_1.8b_64k.sh
#
# Step 1, once (CPU is enough): the Hugging Face base model as a Megatron checkpoint, RoPE
# base raised to the recipe's 5e6 (the tokenizer files are copied into it):
#   megatron-anchor-convert import --hf-dir /models/Qwen1.5-1.8B --output "$PRETRAINED" \
#       --rotary-base 5000000 --dtype bf16
# After training: megatron-anchor-convert export --load "$SAVE" --output <hf dir>.
set -euo pipefail

PRETRAINED=${PRETRAINED:-checkpoints/qwen1.5_1.8b_base_rope5e6}

DATA_PATH=${DATA_PATH:-/data/slimpajama_64k_text_document}
SAVE=${SAVE:-checkpoints/qwen1.5_1.8b_64k_anchor}
NNODES=${NNODES:-1}
SEQ_LENGTH=65536

# The architecture and the tokenizer come from the imported checkpoint; only what the recipe
# changes is set here. --rotary-base is checked against the checkpoint (import with it).
MODEL_ARGS=(--rotary-base 5000000)
PARALLEL_ARGS=(
  --tensor-model-parallel-size 4 --context-parallel-size 1 --sequence-parallel
  --cp-comm-type p2p --attention-backend te --bf16
)
TOKENIZER_ARGS=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$PRETRAINED/tokenizer")
source "$(dirname "${BASH_SOURCE[0]}")/anchor_recipe.sh"

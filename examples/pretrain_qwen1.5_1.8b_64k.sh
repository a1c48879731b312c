#!/usr/bin/env bash
# AnchorAttention continued pretraining of Qwen-1.5-1.8B at 64K tokens on 1 x 8 H100 80GB.
# RoPE base 5000000; the rest of the recipe: examples/anchor_recipe.sh.
#   8 windows x 65536 tokens = 524,288 tokens per step.
# Layout: TP=4 + sequence parallel, DP=2 on one node.
# Tokenizer: HuggingFaceTokenizer; no BOS: EOS <|endoftext|> is the anchor. Qwen-1.5's QKV biases are not modelled (add_bias_linear=False).
#
# Inside an NGC PyTorch container (Transformer Engine, apex) with this repository
# pip-installed: bash examples/pretrain_qwen1.5_1.8b_64k.sh [extra flags]; on SLURM:
# sbatch --nodes N examples/slurm_anchor.sbatch examples/pretrain_qwen1.5_1.8b_64k.sh
set -euo pipefail

DATA_PATH=${DATA_PATH:-/data/slimpajama_64k_text_document}
SAVE=${SAVE:-checkpoints/qwen1.5_1.8b_64k_anchor}
NNODES=${NNODES:-1}
SEQ_LENGTH=65536

MODEL_ARGS=(
  --num-layers 24 --hidden-size 2048 --ffn-hidden-size 5504
  --num-attention-heads 16 --num-query-groups 16
  --vocab-size 151936 --norm-epsilon 1e-6 --rotary-base 5000000
)
PARALLEL_ARGS=(
  --tensor-model-parallel-size 4 --context-parallel-size 1 --sequence-parallel
  --cp-comm-type p2p --attention-backend te --bf16
)
TOKENIZER_ARGS=(
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model "${TOKENIZER_MODEL:-/models/Qwen1.5-1.8B}"
)
source "$(dirname "${BASH_SOURCE[0]}")/anchor_recipe.sh"

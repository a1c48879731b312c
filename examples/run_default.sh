#!/usr/bin/env bash
# The default job, on any machine with Python (CPU is enough; ~10 minutes on 2 cores):
#   1. build a multi-domain sample corpus from text already on this machine,
#   2. train a byte-level BPE tokenizer on it (8K vocabulary),
#   3. preprocess it into Megatron indexed datasets with per-document domain tags,
#   4. train a small Llama-style model with AnchorAttention on CPU and print a summary
#      (first/last loss, tokens/s, checkpoint, loss-curve plot).
#
#   bash examples/run_default.sh [WORKDIR] [extra pretrain flags...]
#
# Environment: TRAIN_ITERS (default 600), SEQ_LENGTH (1024), NPROC (1). The LR warmup is 30
# steps, TRAIN_ITERS/20 for runs shorter than 600 (the trainer wants it below TRAIN_ITERS).
set -euo pipefail

WORKDIR=${1:-runs/default}
shift || true
TRAIN_ITERS=${TRAIN_ITERS:-600}
SEQ_LENGTH=${SEQ_LENGTH:-1024}
NPROC=${NPROC:-1}
WARMUP_ITERS=$(( TRAIN_ITERS / 20 < 30 ? TRAIN_ITERS / 20 : 30 ))
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
# One BLAS/OpenMP thread per core, never more threads than cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
mkdir -p "$WORKDIR"

if [ ! -f "$WORKDIR/corpus.jsonl" ]; then
  # Documents are cut at 64 KiB (~20K tokens): still long-tailed and longer than a window,
  # but no single file fills hundreds of consecutive windows of this short run.
  python "$HERE/tools/build_sample_corpus.py" --output "$WORKDIR/corpus.jsonl" \
    --max-bytes $((3 << 20)) --max-document-bytes 65536
fi
if [ ! -f "$WORKDIR/tokenizer.json" ]; then
  python "$HERE/tools/train_tokenizer.py" --input "$WORKDIR/corpus.jsonl" \
    --vocab-size 8192 --output "$WORKDIR/tokenizer.json"
fi
if [ ! -f "$WORKDIR/corpus_text_document.idx" ]; then
  python "$HERE/tools/preprocess_data.py" --input "$WORKDIR/corpus.jsonl" \
    --output-prefix "$WORKDIR/corpus" --json-keys text --domain-key meta.source \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$WORKDIR/tokenizer.json" \
    --append-eod --workers 2
fi

# A 4-layer, d=256 Llama-style model (RMSNorm, SwiGLU, GQA 4/2 heads, RoPE at window
# positions), 2 windows (2 micro-batches of 1: gradient accumulation) of $SEQ_LENGTH tokens per
# step, AnchorAttention over packed documents, windows served in Megatron's shuffled sample
# order. Chosen by measurement (benchmarks/RESULTS.md): at the same ~1.2M training tokens,
# 600 steps of 2 windows end lower than 300 steps of 4; validation on 16 windows, whose
# unigram cross-entropy the summary prints next to the validation loss.
exec torchrun --standalone --nproc-per-node "$NPROC" -m megatron_anchor.training.pretrain \
  --cpu \
  --data-path "$WORKDIR/corpus_text_document" --split 95,5,0 \
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$WORKDIR/tokenizer.json" \
  --attention-variant anchor --attention-backend local \
  --num-layers 4 --hidden-size 256 --ffn-hidden-size 704 \
  --num-attention-heads 4 --num-query-groups 2 --rotary-base 10000 \
  --seq-length "$SEQ_LENGTH" --micro-batch-size 1 --global-batch-size 2 \
  --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters "$WARMUP_ITERS" \
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
  --train-iters "$TRAIN_ITERS" --log-interval 20 \
  --eval-interval 100 --eval-iters 8 \
  --save "$WORKDIR/checkpoints" --data-cache-path "$WORKDIR/cache" \
  "$@"

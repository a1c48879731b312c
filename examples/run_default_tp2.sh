#!/usr/bin/env bash
# The default job with tensor parallelism: TP=2 across 2 CPU processes (torchrun, gloo).
# Builds the same corpus/tokenizer/dataset as run_default.sh (reused if present).
#
#   bash examples/run_default_tp2.sh [WORKDIR] [extra pretrain flags...]
set -euo pipefail
WORKDIR=${1:-runs/default_tp2}
shift || true
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Two processes on two cores: one thread each.
NPROC=2 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec bash "$HERE/run_default.sh" "$WORKDIR" \
  --tensor-model-parallel-size 2 "$@"

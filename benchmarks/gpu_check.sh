#!/usr/bin/env bash
# The GPU check in one device call (issue 19). Before the call, once, here:
#     mkdir -p .whl && cp -r ../shared/gpu/. .whl/
# then the device `run` tool: command "bash benchmarks/gpu_check.sh", carry [".whl"].
# Installs megatron-core 0.19.2 (ships megatron/training), every Transformer Engine wheel and
# pydantic in ONE pip --target command (shared/gpu/README.md), runs benchmarks/gpu_check.py
# with an 8-minute budget and leaves gpu_check.json and the logs in $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
G=.whl
if [ ! -d "$G/te" ]; then
    echo "gpu_check.sh: $G/ has no wheels: run 'mkdir -p .whl && cp -r ../shared/gpu/. .whl/' first and carry .whl" | tee "$OUT/gpu_check.log"
fi
rm -rf /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    $G/mc019/megatron_core-0.19.2-*.whl $G/te/*.whl $G/pydantic/*.whl >"$OUT/install.log" 2>&1 \
    || echo "gpu_check.sh: pip install failed (install.log); the stages that need megatron-core will fail"
export PYTHONPATH=/tmp/site:$PWD NVTE_FRAMEWORK=pytorch PYTHONUNBUFFERED=1
nvidia-smi >"$OUT/nvidia_smi.txt" 2>&1 || true
python3 benchmarks/gpu_check.py --json "$OUT/gpu_check.json" --te-smoke "$G/te_smoke.py" \
    --workdir /tmp/gpu_check_work --budget "${BUDGET:-480}" 2>&1 | tee -a "$OUT/gpu_check.log"
cp /tmp/gpu_check_work/te_smoke.json "$OUT"/ 2>/dev/null || true

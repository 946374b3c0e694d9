#!/usr/bin/env bash
# One nvidia-h200 loan for the 2026-11-30 afternoon numbers, detached (benchmarks/detached.sh):
#   bash benchmarks/session_gpu.sh start COMMIT     # then: bash benchmarks/detached.sh wait s2 580 (repeat)
# 1. turbo_gpu.py: lightning-4step + FP8 fast mode end to end at 1280x720x81 and 832x480x81, and its quality
#    vs the 4-step bf16 video (issue #17 part 1)
# 2. lora_switch_gpu.py: switching a rank-64 LoRA set on both A14B experts (issue #19)
# 3. coldstart_gpu.sh write-fp8, fp8 (two of its runs), summary (issue #17 part 2)
# Results under /tmp/wf/s2 (copied to $OUT/s2 by `wait`).
set -uo pipefail
cd "$(dirname "$0")/.."
case "$1" in
start)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export WANFAST_COMMIT=$2
    rm -rf /tmp/wf/s2
    bash benchmarks/detached.sh start s2 -- bash benchmarks/session_gpu.sh run
    ;;
run)
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=/tmp/wf/s2
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 benchmarks/turbo_gpu.py --repeats 1 --out $OUT/turbo.json 2>&1 | grep -v INFO || echo "turbo failed"
    python3 benchmarks/lora_switch_gpu.py --out $OUT/lora_switch.json 2>&1 | grep -v INFO || echo "lora failed"
    bash benchmarks/coldstart_gpu.sh write-fp8 "$WANFAST_COMMIT" || echo "write-fp8 failed"
    FP8_RUNS="cold_compile warm_cached" bash benchmarks/coldstart_gpu.sh fp8 "$WANFAST_COMMIT" || echo "fp8 failed"
    bash benchmarks/coldstart_gpu.sh summary "$WANFAST_COMMIT" || echo "summary failed"
    ;;
esac

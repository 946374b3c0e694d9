#!/usr/bin/env bash
# Issue #15's GPU numbers and #14's memory-budget run on nvidia-h200 (random weights at real dims), detached:
#   bash benchmarks/i2v_gpu.sh start COMMIT     # then: bash benchmarks/detached.sh wait i2v 580 (repeat)
#   budget   TI2V-5B guided step under --memory-budget 24 (text encoder on the CPU) vs resident
#   fwd      I2V-A14B 1280x720x81 DiT forward, bf16 and --quant fp8 --self-attention fa3-fp8, vs Diffusers
#   turbo    I2V-A14B lightning-4step preset (4 steps, no CFG, Euler) end to end, bf16, fp32 VAE
# `start COMMIT turbo` runs only the last (after the encoder rewrite of accel/vae.py), then the pool's
# one-worker overhead run of issue #16 (benchmarks/pool_gpu.sh single) into /tmp/wf/i2v/pool.
set -euo pipefail
cd "$(dirname "$0")/.."
case "$1" in
start)
    source benchmarks/wheels.sh
    export WANFAST_COMMIT=$2
    bash benchmarks/detached.sh start i2v -- bash benchmarks/i2v_gpu.sh "${3:-run}"
    ;;
run)
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    d=/tmp/wf/i2v
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 benchmarks/budget_gpu.py --model ti2v-5B --size 1280x704 --frames 121 --budget 24 --t5-cpu \
        --json $d/budget.json || echo "budget failed"
    b=(python3 -m wanfast bench --model i2v-A14B --sizes 1280x720 --frames 81 --warmup 1)
    "${b[@]}" --what forward --compare default --peer diffusers --repeats 3 --json $d/fwd.json || echo "fwd failed"
    "${b[@]}" --what forward --compare default --peer none --repeats 3 --quant fp8 --self-attention fa3-fp8 \
        --json $d/fwd_fp8.json || echo "fwd_fp8 failed"
    "${b[@]}" --what generate --sampling-preset lightning-4step --compare default --peer none --gen-repeats 1 \
        --composed-steps 4 --json $d/turbo.json || echo "turbo failed"
    ;;
turbo)
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    d=/tmp/wf/i2v
    python3 -m wanfast bench --model i2v-A14B --sizes 1280x720 --frames 81 --warmup 1 --what generate \
        --sampling-preset lightning-4step --compare default --peer none --gen-repeats 1 --composed-steps 4 \
        --json $d/turbo.json || echo "turbo failed"
    OUT=$d/pool bash benchmarks/pool_gpu.sh single "$WANFAST_COMMIT" || echo "pool failed"
    ;;
run2)  # the budget run (each side its own process) and the 4-step preset with the FP8 fast mode
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    d=/tmp/wf/i2v
    python3 benchmarks/budget_gpu.py --model ti2v-5B --size 1280x704 --frames 121 --budget 24 --t5-cpu \
        --json $d/budget.json || echo "budget failed"
    python3 -m wanfast bench --model i2v-A14B --sizes 1280x720 --frames 81 --warmup 1 --what generate \
        --sampling-preset lightning-4step --compare default --peer none --gen-repeats 1 --composed-steps 4 \
        --quant fp8 --self-attention fa3-fp8 --json $d/turbo_fp8.json || echo "turbo_fp8 failed"
    ;;
esac

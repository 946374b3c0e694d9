#!/usr/bin/env bash
# Issue #14's GPU acceptance on nvidia-h200 (random weights at real dims), detached (longer than one call):
#   bash benchmarks/ti2v_gpu.sh start COMMIT     # then: bash benchmarks/detached.sh wait ti2v 580 (repeat)
# Parts, one process each, results under /tmp/wf/ti2v/:
#   fwdvae  TI2V-5B 1280x704x121 DiT forward (image-mode per-token t) and bf16 VAE decode vs Diffusers
#   gen     TI2V-5B 50-step generation end to end (text mode, fp32 VAE as official) vs Diffusers
#   budget  TI2V-5B guided step under --memory-budget 24 vs resident
#   t2v     T2V-A14B 1280x720x81 forward (re-measure of the 10.15 s of tree 2ee7424)
set -euo pipefail
cd "$(dirname "$0")/.."
case "$1" in
start)
    source benchmarks/wheels.sh
    export WANFAST_COMMIT=$2
    bash benchmarks/detached.sh start ti2v -- bash benchmarks/ti2v_gpu.sh run
    ;;
run)
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    d=/tmp/wf/ti2v
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    b=(python3 -m wanfast bench --peer diffusers --compare default --warmup 1)
    "${b[@]}" --model ti2v-5B --sizes 1280x704 --frames 121 --what forward,vae --repeats 3 --vae-dtype bf16 \
        --json $d/fwdvae.json --png $d/fwdvae.png || echo "fwdvae failed"
    "${b[@]}" --model ti2v-5B --sizes 1280x704 --frames 121 --what generate --steps 50 --gen-repeats 1 \
        --composed-steps 50 --json $d/gen.json --png $d/gen.png || echo "gen failed"
    python3 benchmarks/budget_gpu.py --model ti2v-5B --size 1280x704 --frames 121 --budget 24 --t5-cpu \
        --json $d/budget.json || echo "budget failed"
    python3 -m wanfast bench --model t2v-A14B --sizes 1280x720 --frames 81 --what forward --compare default \
        --peer none --repeats 3 --warmup 1 --json $d/t2v.json --png $d/t2v.png || echo "t2v failed"
    ;;
esac

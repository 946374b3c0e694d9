#!/usr/bin/env bash
# `wanfast bench` on the GPU machine (nvidia-h200), T2V-A14B dimensions, random weights, 81 frames.
# Each run is one command under 9 minutes; results go to $OUT (or benchmarks/results/bench).
#
#   bash benchmarks/run_bench.sh 480p    # forward, step, text, VAE at 832x480: eager and default + Diffusers
#   bash benchmarks/run_bench.sh 720p    # the same at 1280x720 for the shipped settings + Diffusers
#   bash benchmarks/run_bench.sh gen480  # measured 3-step generation at 832x480 + --check + Diffusers
#
# Wall times of the whole command, measured on an H200 (eager forward 3.5 s at 480p and 12.2 s at 720p,
# Diffusers 3.2 s / 12.2 s; one expert per engine for forward/step; imports, builds and any compiles
# included, compiles being shorter once inductor's disk cache is warm):
#   480p   (--compare eager,default)   125 s
#   720p   (--compare default)         264 s
#   gen480 (--compare eager,default)   152 s
# The ladder is cumulative: compiled = fused + both caches + compile, graphs = compiled + CUDA graphs (accel
# then drops the caches), default = EngineSettings() as `wanfast generate` runs it.
# The 40-step estimates (kind "composed" in the JSON) come from 480p and 720p: text encoding
# + 40 x median step + VAE decode, each measured in that run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-benchmarks/results/bench}"
mkdir -p "$out"

run() {  # name, then bench arguments; keeps the log beside the JSON and PNG
    local name=$1
    shift
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } | tee "$out/$name.log"
    python3 -m wanfast bench "$@" --json "$out/$name.json" --png "$out/$name.png" 2>&1 | tee -a "$out/$name.log"
}

case "${1:-}" in
480p)
    run bench_480p --model t2v-A14B --sizes 832x480 --frames 81 --what forward,step,text,vae \
        --compare eager,default --peer diffusers --repeats 2 --warmup 1
    ;;
720p)
    run bench_720p --model t2v-A14B --sizes 1280x720 --frames 81 --what forward,step,text,vae \
        --compare default --peer diffusers --repeats 2 --warmup 1
    ;;
gen480)
    run bench_gen480 --model t2v-A14B --sizes 832x480 --frames 81 --what generate --steps 3 \
        --compare eager,default --peer diffusers --warmup 1 --gen-repeats 1 --check
    ;;
*)
    echo "usage: $0 480p|720p|gen480" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# `wanfast bench` on the GPU machine (nvidia-h200), T2V-A14B dimensions, random weights, 81 frames.
# Each run is one command under 9 minutes; results go to $OUT (or benchmarks/results/bench).
#
#   bash benchmarks/run_bench.sh 480p    # forward, step, text, VAE at 832x480: the --compare ladder + Diffusers
#   bash benchmarks/run_bench.sh 720p    # the same at 1280x720 for the shipped settings + Diffusers
#   bash benchmarks/run_bench.sh gen480  # measured 3-step generation at 832x480 + --check + Diffusers
#
# Estimates (H200; eager forward 3.5 s at 480p and 12.2 s at 720p, Diffusers 3.2 s / 12.2 s; one expert
# per engine for forward/step; compile adds ~1-2 min per compiled engine, less once inductor's disk cache
# is warm; ~1 min of imports and builds per run):
#   480p:   5 engines x (3 forwards + 3 steps = 9 forwards, ~30 s) + VAE 2 x 3 decodes (~12 s)
#           + 2 compiles                                                                   ~ 5.5-6.5 min
#   720p:   2 engines x (9 forwards, ~110 s) + VAE 2 x 3 decodes at 720p (~25 s) + 1 compile  ~ 6-7 min
#   gen480: 3 pipelines x (2-step warm-up + 3-step measured generation, ~40 s) + 1 compile    ~ 4-5 min
# The ladder is cumulative: compiled = fused + both caches + compile, graphs = compiled + CUDA graphs (accel
# then drops the caches), default = EngineSettings() as `wanfast generate` runs it.
# The 40-step estimates (kind "composed" in the JSON) come from 480p and 720p: text encoding
# + 40 x median step + VAE decode, each measured in that run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-benchmarks/results/bench}"
mkdir -p "$out"

bench() {  # `wanfast bench ARGS` through bench.register's own parser: independent of the CLI's wiring
    python3 - "$@" <<'EOF'
import argparse
import sys

from wanfast import bench
from wanfast.config import ConfigError

parser = argparse.ArgumentParser(prog="wanfast")
bench.register(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(["bench", *sys.argv[1:]])
try:
    sys.exit(args.func(args))
except ConfigError as e:
    sys.exit(f"wanfast bench: error: {e}")
EOF
}

run() {  # name, then bench arguments; keeps the log beside the JSON and PNG
    local name=$1
    shift
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } | tee "$out/$name.log"
    bench "$@" --json "$out/$name.json" --png "$out/$name.png" 2>&1 | tee -a "$out/$name.log"
}

case "${1:-}" in
480p)
    run bench_480p --model t2v-A14B --sizes 832x480 --frames 81 --what forward,step,text,vae \
        --compare eager,fused,compiled,graphs --peer diffusers --repeats 2 --warmup 1
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

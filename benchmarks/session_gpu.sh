#!/usr/bin/env bash
# One nvidia-h200 loan for issue #17's 2026-11-30 evening numbers, detached (benchmarks/detached.sh):
#   bash benchmarks/session_gpu.sh start COMMIT     # then: bash benchmarks/detached.sh wait s3 580 (repeat)
# 1. tests/test_coldstart.py -k cuda: read_staged's CUDA branch equals the mapped reads (else the rest runs
#    with WANFAST_STAGED_LOAD=0, and says so)
# 2. coldstart_gpu.sh write-fp8, fp8 (cold + empty compile cache, warm + cache), serve
#    (to /health 200 with 832x480x81 warm, compile cache from 2.), summary
# 3. mp4_stream.py: the MP4 written during a simulated decode vs after it, libx264 slice vs frame threads
#    (this host's 16 cores); the faster threading is used for 4.
# 4. turbo_gpu.py --no-quality: lightning-4step + FP8 fast mode end to end at 1280x720x81 and 832x480x81
# Results under /tmp/wf/s3 (copied to $OUT/s3 by `wait`; results.tgz holds them all).
set -uo pipefail
cd "$(dirname "$0")/.."
case "$1" in
start)
    source benchmarks/wheels.sh
    export WANFAST_COMMIT=$2
    rm -rf /tmp/wf/s3
    bash benchmarks/detached.sh start s3 -- bash benchmarks/session_gpu.sh run
    ;;
run)
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=/tmp/wf/s3 WHEELS_INSTALLED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    # the exit status, not the text: the project's pytest options print no summary line under -q
    python3 -m pytest -q -p no:cacheprovider tests/test_coldstart.py -k cuda > $OUT/cuda_test.txt 2>&1 ||
        { echo "staged CUDA reads failed: WANFAST_STAGED_LOAD=0"; export WANFAST_STAGED_LOAD=0; }
    pack() { (cd $OUT && tar czf results.tgz --exclude results.tgz .); }
    bash benchmarks/coldstart_gpu.sh write-fp8 "$WANFAST_COMMIT" || echo "write-fp8 failed"
    FP8_RUNS="cold_compile warm_cached" bash benchmarks/coldstart_gpu.sh fp8 "$WANFAST_COMMIT" || echo "fp8 failed"
    pack
    SERVE_RUNS=cached bash benchmarks/coldstart_gpu.sh serve "$WANFAST_COMMIT" || echo "serve failed"
    bash benchmarks/coldstart_gpu.sh summary "$WANFAST_COMMIT" || echo "summary failed"
    pack
    python3 benchmarks/mp4_stream.py --size 1280x720 --decode-s 1.34 --threads slice,frame --repeats 1 --out $OUT/mp4_720.json
    best=$(python3 -c "import json; r=json.load(open('$OUT/mp4_720.json'))['runs']; print(min(r, key=lambda x: x['streamed']['total_s'])['threads'])")
    echo "turbo with WANFAST_MP4_THREADS=$best" | tee $OUT/turbo_threads.txt
    WANFAST_MP4_THREADS=$best python3 benchmarks/turbo_gpu.py --repeats 1 --no-quality --out $OUT/turbo.json 2>&1 | grep -v INFO || echo "turbo failed"
    pack
    ;;
esac

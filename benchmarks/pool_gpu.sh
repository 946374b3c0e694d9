#!/usr/bin/env bash
# The worker pool of `wanfast serve` on GPUs, A14B dims, random weights (benchmarks/pool_gpu.py):
#   bash benchmarks/pool_gpu.sh single COMMIT       # nvidia-h200: one 832x480x81 8-step job through a
#                                                   # 1-worker pool vs the plain run (issue 16 part 3)
#   bash benchmarks/pool_gpu.sh throughput COMMIT   # nvidia-h200-x2: eight such jobs, 1 worker vs 2
#   bash benchmarks/pool_gpu.sh group COMMIT        # nvidia-h200-x2: one worker over both GPUs (CFG-parallel),
#                                                   # a 1280x720x81 8-step job (issue 20 part 1)
# Extra arguments go to pool_gpu.py (e.g. --steps 4 --jobs 4). Results: $OUT/pool_<part>.json and .log.
# Each part passes one device call (10 min: random-weight builds and a compile per worker, then the jobs;
# throughput ~15 min): run it detached and poll,
#   OUT=/tmp/wf/pool2/out bash benchmarks/detached.sh start pool2 -- bash benchmarks/pool_gpu.sh throughput abc1234
#   bash benchmarks/detached.sh wait pool2 580      # again at once until it says finished
# NVLink multicast stays off (KINDS.md): these three variables are exported for every process.
set -uo pipefail
cd "$(dirname "$0")/.."
part=$1
export WANFAST_COMMIT=$2 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-/tmp/out}
mkdir -p "$out"
source benchmarks/wheels.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "$part" in
single) sel=(--gpus 0) ;;
throughput) sel=() ;;  # every visible GPU: 1 worker, then one per GPU
group) sel=(--size 1280x720 --repeats 1) ;;
*)
    echo "usage: $0 single|throughput|group COMMIT [pool_gpu.py arguments]" >&2
    exit 2
    ;;
esac
python3 benchmarks/pool_gpu.py --part "$part" "${sel[@]}" "${@:3}" --out "$out/pool_$part.json" 2>&1 |
    grep -v "INFO\|^wanfast\.accel\|^wanfast\.attention" | tee "$out/pool_$part.log" | tail -n 20

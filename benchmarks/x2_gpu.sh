#!/usr/bin/env bash
# Issue #20 on nvidia-h200-x2 (2 GPUs, 128 GiB disk): each stage one detached run, in the issue's order;
# start one, then `bash benchmarks/detached.sh wait x2_<stage> 580` until it says finished:
#   bash benchmarks/x2_gpu.sh pool COMMIT      # pool_gpu.sh throughput (2 workers vs 1, eight 832x480x81 jobs)
#                                              # and group (one CFG-parallel worker over both GPUs, 1280x720x81)
#   bash benchmarks/x2_gpu.sh table COMMIT     # multigpu.sh 2: forward, guided step (and 40-step generation)
#                                              # at 832x480 and 1280x720 for one GPU, cfg2 and u2 (STEPS, default 40;
#                                              # WHAT=forward,step leaves the generations out)
#   bash benchmarks/x2_gpu.sh turbo COMMIT     # turbo_gpu.py --ulysses 2: 4-step FP8 preset end to end, <= 15 s
#   bash benchmarks/x2_gpu.sh cold COMMIT      # coldstart_gpu.sh with both bf16 experts + UMT5 + VAE (~68 GB)
# Carry the wheels file by file (64 MiB in all): fa3-fwd, av, ftfy, wcwidth (+ diffusers only for peers).
# NVLink multicast stays off (KINDS.md).
set -uo pipefail
cd "$(dirname "$0")/.."
stage=$1 commit=$2
export WANFAST_COMMIT=$commit NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
source benchmarks/wheels.sh
export PYTHONUNBUFFERED=1
# the CUDA tests of the staged reads first (one and two GPUs: a rank on cuda:1 must stage there); by exit status
python3 -m pytest -q -p no:cacheprovider tests/test_coldstart.py -k "cuda or current_device" > /tmp/wf_x2_cuda_test.txt 2>&1
echo "staged-read CUDA tests: exit $? (/tmp/wf_x2_cuda_test.txt)"
d=/tmp/wf/x2_$stage
rm -rf "$d"
case "$stage" in
pool)
    # POOL_ARGS (e.g. "--jobs 4 --steps 4") go to pool_gpu.py for both parts
    run=(bash -c "OUT=$d bash benchmarks/pool_gpu.sh throughput $commit ${POOL_ARGS:-}; OUT=$d bash benchmarks/pool_gpu.sh group $commit ${POOL_ARGS:-}") ;;
table)
    run=(env OUT="$d" bash benchmarks/multigpu.sh 2 "$commit" "${STEPS:-40}") ;;
turbo)
    run=(torchrun --nproc-per-node 2 benchmarks/turbo_gpu.py --ulysses 2 --repeats 2 --out "$d/turbo_u2.json") ;;
cold)  # the whole bf16 set: both experts written (not linked), cold and warm page cache
    run=(bash -c "OUT=$d bash benchmarks/coldstart_gpu.sh write-bf16-full $commit && OUT=$d bash benchmarks/coldstart_gpu.sh bf16-full $commit") ;;
*)
    echo "usage: $0 pool|table|turbo|cold COMMIT" >&2
    exit 2
    ;;
esac
bash benchmarks/detached.sh start "x2_$stage" -- "${run[@]}"

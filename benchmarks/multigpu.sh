#!/usr/bin/env bash
# Issue #6 on an nvidia-h200-x2/x4/x8 machine: every split that fits N GPUs, forward + step at 832x480 and
# 1280x720 (81 frames), and the 40-step generation per split (detached when it may pass one call).
#   bash benchmarks/multigpu.sh N COMMIT [STEPS]        # results under $OUT/multigpu_<split>.json
# The whole set passes one device call (10 min) at 40 steps: run it detached and poll, e.g.
#   OUT=/tmp/wf/mg bash benchmarks/detached.sh start mg -- bash benchmarks/multigpu.sh 2 abc1234
#   bash benchmarks/detached.sh wait mg 580      # again at once until it says finished
# NVLink multicast stays off (KINDS.md): these three variables are exported for every process.
# SPLITS (default: every one that fits) and SIZES (default 832x480,1280x720) narrow the set.
# UCHUNKS (default 1): the Ulysses head groups (--ulysses-chunks) of the u2/u4/u8 splits; a list runs each,
# e.g. UCHUNKS="1 2 4" WHAT=forward,step; G = 1 writes multigpu_u2.json, G > 1 multigpu_u2_c<G>.json.
# G must divide the heads per rank (A14B: 40 / K, so u2: 1 2 4 5 ..., u4: 1 2 5, u8: 1 5): another G is
# refused at once, before any weights, and the loop goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
n=$1
export WANFAST_COMMIT=$2 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
steps=${3:-40}
out=${OUT:-/tmp/out}
mkdir -p "$out"
source benchmarks/wheels.sh
python3 -c 'import torch; print(torch.cuda.device_count(), "GPUs")'
declare -A procs=([one]=1 [cfg2]=2 [u2]=2 [cfg2xu2]=4 [u4]=4 [cfg2xu4]=8 [u8]=8)
for split in ${SPLITS:-one cfg2 u2 cfg2xu2 u4 cfg2xu4 u8}; do
    p=${procs[$split]}
    [ "$p" -le "$n" ] || continue
    what=${WHAT:-forward,step,generate}  # WHAT=forward,step: the table without the 40-step generations
    # one GPU, 40 steps at 720p: 806 s measured (BENCHMARKS.md): its generation only when 720p is not asked for
    case ${SIZES:-1280x720} in *1280x720*) [ "$split" = one ] && what=${what/,generate/} ;; esac
    chunks=1
    case $split in u2 | u4 | u8) chunks=${UCHUNKS:-1} ;; esac
    for g in ${chunks//,/ }; do
        name=$split
        [ "$g" = 1 ] || name=${split}_c$g
        torchrun --nproc-per-node "$p" --master-port $((29500 + p)) benchmarks/multigpu_gpu.py --split "$split" \
            --sizes "${SIZES:-832x480,1280x720}" --ulysses-chunks "$g" --out "$out/multigpu_$name.json" --steps "$steps" --what "$what" 2>&1 |
            grep -v "^W\|OMP_NUM" | tail -n 4
    done
done

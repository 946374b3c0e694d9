#!/usr/bin/env bash
# Fast mode on one H200 (issue #4), one device call (< 10 min): the 8-bit attention kernels vs exact ones,
# then one DiT forward (81 frames, A14B dims, random weights) with FP8 linears, beside Diffusers in the
# same run, then FP8 linears + the fastest accurate 8-bit self-attention, then that backend's quality cost
# (10-step generation vs bf16: latent error, video PSNR/SSIM, benchmarks/fp8_gpu.py).
#   bash benchmarks/fast_mode_gpu.sh COMMIT [SIZES [REPEATS]]   # default 832x480,1280x720 and 1; under $OUT
# BACKEND=fa3-fp8 bash benchmarks/fast_mode_gpu.sh ...   skips the kernel probe and uses that backend;
# VARIANTS="--no-fp8-row-kernels;--compile-mode coordinate-descent" adds a run of FP8 + that backend per
# ';'-separated flag set (labelled by its flags).
set -uo pipefail
cd "$(dirname "$0")/.."
export WANFAST_COMMIT=$1
sizes=${2:-832x480,1280x720}
repeats=${3:-1}
out=${OUT:-/tmp/out}
mkdir -p "$out"
source benchmarks/wheels.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ -n "${BACKEND:-}" ]; then
    best=$BACKEND
else
    timeout 240 python3 benchmarks/attn8_gpu.py --out "$out/attn8.json" --lengths 75600 --reps 5 2>&1 | tail -n 40
    # the fastest 8-bit backend (sage8*, fa3-fp8) at 75,600 tokens whose relative error vs exact fp32 attention is <= 0.08
    best=$(python3 - "$out/attn8.json" <<'PY'
import json, sys
names = {"attn8-fp8-fp8": "sage8", "attn8-fp8-bf16": "sage8-pv16", "attn8-int8-fp8": "sage8-int8",
         "fa3-fp8-compiled": "fa3-fp8"}
rep = json.load(open(sys.argv[1]))
run = next(r for r in rep["runs"] if r["L"] == 75600 and r["case"] == "randn")
ok = [(res["time"]["median_s"], names[n]) for n, res in run["results"].items()
      if n in names and "time" in res and res["accuracy"]["rel_l2"] <= 0.08]
print(min(ok)[1] if ok else "none")
PY
    )
fi
echo "chosen self-attention backend: $best"
bench() {  # name, then bench arguments
    timeout 330 python3 -m wanfast bench --model t2v-A14B --sizes "$sizes" --frames 81 --what forward \
        --compare default --repeats "$repeats" --warmup 1 "${@:2}" --json "$out/$1.json" --png "$out/$1.png" 2>&1 | tail -n 12
}
bench bench_fp8 --quant fp8 --peer diffusers
[ "$best" != none ] && bench bench_fp8_attn8 --quant fp8 --self-attention "$best" --peer none
reports=("$out/bench_fp8.json" "$out/bench_fp8_attn8.json") labels="fp8,fp8+$best"
IFS=';' read -ra variants <<< "${VARIANTS:-}"
for flags in "${variants[@]}"; do  # e.g. "--no-fp8-row-kernels": the same run with one switch changed
    tag=$(echo "$flags" | tr -s ' -' '_' | sed 's/^_//')
    # shellcheck disable=SC2086  # the flag set is split into words on purpose
    bench "bench_fp8_attn8_$tag" --quant fp8 --self-attention "$best" --peer none $flags
    reports+=("$out/bench_fp8_attn8_$tag.json") labels+=",fp8+$best+$tag"
done
python3 benchmarks/merge_bench.py "${reports[@]}" --labels "$labels" --json "$out/bench_fast_merged.json" || true
[ "$best" != none ] && timeout 180 python3 benchmarks/fp8_gpu.py --skip study,speed --self-attention "$best" \
    --row-kernels --out "$out/quality_fp8_attn8.json" 2>&1 | tail -n 5

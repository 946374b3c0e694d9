#!/usr/bin/env bash
# Cold start of a fresh `wanfast generate` (issue #17 part 2) on nvidia-h200 (64 GiB disk, root), in stages,
# each one device call (< 10 min; ~9 min for all five at the defaults, estimated, not yet measured):
#   bash benchmarks/coldstart_gpu.sh write-fp8 COMMIT   # UMT5 + VAE + both FP8 experts, ~41 GB  (~1-2 min)
#   bash benchmarks/coldstart_gpu.sh fp8 COMMIT         # h2d probe, dd cold/warm, 4 generate runs (~5 min)
#   bash benchmarks/coldstart_gpu.sh write-bf16 COMMIT  # FP8 experts out, one bf16 expert in (28.6 GB)
#   bash benchmarks/coldstart_gpu.sh bf16 COMMIT        # dd cold, 2 generate runs (no compile) (~2 min)
#   bash benchmarks/coldstart_gpu.sh serve COMMIT       # `wanfast serve` to ready (warm page cache, compile
#                                                       # cache from the fp8 stage): SERVE_RUNS, WARM_SIZES
#   bash benchmarks/coldstart_gpu.sh summary COMMIT     # $OUT/coldstart/summary.json
#   bash benchmarks/coldstart_gpu.sh write-bf16-full COMMIT; ... bf16-full COMMIT   # nvidia-h200-x2 only: the
#                                                       # whole bf16 set (~68 GB), cold then warm, compiled
#   bash benchmarks/coldstart_gpu.sh all COMMIT         # the five in a row (for the CPU test; too long on GPU)
# Checkpoints: random weights at real dims in the official layout (benchmarks/coldstart_gpu.py write), under
# $CKPT (default /tmp/wf/cold/ckpt: local disk). The bf16 set is one expert whose low-noise folder links to
# the high-noise one: a generate reads its files from disk (cold) and then again from the page cache.
# Cold = `sync; echo 3 > /proc/sys/vm/drop_caches` before the run (DROP=0 skips it; meta_*.json say which).
# Generate runs (--timings JSON each, all under $OUT/coldstart), picked by FP8_RUNS / BF16_RUNS (in order):
#   fp8_cold_compile   page cache cold, empty --compile-cache: the first process on a fresh machine
#   fp8_warm_cached    page cache warm, the compile cache from the run before (a second process)
#   fp8_cold_cached    page cache cold, compile cache filled: a restart after the cache was built
#   fp8_warm_staged    as warm_cached with WANFAST_STAGED_LOAD=1 (parallel reads into pinned buffers)
#   fp8_warm_mapped / fp8_cold_mapped (not default): WANFAST_STAGED_LOAD=0, the mapped files' copies
#   fp8_warm_serial    (not default) as warm_cached with WANFAST_LOAD_THREADS=0: text encoder after the experts
#   fp8_cold_staged    (not default) as cold_cached with WANFAST_STAGED_LOAD=1
#   bf16_cold          one bf16 expert read from disk (high) and then from the page cache (low: a link), UMT5 and
#                      VAE cold; --no-compile
#   bf16_cold_staged   the same with WANFAST_STAGED_LOAD=1; bf16_cold_mapped: with 0; bf16_warm (not default)
#   bf16_cold_quant    (not default) as bf16_cold with --quant fp8 --self-attention fa3-fp8: quantised on load
# A run name ending in _nooverlap (e.g. cold_compile_nooverlap) adds --no-overlap-load: the low-noise expert
# loads before the first step instead of during the high-noise steps. meta_*.json hold each MP4's md5.
# Defaults: FP8_RUNS="cold_compile warm_cached cold_cached warm_staged", BF16_RUNS="cold cold_staged".
# Environment: SPEC (t2v-A14B), GEN (generate flags of the FP8 runs), GEN_BF16, PROMPT, DEVICE (cuda),
# COMPILE_CACHE (the --compile-cache folder), SKIP_DD=1 (no h2d / dd probes), H2D_GIB (8), GEN_TIMEOUT (s, 300).
set -uo pipefail
cd "$(dirname "$0")/.."
stage=$1
export WANFAST_COMMIT=${2:-unknown}
source benchmarks/wheels.sh
export PYTHONUNBUFFERED=1
SPEC=${SPEC:-t2v-A14B}
CKPT=${CKPT:-/tmp/wf/cold/ckpt}
# not $CC: that names the C compiler (the GPU machine sets it; `rm -rf "$CC"` removed gcc there)
COMPILE_CACHE=${COMPILE_CACHE:-/tmp/wf/cold/compile_cache}
VIDEOS=${VIDEOS:-/tmp/wf/cold/videos}
o=${OUT:-/tmp/out}/coldstart
DEVICE=${DEVICE:-cuda}
PROMPT=${PROMPT:-a red fox running through fresh snow at dawn}
read -r -a gen_flags <<< "${GEN:---size 832x480 --frames 81 --sampling-preset lightning-4step --self-attention fa3-fp8}"
read -r -a bf16_flags <<< "${GEN_BF16:---size 832x480 --frames 81 --sampling-preset lightning-4step --no-compile}"
read -r -a bf16_full_flags <<< "${GEN_BF16_FULL:---size 832x480 --frames 81 --sampling-preset lightning-4step}"
helper=(python3 benchmarks/coldstart_gpu.py)
mkdir -p "$o" "$CKPT" "$VIDEOS"

drop() {  # 1 when the page cache was dropped, 0 when not (DROP=0 or not allowed)
    if [ "${DROP:-1}" = 1 ] && sync && echo 3 2> /dev/null > /proc/sys/vm/drop_caches; then echo 1; else echo 0; fi
}

gen() {  # NAME PAGE_CACHE(cold|warm) COMPILE_CACHE(fresh|keep|none) [extra generate flags...]
    local name=$1 state=$2 cache=$3 dropped=0 cc=() t0 rc
    shift 3
    case $cache in fresh) rm -rf "$COMPILE_CACHE"; cc=(--compile-cache "$COMPILE_CACHE") ;; keep) cc=(--compile-cache "$COMPILE_CACHE") ;; esac
    [ "$state" = cold ] && dropped=$(drop)
    t0=$(date +%s%N)
    timeout "${GEN_TIMEOUT:-300}" python3 -m wanfast generate --ckpt-dir "$CKPT" --device "$DEVICE" \
        --prompt "$PROMPT" --no-progress --output "$VIDEOS/$name.mp4" --timings "$o/gen_$name.json" \
        "${cc[@]}" "$@" > "$o/gen_$name.log" 2>&1
    rc=$?
    ms=$((($(date +%s%N) - t0) / 1000000))
    md5=$(md5sum "$VIDEOS/$name.mp4" 2> /dev/null | cut -c1-32)  # runs that differ only in timing: same bytes
    printf '{"name": "%s", "page_cache": "%s", "dropped": %s, "compile_cache": "%s", "rc": %d, "wall_s": %d.%03d, "flags": "%s", "mp4_md5": "%s"}\n' \
        "$name" "$state" "$dropped" "$cache" "$rc" $((ms / 1000)) $((ms % 1000)) "$*" "$md5" > "$o/meta_$name.json"
    echo "== $name: rc=$rc page cache $state (dropped=$dropped), compile cache $cache"
    tail -n 4 "$o/gen_$name.log"
}

nooverlap() {  # RUN -> $base (RUN without _nooverlap) and $extra (--no-overlap-load when it had the suffix)
    base=${1%_nooverlap} extra=()
    [ "$base" != "$1" ] && extra=(--no-overlap-load)
    return 0
}

case "$stage" in
write-fp8)
    df -h "$CKPT" | tail -n 1
    rm -rf "$CKPT"/high_noise_model "$CKPT"/low_noise_model
    "${helper[@]}" write --spec "$SPEC" --root "$CKPT" --what rest --device "$DEVICE" --out "$o/write_rest.json"
    "${helper[@]}" write --spec "$SPEC" --root "$CKPT" --what fp8 --device "$DEVICE" --out "$o/write_fp8.json"
    df -h "$CKPT" | tail -n 1
    ;;
fp8)
    [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    if [ "${SKIP_DD:-0}" != 1 ]; then  # SKIP_DD=1: the rates were measured in an earlier loan
        "${helper[@]}" h2d --gib "${H2D_GIB:-8}" --device "$DEVICE" --out "$o/h2d.json"
        printf '{"dropped": %s}\n' "$(drop)" > "$o/meta_dd_fp8_cold.json"
        "${helper[@]}" dd "$CKPT" --out "$o/dd_fp8_cold.json"
        "${helper[@]}" dd "$CKPT" --out "$o/dd_fp8_warm.json"
    fi
    for run in ${FP8_RUNS:-cold_compile warm_cached cold_cached warm_staged}; do
        nooverlap "$run"
        f=("${gen_flags[@]}" "${extra[@]}") n=fp8_$run
        case $base in
        cold_compile) gen "$n" cold fresh "${f[@]}" ;;
        warm_cached) gen "$n" warm keep "${f[@]}" ;;
        cold_cached) gen "$n" cold keep "${f[@]}" ;;
        warm_serial) WANFAST_LOAD_THREADS=0 gen "$n" warm keep "${f[@]}" ;;
        warm_staged) WANFAST_STAGED_LOAD=1 gen "$n" warm keep "${f[@]}" ;;
        warm_mapped) WANFAST_STAGED_LOAD=0 gen "$n" warm keep "${f[@]}" ;;
        cold_mapped) WANFAST_STAGED_LOAD=0 gen "$n" cold keep "${f[@]}" ;;
        cold_staged) WANFAST_STAGED_LOAD=1 gen "$n" cold keep "${f[@]}" ;;
        *) echo "unknown FP8 run $run" >&2 ;;
        esac
    done
    ;;
write-bf16-full)  # both bf16 experts (~57 GB) beside UMT5 + VAE: nvidia-h200-x2's disk (issue #20)
    rm -rf "$CKPT"/high_noise_model "$CKPT"/low_noise_model
    "${helper[@]}" write --spec "$SPEC" --root "$CKPT" --what rest --device "$DEVICE" --out "$o/write_rest.json"
    "${helper[@]}" write --spec "$SPEC" --root "$CKPT" --what bf16 --device "$DEVICE" --out "$o/write_bf16.json"
    df -h "$CKPT" | tail -n 1
    ;;
bf16-full)
    if [ "${SKIP_DD:-0}" != 1 ]; then
        printf '{"dropped": %s}\n' "$(drop)" > "$o/meta_dd_bf16_full_cold.json"
        "${helper[@]}" dd "$CKPT" --out "$o/dd_bf16_full_cold.json"
    fi
    gen bf16_full_cold cold fresh "${bf16_full_flags[@]}"
    gen bf16_full_warm warm keep "${bf16_full_flags[@]}"
    ;;
write-bf16)
    rm -rf "$CKPT"/high_noise_model "$CKPT"/low_noise_model
    "${helper[@]}" write --spec "$SPEC" --root "$CKPT" --what bf16-expert --link-low --device "$DEVICE" \
        --out "$o/write_bf16.json"
    df -h "$CKPT" | tail -n 1
    ;;
bf16)
    printf '{"dropped": %s}\n' "$(drop)" > "$o/meta_dd_bf16_cold.json"
    "${helper[@]}" dd "$CKPT/high_noise_model" --out "$o/dd_bf16_cold.json"
    for run in ${BF16_RUNS:-cold cold_staged}; do
        nooverlap "$run"
        f=("${bf16_flags[@]}" "${extra[@]}") n=bf16_$run
        case $base in
        cold) gen "$n" cold none "${f[@]}" ;;
        warm) gen "$n" warm none "${f[@]}" ;;
        cold_staged) WANFAST_STAGED_LOAD=1 gen "$n" cold none "${f[@]}" ;;
        cold_mapped) WANFAST_STAGED_LOAD=0 gen "$n" cold none "${f[@]}" ;;
        cold_quant) gen "$n" cold none "${f[@]}" --quant fp8 --self-attention fa3-fp8 ;;  # quantised on load
        *) echo "unknown bf16 run $run" >&2 ;;
        esac
    done
    ;;
serve)  # SERVE_RUNS: "cached" (the fp8 stage's compile cache) and/or "nocache" (compiles at start); a name
    # ending in _noprelaunch adds --no-prelaunch (the worker started after the server's checks), e.g. cached_noprelaunch
    declare -A seen=()
    for run in ${SERVE_RUNS:-cached}; do
        seen[$run]=$((${seen[$run]:-0} + 1))
        name=$run  # a name given again (to alternate runs) is written as NAME_2, NAME_3, ...
        [ "${seen[$run]}" -gt 1 ] && name=${run}_${seen[$run]}
        cc=() extra=()
        case $run in cached*) cc=(--compile-cache "$COMPILE_CACHE") ;; esac
        case $run in *_noprelaunch) extra=(--no-prelaunch) ;; esac
        "${helper[@]}" serve --ckpt "$CKPT" --warm-sizes "${WARM_SIZES:-832x480x81}" \
            --engine "--device $DEVICE ${SERVE_ENGINE---self-attention fa3-fp8} ${cc[*]} ${extra[*]}" --out "$o/serve_$name.json"
        python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('serve', sys.argv[2], d['ready_s'], d['health'].get('status'))" "$o/serve_$name.json" "$name"
    done
    ;;
summary)
    "${helper[@]}" summary "$o" --out "$o/summary.json"
    ;;
all)
    for s in write-fp8 fp8 serve write-bf16 bf16 summary; do bash "$0" "$s" "$WANFAST_COMMIT" || exit $?; done
    ;;
*)
    echo "usage: $0 write-fp8|fp8|serve|write-bf16|bf16|write-bf16-full|bf16-full|summary|all [COMMIT]" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# The measured 40-step 1280x720x81 generation (issue #3), one implementation per machine loan:
#   bash benchmarks/gen720.sh wanfast COMMIT     # --compare default --peer none   (~16 min)
#   bash benchmarks/gen720.sh diffusers COMMIT   # --compare none --peer diffusers (~18 min)
# then `bash benchmarks/detached.sh wait gen720_<impl> 580` until it finishes, and
# `python benchmarks/merge_bench.py ...wanfast.json ...diffusers.json --json merged.json`.
set -euo pipefail
cd "$(dirname "$0")/.."
impl=$1
export WANFAST_COMMIT=$2
source benchmarks/wheels.sh
if [ "$impl" = wanfast ]; then sel=(--compare default --peer none); else sel=(--compare none --peer diffusers); fi
dir=/tmp/wf/gen720_$impl
bash benchmarks/detached.sh start "gen720_$impl" -- python3 -m wanfast bench --model t2v-A14B --sizes 1280x720 \
    --frames 81 --what generate --steps 40 "${sel[@]}" --warmup 1 --gen-repeats 1 \
    --json "$dir/bench.json" --png "$dir/bench.png"

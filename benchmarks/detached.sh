#!/usr/bin/env bash
# Runs a command longer than one device call (10 min) on the GPU machine: `start` launches it in its own
# process session (setsid), so it outlives the call; `wait` polls it and copies its log and results to $OUT.
# Issue the next `wait` call at once: the machine goes back after 30 s without a call in flight.
#
#   bash benchmarks/detached.sh start NAME -- python3 -m wanfast bench ... --json /tmp/wf/NAME/r.json
#   bash benchmarks/detached.sh wait NAME 580     # returns when the job ends or after 580 s
#
# The job's directory is /tmp/wf/NAME (log, exit code); `wait` copies it to $OUT/NAME.
set -uo pipefail
cmd=$1 name=$2
dir=/tmp/wf/$name
case "$cmd" in
start)
    shift 3  # start NAME --
    mkdir -p "$dir"
    setsid bash -c '"$@" > "$0/log" 2>&1; echo $? > "$0/rc"' "$dir" "$@" < /dev/null &
    echo "started $name (pid $!)"
    ;;
wait)
    deadline=$((SECONDS + $3))
    while [ ! -f "$dir/rc" ] && [ $SECONDS -lt $deadline ]; do sleep 10; done
    mkdir -p "${OUT:-/tmp/out}/$name" && cp -r "$dir"/. "${OUT:-/tmp/out}/$name/"
    tail -n 5 "$dir/log"
    if [ -f "$dir/rc" ]; then echo "finished rc=$(cat "$dir/rc")"; else echo "still running"; fi
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    ;;
*)
    echo "usage: $0 start NAME -- CMD... | wait NAME SECONDS" >&2
    exit 2
    ;;
esac

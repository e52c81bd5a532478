#!/usr/bin/env bash
# What --trace costs and how many lines per second the tracer writes to a file.
#
# Usage: bash bench/trace.sh        (N calls per run, REPS runs per row; builds release)
#
# The target is tracer/tests/programs/calls.c (`-O0 -g`) calling `add` N times in a loop.
# Rows (median wall ms of REPS interleaved runs, whole command: launch, set-up, the loop,
# the report):
#   untraced            the program alone
#   count               tracer run -p main:add (the default counting probe)
#   trace               --trace -o FILE, default ring (4 MiB): lines written, records
#                       dropped when the tracer falls behind
#   trace, big ring     --trace --trace-ring 256 MiB: nothing dropped; lines / wall time is
#                       what the tracer sustains end to end
#   chrome, big ring    --chrome-trace FILE, same ring
set -uo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000000}
REPS=${REPS:-5}
cargo build --release -q -p tracer
tracer=target/release/tracer
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cc -O0 -g -pthread -o "$work/calls" tracer/tests/programs/calls.c

now() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -A ms lines drops
rows=(untraced count trace big chrome)
run_row() {
    local row=$1 t0 t1
    t0=$(now)
    case $row in
    untraced) "$work/calls" many "$N" >/dev/null ;;
    count) $tracer run -p main:add -o "$work/out" -- "$work/calls" many "$N" >/dev/null ;;
    trace) $tracer run --trace -p main:add -o "$work/out" -- "$work/calls" many "$N" >/dev/null ;;
    big) $tracer run --trace --trace-ring $((256 << 20)) -p main:add -o "$work/out" -- "$work/calls" many "$N" >/dev/null ;;
    chrome) $tracer run --chrome-trace "$work/c.json" --trace-ring $((256 << 20)) -p main:add -o "$work/out" -- "$work/calls" many "$N" >/dev/null ;;
    esac
    t1=$(now)
    ms[$row]+="$(((t1 - t0) / 1000000)) "
    if [ "$row" = trace ] || [ "$row" = big ]; then
        lines[$row]+="$(grep -c '^\[' "$work/out") "
        drops[$row]+="$(sed -n 's/^trace: .* \([0-9]*\) dropped.*/\1/p' "$work/out") "
    fi
    if [ "$row" = chrome ]; then
        lines[$row]+="$(grep -c '"ph":"X"' "$work/c.json") "
        drops[$row]+="0 "
    fi
}
for _ in $(seq "$REPS"); do
    for row in "${rows[@]}"; do run_row "$row"; done
done
base=$(echo ${ms[untraced]} | tr ' ' '\n' | median)
echo "N=$N calls of add, REPS=$REPS, median of each"
printf '%-10s %10s %8s %12s %12s %14s\n' row wall_ms ratio lines dropped lines_per_s
for row in "${rows[@]}"; do
    m=$(echo ${ms[$row]} | tr ' ' '\n' | median)
    l=$(echo ${lines[$row]:-0} | tr ' ' '\n' | median)
    d=$(echo ${drops[$row]:-0} | tr ' ' '\n' | median)
    rate=$(awk -v l="$l" -v m="$m" 'BEGIN { if (m > 0 && l > 0) printf "%.0f", l * 1000 / m; else print "-" }')
    ratio=$(awk -v m="$m" -v b="$base" 'BEGIN { printf "x%.1f", m / b }')
    printf '%-10s %10s %8s %12s %12s %14s\n' "$row" "$m" "$ratio" "$l" "$d" "$rate"
done

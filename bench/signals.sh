#!/usr/bin/env bash
# What a traced program pays for its signals: a program with a setitimer timer (1 kHz and
# 10 kHz, SIGALRM counted by its handler) does a fixed amount of work (ROUNDS rounds of
# about a microsecond of arithmetic plus one malloc/free) and measures its own wall time.
# Three ways, interleaved, REPS times each: untraced, under `tracer run -p libc:malloc`,
# and under `tracer attach -p libc:malloc` for the whole run. Prints the median time of
# each and its ratio to untraced in the same run.
# Usage: bash bench/signals.sh [ROUNDS] [REPS]   (builds the release tracer first)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-1000000}
reps=${2:-7}
cargo build --release -q -p tracer
tracer=$PWD/target/release/tracer
work=$(mktemp -d)
trap 'exec 3>&- || true; rm -rf "$work"' EXIT
cc -O1 -o "$work/ticker" tracer/tests/programs/ticker.c

# Field NAME= of the program's result line in FILE.
field() { grep -o "$1=[0-9]*" "$2" | tail -1 | cut -d= -f2; }

plain() { # hz -> "ns alarms"
    "$work/ticker" "$1" bench "$rounds" >"$work/out"
    echo "$(field ns "$work/out") $(field alarms "$work/out")"
}

run() {
    "$tracer" run -p libc:malloc -o "$work/report" -- "$work/ticker" "$1" bench "$rounds" >"$work/out"
    echo "$(field ns "$work/out") $(field alarms "$work/out")"
}

# Wait (polling the files, outside the measured program) until FILE matches PATTERN.
await() { for _ in $(seq 1 2000); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.01; done; echo "timeout waiting for $2 in $1" >&2; return 1; }

attach() {
    rm -f "$work/in"; mkfifo "$work/in"
    exec 3<>"$work/in"
    "$work/ticker" "$1" bench "$rounds" wait <"$work/in" >"$work/out" &
    local pid=$!
    await "$work/out" ready
    "$tracer" attach "$pid" -p libc:malloc -o "$work/report" 2>"$work/err" &
    local tpid=$!
    await "$work/err" live
    echo go >&3
    await "$work/out" alarms=
    echo end >&3
    wait "$pid"
    wait "$tpid" # ends by itself when the program does
    exec 3>&-
    grep -q 'libc:malloc' "$work/report" || { echo "attach left no report" >&2; return 1; }
    echo "$(field ns "$work/out") $(field alarms "$work/out")"
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "ROUNDS=$rounds, REPS=$reps, median wall time of the program's own work loop"
echo
echo "| timer | untraced, ms | tracer run, ms (ratio) | tracer attach, ms (ratio) | SIGALRMs counted (untraced / run / attach) |"
echo "|---|---|---|---|---|"
for hz in 1000 10000; do
    : >"$work/plain"; : >"$work/run"; : >"$work/attach"
    for _ in $(seq 1 "$reps"); do
        plain "$hz" >>"$work/plain"
        run "$hz" >>"$work/run"
        attach "$hz" >>"$work/attach"
    done
    p=$(cut -d' ' -f1 "$work/plain" | median)
    r=$(cut -d' ' -f1 "$work/run" | median)
    a=$(cut -d' ' -f1 "$work/attach" | median)
    pa=$(cut -d' ' -f2 "$work/plain" | median)
    ra=$(cut -d' ' -f2 "$work/run" | median)
    aa=$(cut -d' ' -f2 "$work/attach" | median)
    awk -v hz="$hz" -v p="$p" -v r="$r" -v a="$a" -v pa="$pa" -v ra="$ra" -v aa="$aa" 'BEGIN {
        printf "| %d Hz | %.1f | %.1f (x%.3f) | %.1f (x%.3f) | %d / %d / %d |\n",
            hz, p / 1e6, r / 1e6, r / p, a / 1e6, a / p, pa, ra, aa }'
done

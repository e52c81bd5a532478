#!/usr/bin/env bash
# What a traced program pays for its signals: a program with a setitimer timer (1 kHz and
# 10 kHz, SIGALRM counted by its handler) does a fixed amount of work (ROUNDS rounds of
# about a microsecond of arithmetic plus one malloc/free) and measures its own wall time.
# Three ways, interleaved, REPS times each: untraced, under `tracer run -p libc:malloc`,
# and under `tracer attach -p libc:malloc` for the whole run. Prints, with the ratio to
# untraced in the same run: the median "own time" of the work loop, its wall time minus
# the time it spent runnable waiting for a CPU (from /proc/self/schedstat): time held in
# a ptrace stop counts, the machine's other load does not; the best wall time; the
# median CPU time (what the probe and the signal handling themselves cost).
# Usage: bash bench/signals.sh [ROUNDS] [REPS]   (builds the release tracer first;
# TRACER=path measures another tracer binary)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-1000000}
reps=${2:-7}
cargo build --release -q -p tracer
tracer=${TRACER:-$PWD/target/release/tracer}
work=$(mktemp -d)
trap 'exec 3>&- || true; rm -rf "$work"' EXIT
cc -O1 -o "$work/ticker" tracer/tests/programs/ticker.c

# Field NAME= of the program's result line in FILE.
field() { grep -o "$1=[0-9]*" "$2" | tail -1 | cut -d= -f2; }
# "wall_ns alarms cpu_ns own_ns" of the last run; own = wall minus the time spent
# waiting for a CPU (the machine's other load), which keeps any time held stopped.
result() {
    local ns q
    ns=$(field ns "$work/out"); q=$(field queued "$work/out")
    echo "$ns $(field alarms "$work/out") $(field cpu "$work/out") $((ns - q))"
}

plain() { # hz -> "ns alarms"
    "$work/ticker" "$1" bench "$rounds" >"$work/out"
    result
}

run() {
    "$tracer" run -p libc:malloc -o "$work/report" -- "$work/ticker" "$1" bench "$rounds" >"$work/out"
    result
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
    # Both lines at once: nothing of ours runs while the program works.
    printf 'go\nend\n' >&3
    wait "$pid"
    wait "$tpid" # ends by itself when the program does
    exec 3>&-
    grep -q 'libc:malloc' "$work/report" || { echo "attach left no report" >&2; return 1; }
    result
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
best() { sort -n | head -1; }

echo "ROUNDS=$rounds, REPS=$reps: the program's own work loop"
table() { # statistic, column in the result lines, title
    echo
    echo "| timer | untraced: $3, ms | tracer run, ms (ratio) | tracer attach, ms (ratio) | SIGALRMs counted, median (untraced / run / attach) |"
    echo "|---|---|---|---|---|"
    for hz in 1000 10000; do
        p=$(cut -d' ' -f"$2" "$work/plain-$hz" | $1)
        r=$(cut -d' ' -f"$2" "$work/run-$hz" | $1)
        a=$(cut -d' ' -f"$2" "$work/attach-$hz" | $1)
        pa=$(cut -d' ' -f2 "$work/plain-$hz" | median)
        ra=$(cut -d' ' -f2 "$work/run-$hz" | median)
        aa=$(cut -d' ' -f2 "$work/attach-$hz" | median)
        awk -v hz="$hz" -v p="$p" -v r="$r" -v a="$a" -v pa="$pa" -v ra="$ra" -v aa="$aa" 'BEGIN {
            printf "| %d Hz | %.1f | %.1f (x%.3f) | %.1f (x%.3f) | %d / %d / %d |\n",
                hz, p / 1e6, r / 1e6, r / p, a / 1e6, a / p, pa, ra, aa }'
    done
}
for hz in 1000 10000; do
    : >"$work/plain-$hz"; : >"$work/run-$hz"; : >"$work/attach-$hz"
done
for _ in $(seq 1 "$reps"); do
    for hz in 1000 10000; do
        plain "$hz" >>"$work/plain-$hz"
        run "$hz" >>"$work/run-$hz"
        attach "$hz" >>"$work/attach-$hz"
    done
done
table median 4 "own time, median"
table best 1 "wall time, best"
table median 3 "CPU time, median"

#!/usr/bin/env bash
# Attach cost: how long `tracer attach` takes to have probes live in a running program
# (attach, start the agent's thread, load the agent, prepare, patch) and detach again.
#
# Usage: bash bench/attach.sh [BASELINE_TRACER]   (builds the release tracer first)
#   BASELINE_TRACER: another tracer binary (an older build) timed on the same idle target in
#   the same run, so that figures taken on a loaded machine can be given as ratios.
#
# Tables (milliseconds, wall clock of `tracer attach PID -p SPEC --duration 0`, tracer's own
# start-up and symbol reading included):
#   1. per thread state of tests/programs/states.c (one thread idle in a malloc/usleep
#      loop, or 4 to 8 threads): a fresh program per attach, median and max of N, for this
#      tracer and the baseline;
#      "list" is `tracer list` on the same kind of program (no ptrace): the tracer's own
#      start-up when it shares the CPUs with that program;
#   2. many probes (libc:*), a fresh idle program per attach.
set -uo pipefail
cd "$(dirname "$0")/.."
baseline=${1:-}
N=${N:-10}
cargo build --release -q -p tracer
tracer=target/release/tracer
work=$(mktemp -d)
pids=()
trap 'rm -rf "$work"; for p in "${pids[@]}"; do kill -9 $p 2>/dev/null; done' EXIT
cc -O1 -pthread -o "$work/states" tests/programs/states.c

ms_now() { date +%s%N; }

# time_list PID: milliseconds of `tracer list PID main:work` (symbols only, no ptrace): how
# much CPU the tracer itself gets next to that program on this machine now.
time_list() {
    local t0 t1
    t0=$(ms_now)
    "$tracer" list "$1" main:work >/dev/null 2>&1
    t1=$(ms_now)
    awk -v d=$((t1 - t0)) 'BEGIN { printf "%.1f\n", d / 1e6 }'
}

# time_attach TRACER PID ARGS...: prints the milliseconds (with 0.1 ms) of one attach+detach,
# or "fail" (attaches cut off after 5 s: the baseline gives up only after 20).
time_attach() {
    local t=$1 pid=$2; shift 2
    local t0 t1
    t0=$(ms_now)
    if ! timeout 5 "$t" attach "$pid" "$@" --duration 0 -o /dev/null 2>"$work/err"; then
        echo fail
        return
    fi
    t1=$(ms_now)
    awk -v d=$((t1 - t0)) 'BEGIN { printf "%.1f\n", d / 1e6 }'
}

# stats: "median | max" of the numbers on stdin, or "fails" if any attach failed.
stats() {
    sort -n | awk '/fail/ { f = 1 } { v[NR] = $1 }
        END { if (f) printf "fails | fails"; else printf "%.1f | %.1f", v[int((NR + 1) / 2)], v[NR] }'
}

# fresh TRACER PROGRAM MODE ARGS...: N fresh programs (PROGRAM MODE), one attach each, once
# the program said "ready" and its threads had 0.1 s to reach their state.
fresh() {
    local t=$1 prog=$2 mode=$3; shift 3
    for i in $(seq 1 "$N"); do
        "$prog" "$mode" >"$work/out" &
        local p=$!
        pids+=("$p")
        until grep -q ready "$work/out" 2>/dev/null; do sleep 0.01; done
        sleep 0.1
        local ms
        if [ "$t" = list ]; then ms=$(time_list "$p"); else ms=$(time_attach "$t" "$p" "$@"); fi
        echo "$ms"
        kill -9 "$p" 2>/dev/null
        wait "$p" 2>/dev/null
        [ "$ms" = fail ] && break
    done | stats
}

# state_row LABEL MODE: this tracer (and the baseline) on N fresh programs in MODE.
state_row() {
    local label=$1 mode=$2 b="" ours list
    ours=$(fresh "$tracer" "$work/states" "$mode" -p main:work)
    list=$(fresh list "$work/states" "$mode" | cut -d'|' -f1)
    if [ -n "$baseline" ]; then
        b=" | $(fresh "$baseline" "$work/states" "$mode" -p main:work)"
    fi
    printf '| %s | %s | %s%s |\n' "$label" "$ours" "$list" "$b"
}

echo "load average: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs"
echo
if [ -n "$baseline" ]; then
    echo "| every thread | median ms | max ms | list median ms | baseline median ms | baseline max ms |"
    echo "|---|---|---|---|---|---|"
else
    echo "| every thread | median ms | max ms | list median ms |"
    echo "|---|---|---|---|"
fi
state_row "idle: malloc, free, usleep(100) in a loop (one thread)" idle
state_row "in pthread_join / pthread_cond_wait (futex)" join
state_row "in sigtimedwait" sigwait
state_row "in read on a pipe" read
state_row "spinning in its own code" spin
state_row "spinning in malloc/free" malloc
state_row "spinning in strlen" strlen
state_row "inside strlen of a 1 MiB string" longstr
state_row "inside a dl_iterate_phdr callback (holding the loader lock)" dliter
state_row "mixed (condvar, read, malloc, strlen, spin, epoll_wait, nanosleep, sigtimedwait)" mixed

echo
echo "| probes, on a fresh idle program each time | median ms | max ms |"
echo "|---|---|---|"
n=$("$work/states" idle >/dev/null & p=$!; sleep 0.1; "$tracer" list "$p" 'libc:*' | grep -c probeable; kill -9 $p)
printf '| libc:* (%s probeable) | %s |\n' "$n" "$(fresh "$tracer" "$work/states" idle -p 'libc:*')"
printf '| libc:* with -x | %s |\n' "$(fresh "$tracer" "$work/states" idle -x -p 'libc:*')"

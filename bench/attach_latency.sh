#!/usr/bin/env bash
# Issue #10's attach latency targets, this tracer against a baseline build, interleaved.
#
# Usage: bash bench/attach_latency.sh BASELINE_TRACER [ROUNDS]   (builds the release tracer)
#
# Each round, the two tracers in alternating order, each on fresh idle programs
# (tests/programs/states.c idle, once it said "ready" and had 0.1 s to settle):
#   first  `tracer attach PID -p libc:malloc --duration 0` (the agent not loaded yet);
#   later  the same command again on the same process (the agent and park page there);
#   phases a first attach with `--timings` on another fresh program: its `pthread_create`
#          call, "parked and stopped", the whole agent-thread phase and the tracer's own
#          wall clock (the other rows run without `--timings`: it adds its RSS reads);
#   run    `tracer run -p libc:malloc -- /bin/true`;
# and /bin/true untraced once per round. Wall clock from the shell (`$EPOCHREALTIME`, no
# process forked to read the clock), every command under `chrt -f 1` (CHRT= to change).
# Prints median and range (min-max) in ms per row and tracer.
#
# Both builds' agent files are kept mapped by a `sleep` each (attached once): a tracer
# placing its agent file prunes files no process maps, so that another build's (or another
# checkout's tests') first attach would otherwise find its file gone and write it again.
set -uo pipefail
cd "$(dirname "$0")/.."
baseline=${1:?usage: bash bench/attach_latency.sh BASELINE_TRACER [ROUNDS]}
rounds=${2:-40}
chrt=${CHRT-chrt -f 1}
cargo build --release -q -p tracer
work=$(mktemp -d)
cp target/release/tracer "$work/new"
cp "$baseline" "$work/base"
sleepers=()
P=
trap 'kill -9 ${P:-} "${sleepers[@]}" 2>/dev/null; rm -rf "$work"' EXIT
cc -O1 -pthread -o "$work/states" tests/programs/states.c

# wall CMD...: milliseconds of CMD from the shell, or "fail".
wall() {
    local a b
    a=${EPOCHREALTIME//[.,]/}
    $chrt "$@" >/dev/null 2>"$work/err" || { echo fail; return; }
    b=${EPOCHREALTIME//[.,]/}
    awk -v d=$((10#$b - 10#$a)) 'BEGIN { printf "%.2f\n", d / 1e3 }'
}

# start: a fresh idle program in P.
start() {
    "$work/states" idle >"$work/out" &
    P=$!
    until grep -q ready "$work/out" 2>/dev/null; do sleep 0.01; done
    sleep 0.1
}

stop() {
    kill -9 "$P" 2>/dev/null
    wait "$P" 2>/dev/null
    P=
}

# one TRACER: one round's rows for TRACER (new or base), appended to $work/rows.
one() {
    local t=$1 bin=$work/$1
    start
    echo "$t first $(wall "$bin" attach "$P" -p libc:malloc --duration 0 -o /dev/null)"
    echo "$t later $(wall "$bin" attach "$P" -p libc:malloc --duration 0 -o /dev/null)"
    stop
    start
    $chrt "$bin" attach "$P" -p libc:malloc --duration 0 --timings -o /dev/null \
        2>"$work/timings" >/dev/null
    awk -v t="$t" '/pthread_create call/ { a = $NF } /parked and stopped/ { b = $NF }
        /^  agent thread/ { c = $NF } /wall clock/ { d = $NF }
        END { print t, "create", a; print t, "parked", b; print t, "agent-thread", c;
              print t, "tracer-wall", d }' "$work/timings"
    stop
    echo "$t run $(wall "$bin" run -p libc:malloc -- /bin/true)"
}

for t in new base; do
    sleep 3600 &
    disown
    sleepers+=("$!")
    sleep 0.05
    "$work/$t" attach "$!" -p libc:malloc --duration 0 -o /dev/null 2>/dev/null
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs, $rounds rounds"
for r in $(seq 1 "$rounds"); do
    if ((r % 2)); then one new; one base; else one base; one new; fi
    echo "untraced run $(wall /bin/true)"
done >"$work/rows"
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| row | this build: median (min-max) ms | baseline: median (min-max) ms |"
echo "|---|---|---|"
# cell TRACER ROW: "median (min-max)" of that row's numbers, or "fails".
cell() {
    awk -v t="$1" -v k="$2" '$1 == t && $2 == k { print $3 }' "$work/rows" | sort -n |
        awk '/fail/ { f = 1 } { v[NR] = $1 }
            END { if (f || NR == 0) { printf "fails"; exit }
                  m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
                  printf "%.2f (%.2f-%.2f)", m, v[1], v[NR] }'
}
for k in first later run create parked agent-thread tracer-wall; do
    printf '| %s | %s | %s |\n' "$k" "$(cell new "$k")" "$(cell base "$k")"
done
printf '| /bin/true untraced | %s | |\n' "$(cell untraced run)"

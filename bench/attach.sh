#!/usr/bin/env bash
# Attach cost: how long `tracer attach` takes to have probes live in a running program
# (attach, inject the agent, prepare, patch), and the whole attach+detach round trip.
# Usage: bash bench/attach.sh   (builds the release tracer first)
set -uo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p tracer
tracer=target/release/tracer
work=$(mktemp -d)
trap 'rm -rf "$work"; kill $pid 2>/dev/null || true' EXIT
cat > "$work/loop.c" <<'C'
#include <stdlib.h>
#include <unistd.h>
void *volatile sink;
int main(void) { for (;;) { sink = malloc(32); free(sink); usleep(100); } }
C
cc -O1 -o "$work/loop" "$work/loop.c"
"$work/loop" & pid=$!
sleep 0.2
run() { # label, probe args...
    local label=$1; shift
    local best=999999 total=0 n=10
    # The first attach loads the agent; later ones reuse it. Report both.
    for i in $(seq 1 $n); do
        local t0 t1
        t0=$(date +%s%N)
        "$tracer" attach "$pid" "$@" --duration 0 -o /dev/null 2>/dev/null
        t1=$(date +%s%N)
        local ms=$(( (t1 - t0) / 1000000 ))
        [ "$i" = 1 ] && first=$ms
        [ "$ms" -lt "$best" ] && best=$ms
        total=$((total + ms))
    done
    printf '| %s | %d | %d | %d |\n' "$label" "$first" "$best" $((total / n))
}
echo "| probes | first attach+detach (agent loaded), ms | best of 10, ms | mean of 10, ms |"
echo "|---|---|---|---|"
run "libc:malloc (1)" -p 'libc:malloc'
run "libc:* ($("$tracer" list "$pid" 'libc:*' | grep -c probeable) probeable)" -p 'libc:*'
run "libc:* with -x" -x -p 'libc:*'

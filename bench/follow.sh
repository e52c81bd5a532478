#!/usr/bin/env bash
# Following cost: what `tracer run` adds per program the command execs, and per fork.
#
# Usage: bash bench/follow.sh   (builds the release tracer first; N=5 repetitions)
#
# A shell runs the same small program E times (each an exec, probed through the agent's
# check-in), or a program forks F children (each takes counters of its own); wall clock of
# the whole command, median of N, untraced, with `tracer run --no-follow` and with
# `tracer run` (following), all in the same run. The per-exec and per-fork figures are
# (following - no-follow) / E (or F).
set -uo pipefail
cd "$(dirname "$0")/.."
N=${N:-5}
E=${E:-40}
F=${F:-40}
cargo build --release -q -p tracer
tracer=$PWD/target/release/tracer
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cc -O1 -o "$work/follow_mallocs" tracer/tests/programs/follow_mallocs.c
cc -O1 -o "$work/follow_fork" tracer/tests/programs/follow_fork.c
cd "$work"

ms_now() { echo $(($(date +%s%N) / 1000000)); }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# time_ms CMD...: median wall-clock milliseconds of N runs.
time_ms() {
    for _ in $(seq "$N"); do
        local t0=$(ms_now)
        "$@" >/dev/null 2>&1
        echo $(($(ms_now) - t0))
    done | median
}

script="for i in \$(seq $E); do ./follow_mallocs 1; done"
plain=$(time_ms sh -c "$script")
nofollow=$(time_ms "$tracer" run --no-follow -p libc:malloc -o /dev/null -- sh -c "$script")
follow=$(time_ms "$tracer" run -p libc:malloc -o /dev/null -- sh -c "$script")
echo "| $E execs | untraced $plain ms | --no-follow $nofollow ms | following $follow ms | per exec $(( (follow - nofollow) / E )) ms |"

fplain=$(time_ms ./follow_fork "$F" 10 10)
fnofollow=$(time_ms "$tracer" run --no-follow -p main:work -o /dev/null -- ./follow_fork "$F" 10 10)
ffollow=$(time_ms "$tracer" run -p main:work -o /dev/null -- ./follow_fork "$F" 10 10)
echo "| $F forks | untraced $fplain ms | --no-follow $fnofollow ms | following $ffollow ms | per fork $(( (ffollow - fnofollow) * 1000 / F )) us |"
uptime

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
#   2. many probes (libc:*), a fresh idle program per attach;
#   3. latency: first and later attach on one program, `tracer run -p libc:malloc -- /bin/true`
#      against /bin/true untraced, with the prepare and patch phases of `--timings`, then
#      the same rows for the baseline when one is given;
#   4. scale: 1, 100, 1,000 and 10,000 probes on a generated library of 10,000 small
#      functions (N_SCALE fresh programs each), with the trampoline bytes and the target's
#      added RSS per probe that `--timings` reports; then `-p '*:*'` on redis-server
#      (installed with apt-get when missing; skipped with a line when that fails).
#
# SECTIONS=latency (or any comma-separated subset of states,probes,latency,scale) runs
# only those tables. Issue #10's rows (`-p libc:malloc`) against a baseline build, the two
# interleaved round by round: bench/attach_latency.sh; figures in bench/attach.md.
set -uo pipefail
# ONLY=scale, the older spelling, is SECTIONS=scale.
[ "${ONLY:-}" = scale ] && SECTIONS=scale
SECTIONS=${SECTIONS:-states,probes,latency,scale}
want() { [[ ",$SECTIONS," == *",$1,"* ]]; }
cd "$(dirname "$0")/.."
baseline=${1:-}
N=${N:-10}
cargo build --release -q -p tracer
tracer=target/release/tracer
work=$(mktemp -d)
pids=()
trap 'rm -rf "$work"; for p in "${pids[@]}"; do kill -9 $p 2>/dev/null; done' EXIT
cc -O1 -pthread -o "$work/states" tests/programs/states.c

# stamp VAR: nanoseconds now into VAR, without a process: `$(date +%s%N)` forked and ran
# `date`, which added 1 to 2 ms to every figure here (measured on /bin/true: 3.0 ms median
# with `date`, 1.2 ms with this, 40 runs alternating on a loaded 2-vCPU machine).
stamp() {
    local us=${EPOCHREALTIME//[.,]/}
    printf -v "$1" '%s' "$((10#$us * 1000))"
}

# time_list PID: milliseconds of `tracer list PID main:work` (symbols only, no ptrace): how
# much CPU the tracer itself gets next to that program on this machine now.
time_list() {
    local t0 t1
    stamp t0
    "$tracer" list "$1" main:work >/dev/null 2>&1
    stamp t1
    awk -v d=$((t1 - t0)) 'BEGIN { printf "%.1f\n", d / 1e6 }'
}

# time_attach TRACER PID ARGS...: prints the milliseconds (with 0.1 ms) of one attach+detach,
# or "fail" (attaches cut off after 5 s: the baseline gives up only after 20).
time_attach() {
    local t=$1 pid=$2; shift 2
    local t0 t1
    stamp t0
    if ! timeout 5 "$t" attach "$pid" "$@" --duration 0 -o /dev/null 2>"$work/err"; then
        echo fail
        return
    fi
    stamp t1
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
if want states; then
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
fi

if want probes; then
echo
echo "| probes, on a fresh idle program each time | median ms | max ms |"
echo "|---|---|---|"
n=$("$work/states" idle >/dev/null & p=$!; sleep 0.1; "$tracer" list "$p" 'libc:*' | grep -c probeable; kill -9 $p)
printf '| libc:* (%s probeable) | %s |\n' "$n" "$(fresh "$tracer" "$work/states" idle -p 'libc:*')"
printf '| libc:* with -x | %s |\n' "$(fresh "$tracer" "$work/states" idle -x -p 'libc:*')"
fi

# ---------------------------------------------------------------------------------------
# Latency and scale (issue #10): wall clock and the tracer's own --timings breakdown.

# timings_of TRACER ARGS...: runs `TRACER ARGS... --timings` and prints "wall prepare patch
# bytes rss code rss_prepare" (ms, ms, ms, trampoline spacing per probe, target RSS bytes per
# probe, trampoline code bytes per probe with the relocated instructions aside, target RSS
# added by prepare per probe; "-" where the tracer does not report it), or "fail".
timings_of() {
    local t0 t1
    stamp t0
    # The flags go right after the subcommand: after `run ... --` they would be the
    # program's.
    if ! timeout 20 "$1" "$2" --timings -o /dev/null "${@:3}" 2>"$work/err" >/dev/null; then
        echo fail
        return
    fi
    stamp t1
    awk -v d=$((t1 - t0)) '
        /prepare \(remote\)/ { p = $3 } /^ +patch / { q = $2 }
        /trampoline bytes per probe/ { b = $NF } /RSS added per probe/ { r = $NF }
        /relocated aside/ { c = $NF } /RSS added by prepare per probe/ { rp = $NF }
        END { printf "%.1f %.1f %.2f %s %s %s %s\n", d / 1e6, p, q, b == "" ? "-" : b,
              r == "" ? "-" : r, c == "" ? "-" : c, rp == "" ? "-" : rp }' \
        "$work/err"
}

# median_cols: per column median of the lines on stdin ("fail" if any line failed).
median_cols() {
    awk '/fail/ { f = 1 } { for (i = 1; i <= NF; i++) v[i, NR] = $i; nf = NF; n = NR }
        END {
            if (f || n == 0) { print "fail"; exit }
            m = int((n + 1) / 2)
            for (i = 1; i <= nf; i++) {
                # insertion sort: mawk has no asort
                for (r = 1; r <= n; r++) {
                    x = v[i, r]; j = r - 1
                    while (j > 0 && (a[j] + 0) > (x + 0)) { a[j + 1] = a[j]; j-- }
                    a[j + 1] = x
                }
                printf "%s%s", a[m], (i < nf ? " " : "\n")
            }
        }'
}

if want latency; then
echo
echo "## Latency (median of $N; ms)"
echo
# latency_rows TRACER LABEL: first and later attach on one program, and tracer run, for
# TRACER; fresh programs, the tracers alternating with the baseline's rows below.
latency_rows() {
    local t=$1 label=$2 first=() later=() p
    for i in $(seq 1 "$N"); do
        "$work/states" idle >"$work/out" &
        p=$!
        pids+=("$p")
        until grep -q ready "$work/out" 2>/dev/null; do sleep 0.01; done
        sleep 0.1
        first+=("$(timings_of "$t" attach "$p" -p main:work --duration 0)")
        later+=("$(timings_of "$t" attach "$p" -p main:work --duration 0)")
        kill -9 "$p" 2>/dev/null
        wait "$p" 2>/dev/null
    done
    printf '| %sfirst attach, main:work (agent loaded) | %s |\n' "$label" \
        "$(printf '%s\n' "${first[@]}" | median_cols | awk '{ print $1 " | " $2 " | " $3 }')"
    printf '| %slater attach, same process | %s |\n' "$label" \
        "$(printf '%s\n' "${later[@]}" | median_cols | awk '{ print $1 " | " $2 " | " $3 }')"
    printf '| %stracer run -p libc:malloc -- /bin/true | %s |\n' "$label" \
        "$(for i in $(seq 1 "$N"); do timings_of "$t" run -p libc:malloc -- /bin/true; done |
            median_cols | awk '{ print $1 " | " $2 " | " $3 }')"
}
echo "| what | wall ms | prepare ms | patch ms |"
echo "|---|---|---|---|"
latency_rows "$tracer" ""
untraced=$(for i in $(seq 1 "$N"); do
    stamp t0; /bin/true; stamp t1; echo "$(( (t1 - t0) / 1000 ))"
done | sort -n | awk '{ v[NR] = $1 } END { printf "%.1f", v[int((NR + 1) / 2)] / 1000 }')
printf '| /bin/true untraced | %s | | |\n' "$untraced"
if [ -n "$baseline" ]; then
    latency_rows "$baseline" "baseline: "
fi
fi

if want scale; then
# A generated library of 10,000 small functions (as tracer/tests/e2e_sessions.rs builds),
# called by a program that runs them all every millisecond.
gen_lib() {
    local d=$1 n=$2
    {
        echo '#include <stdint.h>'
        for ((i = 0; i < n; i++)); do
            printf '__attribute__((noinline)) int g%05d(int x) { return x * 3 + %d + 1; }\n' $i $i
        done
        echo 'int (*const gen_table[])(int) = {'
        for ((i = 0; i < n; i++)); do printf 'g%05d,\n' $i; done
        echo '};'
        printf 'int gen_run(int r) { int s = 0; for (int i = 0; i < %d; i++) s += gen_table[i](r + i); return s; }\n' "$n"
    } >"$d/gen.c"
    cc -O2 -shared -fPIC -o "$d/libgen.so" "$d/gen.c"
    cat >"$d/gen_main.c" <<'C'
#include <stdio.h>
#include <unistd.h>
int gen_run(int r);
int main(void) {
    volatile int s = 0;
    printf("ready\n");
    fflush(stdout);
    for (int r = 0;; r++) { s += gen_run(r); usleep(1000); }
}
C
    cc -O1 -o "$d/gen_main" "$d/gen_main.c" -L"$d" -lgen -Wl,-rpath,"$d"
}
gen_lib "$work" 10000

# scale_runs TRACER SPEC: N_SCALE fresh generated programs, one attach each; per column
# medians of timings_of.
N_SCALE=${N_SCALE:-3}
scale_runs() {
    for i in $(seq 1 "$N_SCALE"); do
        "$work/gen_main" >"$work/out" &
        local p=$!
        pids+=("$p")
        until grep -q ready "$work/out" 2>/dev/null; do sleep 0.01; done
        timings_of "$1" attach "$p" -p "$2" --duration 0
        kill -9 "$p" 2>/dev/null
        wait "$p" 2>/dev/null
    done | median_cols
}

# scale_row LABEL SPEC: this tracer (and the baseline, alternating rows of runs) on fresh
# generated programs.
scale_row() {
    local label=$1 spec=$2 ours b=""
    ours=$(scale_runs "$tracer" "$spec" |
        awk '{ print $1 " | " $2 " | " $3 " | " $6 " | " $4 " | " $7 " | " $5 }')
    if [ -n "$baseline" ]; then
        b=" | $(scale_runs "$baseline" "$spec" | awk '{ print $1 " | " $2 " | " $4 }')"
    fi
    printf '| %s | %s%s |\n' "$label" "$ours" "$b"
}
echo
echo "## Scale: probes on a generated library (median of $N_SCALE, fresh program each)"
echo
cols="| probes | wall ms | prepare ms | patch ms | code bytes/probe (relocated aside) | trampoline spacing | RSS added by prepare, bytes/probe | RSS added with the agent, bytes/probe"
if [ -n "$baseline" ]; then
    echo "$cols | baseline wall ms | baseline prepare ms | baseline trampoline spacing |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|"
else
    echo "$cols |"
    echo "|---|---|---|---|---|---|---|---|"
fi
scale_row 1 'libgen:g00000'
scale_row 100 'libgen:g000??'
scale_row 1,000 'libgen:g00???'
scale_row 10,000 'libgen:g?????'

# A real server from the machine's packages, every function of every module.
echo
if ! command -v redis-server >/dev/null; then
    timeout 120 apt-get install -y -q redis-server >/dev/null 2>&1
fi
if command -v redis-server >/dev/null; then
    redis-server --port 0 --unixsocket "$work/redis.sock" --save '' --daemonize no >/dev/null &
    rp=$!
    pids+=("$rp")
    sleep 0.5
    r=$(timings_of "$tracer" attach "$rp" -p '*:*' --duration 0)
    n=$(grep -o '[0-9]* probe(s) live' "$work/err" | cut -d' ' -f1)
    echo "| redis-server, -p '*:*' | probes | wall ms | prepare ms | patch ms | code bytes/probe (relocated aside) | trampoline spacing | RSS added by prepare, bytes/probe |"
    echo "|---|---|---|---|---|---|---|---|"
    echo "$r" | awk -v n="${n:-?}" '{ printf "| | %s | %s | %s | %s | %s | %s | %s |\n", n, $1, $2, $3, $6, $4, $7 }'
    kill -9 "$rp" 2>/dev/null
else
    echo "redis-server: not installed and apt-get could not install it; the real-server row is skipped"
fi
fi

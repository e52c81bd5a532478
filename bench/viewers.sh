#!/usr/bin/env bash
# Does a real viewer read what `--chrome-trace` writes? Imports tracer's Chrome trace JSON
# with speedscope's own importer (the released npm package, run in node under jsdom) and
# checks what speedscope sees against the calls tracer/tests/programs/calls.c makes.
#
# Usage: bash bench/viewers.sh     (needs the npm registry; not part of .ci/run)
#        TRACER=path bash bench/viewers.sh   checks another tracer build
#
# Runs (each file also checked against the trace-event format's rules for X and M events):
#   seq      -p main:add -p main:outer -p main:greet on `calls seq`: one thread profile,
#            add x3, outer x1, greet x1, add nested in outer twice
#   threads  -p main:add on `calls threads`: three thread profiles, add x3, x3 and x1
#   killed   -p main:add on `calls many 50000000`, tracer SIGKILLed mid-run: the file has
#            no closing `]`; speedscope must still import every call the file holds
# Exits non-zero when an import fails or what speedscope sees differs.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
SPEEDSCOPE_VERSION=${SPEEDSCOPE_VERSION:-1.25.0}

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null || {
        echo "viewers.sh: could not install nodejs and npm with apt-get" >&2
        exit 1
    }
fi
# jsdom 29 needs node 20.19 or later; Debian 12's own nodejs is 18, which jsdom 22 supports.
if node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a == 20 && b >= 19) ? 0 : 1)'; then
    JSDOM_VERSION=${JSDOM_VERSION:-29.1.1}
else
    JSDOM_VERSION=${JSDOM_VERSION:-22.1.0}
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm install --silent --no-audit --no-fund "speedscope@$SPEEDSCOPE_VERSION" "jsdom@$JSDOM_VERSION" >/dev/null) || {
    echo "viewers.sh: npm install speedscope@$SPEEDSCOPE_VERSION jsdom@$JSDOM_VERSION failed (is the npm registry reachable?)" >&2
    exit 1
}

if [ -n "${TRACER:-}" ]; then
    tracer=$TRACER
else
    cargo build --release -q -p tracer || exit 1
    tracer=$root/target/release/tracer
fi
cc -O0 -g -pthread -o "$work/calls" tracer/tests/programs/calls.c || exit 1

check() { node bench/speedscope_import.cjs "$work/node_modules" "$@"; }
status=0

echo "== seq: add, outer (calls add twice), greet"
$tracer run --chrome-trace "$work/seq.json" -p main:add -p main:outer -p main:greet -o "$work/report" -- "$work/calls" seq >/dev/null || status=1
check "$work/seq.json" '{"profiles":[{"add":3,"outer":1,"greet":1}],"nested":{"outer>add":2}}' || status=1

echo "== threads: two threads call add 3 times each, then main calls it once"
$tracer run --chrome-trace "$work/threads.json" -p main:add -o "$work/report" -- "$work/calls" threads >/dev/null || status=1
check "$work/threads.json" '{"profiles":[{"add":3},{"add":3},{"add":1}]}' || status=1

echo "== killed: tracer gets SIGKILL while add runs in a loop"
$tracer run --chrome-trace "$work/killed.json" --trace-ring $((64 << 20)) -p main:add -o "$work/report" -- "$work/calls" many 50000000 >/dev/null &
tracer_pid=$!
target_pid=
for _ in $(seq 200); do
    [ -z "$target_pid" ] && target_pid=$(pgrep -P "$tracer_pid" -x calls)
    [ -n "$target_pid" ] && [ "$(wc -l <"$work/killed.json" 2>/dev/null || echo 0)" -gt 1000 ] && break
    sleep 0.05
done
kill -KILL "$tracer_pid"
wait "$tracer_pid" 2>/dev/null
# The target runs on without its tracer (its probes drop what nobody drains); end it.
[ -n "$target_pid" ] && kill -KILL "$target_pid" 2>/dev/null
echo "last line: $(tail -n 1 "$work/killed.json")"
check "$work/killed.json" '{"profiles":"from-file"}' || status=1

[ $status = 0 ] && echo "viewers.sh: speedscope imported every file as expected" || echo "viewers.sh: FAILED"
exit $status

#!/usr/bin/env bash
# The real-program suite (issue #9): real programs from Debian packages, and a C++ program
# that throws built from source, each run untraced and then under
#   tracer run -x -p 'libc:*' -p 'main:*' --json -o FILE -- PROGRAM ...
# (`main:*` only when the executable exports functions: stripped programs export none, and
# a spec that matches nothing is an error). Stdout, stderr (less tracer's own `tracer: `
# lines) and the exit status must be byte-identical. Prints a Markdown table per program:
# result, probes live, probes refused by reason, entry hits, exits, lost exits.
#
# Usage: bash bench/real_programs.sh [NAME...]        (all programs when no NAME)
#   SPECS="-p libc:*"   probe set instead of the default
#   TIMEOUT=120         seconds per run
#   KEEP=1              keep the work directory (outputs, diffs, tracer lines)
# Exit status: 0 when every program ran identically, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
timeout_s=${TIMEOUT:-120}

# Programs come from Debian packages; install the missing ones.
need=()
for pair in python3.11:python3.11 perl:perl-base gzip:gzip xz:xz-utils bzip2:bzip2 \
    zstd:zstd sqlite3:sqlite3 sort:coreutils grep:grep tar:tar mawk:mawk g++:g++; do
    [ -x "/usr/bin/${pair%%:*}" ] || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo build --release -q -p tracer || exit 2
tracer=$root/target/release/tracer
work=$(mktemp -d /tmp/real-programs.XXXXXX)
[ -n "${KEEP:-}" ] || trap 'rm -rf "$work"' EXIT

# Inputs: deterministic text, a small tree for tar, SQL, scripts.
seq 1 30000 | /usr/bin/mawk '{ printf "%d word%d %x %s\n", ($1 * 7919) % 10007, $1 % 97, $1, ($1 % 13 ? "lorem" : "ipsum dolor") }' >"$work/text"
mkdir -p "$work/tree/a/b" && cp "$work/text" "$work/tree/a/text" && head -c 5000 "$work/text" >"$work/tree/a/b/small"
cat >"$work/db.sql" <<'SQL'
create table t(id integer primary key, k text, v real);
with recursive n(i) as (select 1 union all select i + 1 from n where i < 20000)
insert into t select i, 'k' || (i % 101), i * 1.5 from n;
create index tk on t(k);
select k, count(*), printf('%.2f', sum(v)), max(id) from t group by k order by sum(v) desc limit 12;
select count(*) from t where k like 'k1%' and v > 100;
select group_concat(k, ',') from (select distinct k from t order by k limit 20);
SQL
cat >"$work/script.py" <<'PY'
import json, re, math, hashlib, collections, decimal
words = open(0).read().split()
c = collections.Counter(w for w in words if re.fullmatch(r"word\d+", w))
print(c.most_common(5))
print(json.dumps({"n": len(words), "sum": sum(int(w) for w in words if w.isdigit())}, sort_keys=True))
print(float("nan"), float("inf"), math.isnan(float("nan")), repr(1e300 * 1e300), 0.1 + 0.2)
print(hashlib.sha256(" ".join(words[:5000]).encode()).hexdigest())
print(decimal.Decimal(1) / decimal.Decimal(7))
try:
    {}["missing"]
except KeyError as e:
    print("caught", repr(e))
print(sorted({w[::-1] for w in words[:2000]})[:5])
PY
cat >"$work/script.pl" <<'PL'
my %h; my $n = 0;
while (<STDIN>) { for my $w (split) { $h{$w}++; $n++ } }
my @top = (sort { $h{$b} <=> $h{$a} || $a cmp $b } keys %h)[0 .. 9];
printf "%d words, %d distinct\n", $n, scalar keys %h;
print "$_ $h{$_}\n" for @top;
my $s = join ",", map { sprintf "%05.1f", $_ / 3 } 1 .. 20; print "$s\n";
eval { die { code => 42 } }; print "caught $@->{code}\n";
(my $t = "Hello World") =~ s/(\w+)/\u\L$1/g; print lc($t), uc($t), "\n";
PL
cat >"$work/script.awk" <<'AWK'
{ s[$2] += $1; n++; if ($4 == "ipsum") m = m substr($3, 1, 1) }
END { for (k in s) printf "%s %d\n", k, s[k]; print n, length(m), toupper(substr(m, 1, 40)); printf "%.3f %e\n", n / 7, n * 1e10 }
AWK
c++ -O2 -o "$work/wordfreq" tests/programs/wordfreq.cc || exit 2
head -c 200000 "$work/text" >"$work/wordfreq.in"
printf 'hello world hello 99999999999999 -12 3x\n' >>"$work/wordfreq.in"

# name | stdin | command...
cases=(
    "python3|$work/text|/usr/bin/python3.11 $work/script.py"
    "perl|$work/text|/usr/bin/perl $work/script.pl"
    "gzip|$work/text|/usr/bin/gzip -c -n -6"
    "xz|$work/text|/usr/bin/xz -c -T1"
    "bzip2|$work/text|/usr/bin/bzip2 -c"
    "zstd|$work/text|/usr/bin/zstd -c -q -T1"
    "sqlite3|$work/db.sql|/usr/bin/sqlite3 :memory:"
    "sort|$work/text|/usr/bin/sort -k2,2 -k1n --parallel=1 -S 8M"
    "grep|$work/text|/usr/bin/grep -E -c word(1|2)[0-9]+.*ipsum"
    "tar|/dev/null|/usr/bin/tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - -C $work/tree ."
    "awk|$work/text|/usr/bin/mawk -f $work/script.awk"
    "wordfreq-c++|$work/wordfreq.in|$work/wordfreq"
)

# The refused probes of a --json report as "PREFIX:NAME<TAB>reason" (NAME demangled, as
# `tracer list` shows it).
refusals() { # report.json
    python3 -c 'import json, sys
for line in open(sys.argv[1]):
    o = json.loads(line)
    if "refused" in o:
        print(o["probe"].split(":")[0] + ":" + o["name"], o["refused"], sep="\t")' "$1" 2>/dev/null
}

# Refusals counted by reason, in short words.
reason_class() {
    cut -f2 | awk '
        /only [0-9]+ bytes of the function remain/ { print "too short"; next }
        /ends with .* fewer than the/ { print "ends before 5 bytes"; next }
        /jump table/ { print "jump table into patch"; next }
        /indirect .* could land anywhere/ { print "indirect jump"; next }
        /goes to .* inside the bytes/ { print "branch into patch"; next }
        /jumps back to the function.s entry/ { print "loop back to entry"; next }
        /refers to .* inside the bytes/ { print "rip-relative into patch"; next }
        /already probed/ { print "alias of a probed address"; next }
        /overlap/ { print "overlapping patch"; next }
        { print substr($0, 1, 70) }' | sort | uniq -c | sort -rn |
        awk '{ n = $1; $1 = ""; sub(/^ /, ""); printf "%s%s %d", (NR > 1 ? ", " : ""), $0, n } END { if (NR == 0) printf "none" }'
}

sum_field() { # file, key
    grep -o "\"$2\":[0-9]*" "$1" 2>/dev/null | cut -d: -f2 | awk '{ s += $1 } END { print s + 0 }'
}

describe_status() {
    local rc=$1
    if [ "$rc" -eq 124 ]; then echo "timeout"; elif [ "$rc" -gt 128 ]; then echo "signal $((rc - 128)) ($(kill -l $((rc - 128)) 2>/dev/null))"; else echo "exit $rc"; fi
}

# Runs the program under `tracer run SPECS...`; prints "ok" or how it differs.
verdict() { # dir, stdin, plain rc, specs... -- cmd...
    local d=$1 stdin=$2 prc=$3; shift 3
    local specs=()
    while [ "$1" != -- ]; do specs+=("$1"); shift; done
    shift
    (cd "$d" && timeout "$timeout_s" "$tracer" run "${specs[@]}" --json -o "$d/v.json" -- "$@" <"$stdin" >v.out 2>v.all)
    local rc=$?
    if [ "$rc" = "$prc" ] && cmp -s "$d/plain.out" "$d/v.out" && { grep -v '^tracer: ' "$d/v.all" || true; } | cmp -s "$d/plain.err" -; then
        echo ok
    else
        echo "broken ($(describe_status $rc))"
    fi
}

# `tracer list FILE` verdicts as "PREFIX:NAME<TAB>probeable|ifunc|refused". Fields are
# separated by two spaces (demangled C++ names have single spaces).
list_verdicts() { # file, prefix
    "$tracer" list "$1" 2>/dev/null | awk -F '  ' -v p="$2" '{ n = $1; sub(/^[^:]*:/, "", n);
        v = ($4 ~ /^probeable/) ? "probeable" : ($4 ~ /^ifunc:/) ? "ifunc" : "refused"; print p ":" n "\t" v }'
}
list_verdicts /usr/lib/x86_64-linux-gnu/libc.so.6 libc >"$work/list.libc"

# How the refusals of a run compare with what `tracer list` said beforehand.
list_agreement() { # report.json, list file(s)...
    local json=$1; shift
    refusals "$json" | cut -f1 |
        awk -F'\t' 'FILENAME != "-" { v[$1] = $2; next }
            { if (v[$1] == "probeable") p = p " " $1; else if (v[$1] == "ifunc") i++; else if (v[$1] == "") u++ }
            END { printf "%s", (p == "" && i + u == 0) ? "agrees" : "";
                  if (p != "") printf "said probeable:%s; ", p;
                  if (i) printf "%d IFUNC rows had no verdict; ", i;
                  if (u) printf "%d not listed; ", u }' "$@" -
}

selected=("$@")
failed=0
echo "| program | PIE | probe set | result | status untraced / traced | probes live | entry hits | exits (lost) | refused, by reason | refusals vs \`tracer list\` | when broken: each probe set alone |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for c in "${cases[@]}"; do
    IFS='|' read -r name stdin cmdline <<<"$c"
    if [ ${#selected[@]} -gt 0 ] && ! printf '%s\n' "${selected[@]}" | grep -qx "$name"; then continue; fi
    read -r -a cmd <<<"$cmdline"
    d=$work/$name && mkdir -p "$d"
    exe=${cmd[0]}
    pie=$(file -L "$exe" | grep -q 'pie executable' && echo yes || echo no)
    if [ -n "${SPECS:-}" ]; then
        read -r -a specs <<<"$SPECS"
    else
        specs=(-p 'libc:*')
        "$tracer" list "$exe" 2>/dev/null | grep -q . && specs+=(-p 'main:*')
    fi
    export PYTHONHASHSEED=0
    (cd "$d" && timeout "$timeout_s" "${cmd[@]}" <"$stdin" >plain.out 2>plain.err)
    prc=$?
    (cd "$d" && timeout "$timeout_s" "$tracer" run -x "${specs[@]}" --json -o "$d/probes.json" -- "${cmd[@]}" <"$stdin" >traced.out 2>traced.all)
    trc=$?
    grep -v '^tracer: ' "$d/traced.all" >"$d/traced.err"
    grep '^tracer: ' "$d/traced.all" >"$d/tracer.lines"
    problems=()
    [ "$prc" = "$trc" ] || problems+=("status differs")
    cmp -s "$d/plain.out" "$d/traced.out" || problems+=("stdout differs ($(wc -c <"$d/plain.out") vs $(wc -c <"$d/traced.out") bytes)")
    cmp -s "$d/plain.err" "$d/traced.err" || problems+=("stderr differs: $(diff "$d/plain.err" "$d/traced.err" | grep '^>' | head -1 | cut -c1-100)")
    [ -s "$d/probes.json" ] || problems+=("no report: $(grep -v 'not probing\|not probed\|note:' "$d/tracer.lines" | head -1 | cut -c1-120)")
    if [ ${#problems[@]} -eq 0 ]; then result=identical; else result="**BROKEN**: $(IFS=';'; echo "${problems[*]}")"; failed=1; fi
    # Probe records only (with --trace or --hist, other lines are calls and timings).
    live=$(grep -c '"type":"\(probe\|latency\)"' "$d/probes.json" 2>/dev/null)
    live=${live:-0}
    alone=""
    if [ ${#problems[@]} -gt 0 ] && [ -z "${SPECS:-}" ]; then
        # Which part breaks it: each module's probes alone, with and without returns.
        for m in "${specs[@]}"; do
            [ "$m" = -p ] && continue
            for x in -x ""; do
                alone+="\`${x:+$x }$m\`: $(verdict "$d" "$stdin" "$prc" $x -p "$m" -- "${cmd[@]}"); "
            done
        done
    fi
    list_verdicts "$exe" main >"$d/list.main"
    printf '| %s | %s | `%s` | %s | %s / %s | %s | %s | %s (%s) | %s | %s | %s |\n' \
        "$name" "$pie" "-x ${specs[*]}" "$result" "$(describe_status $prc)" "$(describe_status $trc)" \
        "$live" "$(sum_field "$d/probes.json" hits)" "$(sum_field "$d/probes.json" exits)" \
        "$(sum_field "$d/probes.json" lost_exits)" "$(refusals "$d/probes.json" | reason_class)" \
        "$(list_agreement "$d/probes.json" "$work/list.libc" "$d/list.main")" "${alone:-}"
done
[ -n "${KEEP:-}" ] && echo "outputs kept in $work" >&2
exit $failed

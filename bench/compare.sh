#!/usr/bin/env bash
# Side by side, in one run: the per-call cost, count exactness and attach time of tracer
# and of the usual alternatives (LD_PRELOAD wrapper, kernel uprobes, bpftrace, Frida,
# ltrace, uftrace) on one C target built here from source. Method: bench/compare.md.
# Usage: bash bench/compare.sh [--rounds N] [--only NAME]   (as root; about 2 minutes)
# Installs what is missing (bpftrace, ltrace, uftrace from Debian; frida from PyPI) and
# mounts tracefs when absent; a tool that cannot be had gets a row saying why.
set -uo pipefail
cd "$(dirname "$0")/.."
here=bench/compare

cargo build --release -q -p tracer || { echo "compare.sh: cargo build failed" >&2; exit 1; }
work=$(mktemp -d /tmp/tracer-compare.XXXXXX)
trap 'rm -rf "$work"' EXIT

# The target: lib_fn in a shared library, exe_fn in the PIE executable, same 11 bytes.
cc -O2 -fPIC -shared -o "$work/libtiny.so" "$here/libtiny.c" &&
    cc -O2 -fPIE -pie -o "$work/target" "$here/target.c" -L"$work" -ltiny -Wl,-rpath,'$ORIGIN' -lpthread &&
    cc -O2 -fPIC -shared -o "$work/wrap.so" "$here/wrap.c" -ldl &&
    cc -O2 -fPIC -shared -DATOMIC -o "$work/wrap_atomic.so" "$here/wrap.c" -ldl ||
    { echo "compare.sh: building the target failed (needs cc)" >&2; exit 1; }

skip=()
apt_updated=
need_deb() { # command, package
    command -v "$1" >/dev/null && return 0
    if [ -z "$apt_updated" ]; then
        apt-get -qq update >/dev/null 2>&1
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=120 install -y "$2" \
        >"$work/apt-$2.log" 2>&1
    command -v "$1" >/dev/null && return 0
    skip+=(--skip "$1=not installed: apt-get install $2 failed: $(tail -n 1 "$work/apt-$2.log")")
}
# The pack of the "tracer with a pack handler" row, built beside the tracer.
pack=target/compare-pack/release/libcompare_pack.so
CARGO_TARGET_DIR=target/compare-pack cargo build --release -q \
    --manifest-path "$here/pack/Cargo.toml" >"$work/pack.log" 2>&1 ||
    skip+=(--skip "pack=building bench/compare/pack failed: $(tail -n 1 "$work/pack.log")")

need_deb bpftrace bpftrace
need_deb ltrace ltrace
need_deb uftrace uftrace

if ! python3 -c 'import frida' 2>/dev/null; then
    python3 -m pip --version >/dev/null 2>&1 || need_deb pip3 python3-pip
    python3 -m pip install -q frida >"$work/pip.log" 2>&1 ||
        python3 -m pip install -q --break-system-packages frida >"$work/pip.log" 2>&1
    python3 -c 'import frida' 2>/dev/null ||
        skip+=(--skip "frida=not installed: pip install frida failed: $(tail -n 1 "$work/pip.log")")
fi

tracefs=/sys/kernel/tracing
if [ ! -e "$tracefs/uprobe_events" ]; then
    mount -t tracefs nodev "$tracefs" 2>"$work/mount.log" ||
        skip+=(--skip "tracefs=tracefs not mounted and mount failed: $(cat "$work/mount.log")")
fi

cpu() { lscpu | sed -n "s/^$1: *//p" | head -n 1; }
echo "Machine: $(cpu 'Model name') (family $(cpu 'CPU family') model $(cpu Model))," \
    "$(nproc) CPUs, hypervisor: $(cpu 'Hypervisor vendor'), kernel $(uname -r)"
echo "Command: bash bench/compare.sh $*"
echo
python3 "$here/run.py" --work "$work" --tracer target/release/tracer --pack "$pack" "${skip[@]}" "$@"

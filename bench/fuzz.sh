#!/usr/bin/env bash
# Longer fuzzing runs of the property tests CI runs briefly: the spec parser and globs
# (tracer/tests/fuzz_spec.rs), the maps parser (agent/tests/fuzz_maps.rs), and the
# relocator's analyze/relocate on arbitrary bytes (agent/tests/fuzz_relocator.rs).
# Debug build on purpose: arithmetic overflow panics there.
# Usage: bash bench/fuzz.sh [CASES]      (default 50000 cases per property)
set -euo pipefail
cd "$(dirname "$0")/.."
export FUZZ_CASES=${1:-50000}
cargo test -p agent --test fuzz_relocator --test fuzz_maps -- --nocapture
cargo test -p tracer --test fuzz_spec

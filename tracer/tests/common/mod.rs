//! Helpers shared by tracer's integration tests: what the `tests` crate offers, plus
//! running the `tracer` binary and reading its output.
#![allow(dead_code)]

pub use tests::programs::*;
pub use tests::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Builds `libtarget.so` and the PIE `target` linked to it (rpath $ORIGIN) in `dir`.
pub fn build_target(dir: &Path) -> PathBuf {
    cc(dir, "libtarget.so", LIBTARGET_C, &["-shared", "-fPIC"]);
    cc(
        dir,
        "target",
        TARGET_C,
        &["-pie", "-fPIE", "-L.", "-ltarget", "-Wl,-rpath,$ORIGIN"],
    )
}

/// Builds the pack crate at `dir` (release, offline, with `features`) into a target
/// directory shared by the pack tests, so the probes crate compiles once; returns its
/// `lib{name}.so`.
pub fn build_pack(dir: &Path, name: &str, features: &[&str]) -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("packs");
    tests::build_pack_into(dir, &target, name, features)
}

/// Builds the example pack `examples/NAME`; returns its `.so`.
pub fn example_pack(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name);
    build_pack(&dir, name, &[])
}

/// A `tracer` command. A pack crate it builds (`--pack DIR`) goes to the test target
/// directory, not into the crate's own `target/`: the source tree may be read-only.
pub fn tracer() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tracer"));
    cmd.env(
        "CARGO_TARGET_DIR",
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("packs"),
    );
    cmd
}

/// Runs `tracer args...` to completion with a closed stdin.
pub fn tracer_output(args: &[&str]) -> Output {
    tracer()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tracer")
}

/// Asserts `out` is a failure whose stderr is exactly one `tracer: ...` line containing
/// every one of `needles`; returns that line.
pub fn assert_one_line_error(out: &Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "tracer should have failed; stderr: {err}"
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    assert!(lines[0].starts_with("tracer: "), "unexpected line: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "error lacks {n:?}: {err}");
    }
    lines[0].to_string()
}

/// Parses the `--json` output: one object per line.
pub fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON {l:?}: {e}")))
        .collect()
}

/// The report object of `probe` in `reports`.
pub fn report<'a>(reports: &'a [serde_json::Value], probe: &str) -> &'a serde_json::Value {
    reports
        .iter()
        .find(|r| r["probe"] == probe)
        .unwrap_or_else(|| panic!("no report for {probe} in {reports:?}"))
}

pub fn num(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

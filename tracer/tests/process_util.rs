//! Helpers shared by the `process_*` tests: compile C sources into a temp dir, spawn them.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory under the system temp dir, unique per test process and call.
pub fn temp_dir(tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let d = std::env::temp_dir().join(format!("tracer-proc-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

/// Compiles `source` with `cc` and `flags` into `dir/name`; panics with cc's output on error.
pub fn cc(dir: &Path, name: &str, source: &str, flags: &[&str]) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).expect("write C source");
    let out = dir.join(name);
    let o = Command::new("cc")
        .arg("-O1")
        .arg("-g")
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .args(flags)
        .output()
        .expect("run cc");
    assert!(
        o.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// Spawns `program` with piped stdout; returns the child and a line reader on its stdout.
pub fn spawn(
    program: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Child, BufReader<ChildStdout>) {
    let mut c = Command::new(program);
    c.args(args).stdout(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().expect("spawn test program");
    let out = BufReader::new(child.stdout.take().expect("piped"));
    (child, out)
}

/// Next stdout line of a test program, without the newline.
pub fn line(r: &mut BufReader<ChildStdout>) -> String {
    let mut s = String::new();
    r.read_line(&mut s).expect("read line");
    s.trim_end().to_string()
}

/// Parses a `0x...` address printed with `%p`.
pub fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).expect("hex address")
}

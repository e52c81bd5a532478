//! Helpers shared by the `e2e_*` tests: build the programs of `tests/programs/` with `cc`
//! into a temp dir, run the `tracer` binary, look at a live target from outside.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const LIBTARGET_C: &str = include_str!("../../tests/programs/libtarget.c");
pub const TARGET_C: &str = include_str!("../../tests/programs/target.c");
pub const SPIN_C: &str = include_str!("../../tests/programs/spin.c");
pub const TINY_C: &str = include_str!("../../tests/programs/tiny.c");

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory under the system temp dir, unique per test process and call.
pub fn temp_dir(tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let d = std::env::temp_dir().join(format!("tracer-e2e-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

/// Compiles `source` with `cc -O1` and `flags` into `dir/name`; panics with cc's output.
pub fn cc(dir: &Path, name: &str, source: &str, flags: &[&str]) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).expect("write C source");
    let out = dir.join(name);
    let o = Command::new("cc")
        .current_dir(dir)
        .arg("-O1")
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .args(flags)
        .output()
        .expect("run cc");
    assert!(
        o.status.success(),
        "cc {name} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

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

/// A `tracer` command.
pub fn tracer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tracer"))
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

/// Parses a `0x...` address.
pub fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).expect("hex address")
}

/// A test program with piped stdin/stdout, killed on drop if still running.
pub struct Target {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub stdout: BufReader<ChildStdout>,
}

impl Target {
    pub fn spawn(program: &Path, args: &[&str]) -> Target {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn test program");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        Target {
            child,
            stdin,
            stdout,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Next stdout line, without the newline.
    pub fn line(&mut self) -> String {
        let mut s = String::new();
        self.stdout.read_line(&mut s).expect("read line");
        s.trim_end().to_string()
    }

    /// Tells the program to finish (a line on stdin) and returns its last line and
    /// whether it exited with 0.
    pub fn finish(&mut self) -> (String, bool) {
        if let Some(mut i) = self.stdin.take() {
            let _ = i.write_all(b"stop\n");
        }
        let l = self.line();
        let st = self.child.wait().expect("wait");
        (l, st.success())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `len` bytes at `addr` in `pid`, read through /proc/PID/mem.
pub fn read_mem(pid: i32, addr: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem");
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, addr).expect("read /proc/PID/mem");
    buf
}

/// The TracerPid line of /proc/PID/status.
pub fn tracer_pid(pid: i32) -> i32 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    s.lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .expect("TracerPid line")
        .trim()
        .parse()
        .expect("TracerPid value")
}

/// Polls `f` every 5 ms until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

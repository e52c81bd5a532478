//! Support for the end-to-end tests: temporary directories, compiling the target programs
//! of `tests/programs/` (and inline sources) with the system compilers, and looking at a
//! live process from outside.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::ops::Deref;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Target programs, compiled by the tests that use them.
pub mod programs {
    pub const LIBTARGET_C: &str = include_str!("../programs/libtarget.c");
    pub const TARGET_C: &str = include_str!("../programs/target.c");
    pub const SPIN_C: &str = include_str!("../programs/spin.c");
    pub const TINY_C: &str = include_str!("../programs/tiny.c");
    pub const EXCEPTIONS_CC: &str = include_str!("../programs/exceptions.cc");
    pub const COLD_C: &str = include_str!("../programs/cold.c");
    pub const THROWING_CC: &str = include_str!("../programs/throwing.cc");
    pub const UNWIND_C: &str = include_str!("../programs/unwind.c");
}

/// A fresh directory, removed when dropped, except when the test is failing (its
/// programs and outputs are then kept for a look, and the path is printed).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<OsStr> for TempDir {
    fn as_ref(&self) -> &OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test files kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory under the system temp dir, unique per test process and call.
pub fn temp_dir(tag: &str) -> TempDir {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let d = std::env::temp_dir().join(format!("tracer-test-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    TempDir(d)
}

fn compile(
    compiler: &str,
    ext: &str,
    dir: &Path,
    name: &str,
    source: &str,
    flags: &[&str],
) -> PathBuf {
    let src = dir.join(format!("{name}.{ext}"));
    std::fs::write(&src, source).expect("write source");
    let out = dir.join(name);
    let o = Command::new(compiler)
        .current_dir(dir)
        .args(["-O1", "-g", "-o"])
        .arg(&out)
        .arg(&src)
        .args(flags)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {compiler}: {e}"));
    assert!(
        o.status.success(),
        "{compiler} {name} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// Compiles C `source` with `cc -O1 -g` and `flags` into `dir/name`; panics with the
/// compiler's output on error.
pub fn cc(dir: &Path, name: &str, source: &str, flags: &[&str]) -> PathBuf {
    compile("cc", "c", dir, name, source, flags)
}

/// Compiles C++ `source` with `c++ -O1 -g` and `flags` into `dir/name`.
pub fn cxx(dir: &Path, name: &str, source: &str, flags: &[&str]) -> PathBuf {
    compile("c++", "cc", dir, name, source, flags)
}

/// Asserts the process that produced `out` exited with status 0; on failure shows its
/// stderr.
pub fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The proptest configuration of the fuzz tests: `default` cases, or `FUZZ_CASES=N` for a
/// longer run (`bash bench/fuzz.sh` sets it); no failure files written into the tree.
pub fn fuzz_cases(default: u32) -> proptest::test_runner::Config {
    let n = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    proptest::test_runner::Config {
        cases: n,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    }
}

/// Parses a `0x...` address printed with `%p`.
pub fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).expect("hex address")
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

/// A test program with piped stdin and stdout, killed on drop if still running.
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

/// Builds the pack crate at `dir` (release, offline, with `features`) into the target
/// directory `target`, as a user builds a pack: without the outer build's `RUSTFLAGS`;
/// returns its `lib{name}.so`.
pub fn build_pack_into(dir: &Path, target: &Path, name: &str, features: &[&str]) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--offline", "--quiet"]);
    for f in features {
        cmd.args(["--features", f]);
    }
    let out = cmd
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target)
        .env_remove("RUSTFLAGS")
        .output()
        .expect("cargo");
    assert!(
        out.status.success(),
        "cargo build of {}:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    target.join("release").join(format!("lib{name}.so"))
}

/// Each probe descriptor of the pack library at `so`: its shim's symbol and its
/// `probe_flags`, as the tracer reads them before loading a pack (for tests and benches
/// that load packs themselves).
pub fn pack_probe_flags(so: &Path) -> Vec<(String, u64)> {
    use object::{Object, ObjectSection};
    use probes::pack::abi::{desc_kind, DESCRIPTOR_SIZE, NAME_LEN, PROBE_SYMBOL_PREFIX, SECTION};
    let data = std::fs::read(so).expect("read the pack");
    let file = object::File::parse(&*data).expect("an ELF file");
    let section = file.section_by_name(SECTION).expect("a probe pack");
    let bytes = section.data().expect("descriptor bytes");
    let u32_at = |d: &[u8], o: usize| u32::from_le_bytes(d[o..o + 4].try_into().unwrap());
    bytes
        .chunks_exact(DESCRIPTOR_SIZE)
        .filter(|d| u32_at(d, 8) == desc_kind::PROBE)
        .map(|d| {
            let flags = u64::from_le_bytes(d[16..24].try_into().unwrap());
            let name = &d[48..48 + NAME_LEN];
            let end = name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
            let name = String::from_utf8_lossy(&name[..end]);
            (format!("{PROBE_SYMBOL_PREFIX}{name}"), flags)
        })
        .collect()
}

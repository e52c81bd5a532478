//! tracer out of the target's way: while probes are live the target is not ptrace-attached
//! (its signals reach it directly), SIGTERM to `tracer run` reaches the program and the
//! run is reported, and an output file that cannot be created is refused before anything
//! is launched or attached.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::time::{Duration, Instant};

const TICKER_C: &str = include_str!("programs/ticker.c");

fn build_ticker(dir: &Path) -> PathBuf {
    cc(dir, "ticker", TICKER_C, &["-pie", "-fPIE"])
}

/// Parses `ready PID WORKADDR`.
fn ready(line: &str) -> (i32, u64) {
    let mut w = line.split_whitespace();
    assert_eq!(w.next(), Some("ready"), "{line:?}");
    let pid = w.next().unwrap().parse().unwrap();
    (pid, hex(w.next().unwrap()))
}

/// Parses `alarms=A calls=C ...` into (A, C).
fn done(line: &str) -> (u64, u64) {
    let field = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {line:?}"))
            .parse()
            .unwrap()
    };
    (field("alarms="), field("calls="))
}

/// Whether `bytes` (read at a function's address) start with our `jmp rel32`, after an
/// `endbr64` if the compiler put one there.
fn patched(bytes: &[u8]) -> bool {
    bytes[0] == 0xe9 || (bytes[..4] == [0xf3, 0x0f, 0x1e, 0xfa] && bytes[4] == 0xe9)
}

fn read_line(r: &mut impl BufRead) -> String {
    let mut s = String::new();
    r.read_line(&mut s).expect("read line");
    s.trim_end().to_string()
}

/// Sends tracer's stderr to a file: a pipe would stay open, and reading it hang, as long
/// as a program tracer left behind holds it.
fn stderr_file(dir: &Path) -> (Stdio, PathBuf) {
    let path = dir.join("stderr.txt");
    (std::fs::File::create(&path).unwrap().into(), path)
}

/// Waits for `child` at most `timeout` (kills it and fails when it is still running);
/// returns its status and the stderr written to `stderr`.
fn wait_with_timeout(
    mut child: Child,
    stderr: &Path,
    timeout: Duration,
) -> (std::process::ExitStatus, String) {
    let end = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return (st, std::fs::read_to_string(stderr).unwrap());
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "tracer still running after {timeout:?}; stderr: {}",
                std::fs::read_to_string(stderr).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn json_file(path: &Path) -> Vec<serde_json::Value> {
    json_lines(&std::fs::read_to_string(path).unwrap_or_default())
}

/// `tracer run -p main:work --json -o DIR/out.json -- TICKER ARGS...` with piped stdin
/// and stdout; returns it, its stdin and stdout, the JSON path and the stderr file.
fn run_ticker(
    dir: &Path,
    ticker: &Path,
    args: &[&str],
) -> (Child, ChildStdin, BufReader<ChildStdout>, PathBuf, PathBuf) {
    let json = dir.join("out.json");
    let (err_to, err_path) = stderr_file(dir);
    let mut tracer = tracer()
        .args(["run", "-p", "main:work", "--json", "-o"])
        .arg(&json)
        .arg("--")
        .arg(ticker)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(err_to)
        .spawn()
        .unwrap();
    let stdin = tracer.stdin.take().unwrap();
    let stdout = BufReader::new(tracer.stdout.take().unwrap());
    (tracer, stdin, stdout, json, err_path)
}

/// `tracer attach PID -p main:work -o DIR/out.json` (with `--json` when `json`, else
/// `-o DIR/out.txt`); returns it, the output path and the stderr file.
fn attach_work(dir: &Path, pid: i32, json: bool) -> (Child, PathBuf, PathBuf) {
    let out = dir.join(if json { "out.json" } else { "out.txt" });
    let (err_to, err_path) = stderr_file(dir);
    let pid = pid.to_string();
    let mut args = vec!["attach", &pid, "-p", "main:work"];
    if json {
        args.push("--json");
    }
    let child = tracer()
        .args(args)
        .arg("-o")
        .arg(&out)
        .stdin(Stdio::null())
        .stderr(err_to)
        .spawn()
        .unwrap();
    (child, out, err_path)
}

fn sigterm(child: &Child) {
    // SAFETY: kill with the PID of our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}

/// Under `tracer run`, with the probe live, the program is not traced (TracerPid 0): a
/// 10 kHz timer's signals reach it directly, it counts every one it waits for, and the
/// probe counted exactly the calls the program made.
#[test]
fn run_leaves_the_program_untraced_with_probes_live() {
    let dir = temp_dir("runfree");
    let ticker = build_ticker(&dir);
    let (tracer, mut stdin, mut stdout, json, err_path) =
        run_ticker(&dir, &ticker, &["10000", "until", "2000", "wait"]);
    let (pid, work) = ready(&read_line(&mut stdout));
    assert!(patched(&read_mem(pid, work, 8)), "probe not live at main");
    assert_eq!(tracer_pid(pid), 0, "the program is ptrace-attached");

    writeln!(stdin, "go").unwrap();
    let (alarms, calls) = done(&read_line(&mut stdout));
    assert_eq!(alarms, 2000);
    assert!(calls > 0);
    assert_eq!(tracer_pid(pid), 0, "the program is ptrace-attached");
    writeln!(stdin, "end").unwrap();
    drop(stdin);

    let (status, err) = wait_with_timeout(tracer, &err_path, Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "stderr: {err}");
    let reports = json_file(&json);
    assert_eq!(num(report(&reports, "main:work"), "hits"), calls, "{err}");
}

/// Under `tracer attach`, the target runs untraced while the probe counts; SIGTERM to
/// tracer then attaches again, restores every byte, detaches and reports exactly the
/// calls made meanwhile; the program goes on.
#[test]
fn attach_leaves_the_target_untraced_and_sigterm_removes_the_probes() {
    let dir = temp_dir("attachfree");
    let ticker = build_ticker(&dir);
    let mut t = Target::spawn(&ticker, &["10000", "until", "2000", "wait"]);
    let (pid, work) = ready(&t.line());
    let original = read_mem(pid, work, 16);
    let (child, json, err_path) = attach_work(&dir, pid, true);
    assert!(
        wait_until(Duration::from_secs(20), || patched(&read_mem(pid, work, 8))
            && tracer_pid(pid) == 0),
        "the probe never went live with the target untraced (TracerPid {})",
        tracer_pid(pid)
    );

    t.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let (alarms, calls) = done(&t.line());
    assert_eq!(alarms, 2000);
    assert_eq!(tracer_pid(pid), 0);

    sigterm(&child);
    let (status, err) = wait_with_timeout(child, &err_path, Duration::from_secs(30));
    assert!(status.success(), "{status:?}: {err}");
    assert_eq!(num(report(&json_file(&json), "main:work"), "hits"), calls);
    assert_eq!(read_mem(pid, work, 16), original, "bytes not restored");
    assert_eq!(tracer_pid(pid), 0);
    let (_, ok) = t.finish();
    assert!(ok, "the program failed after detach");
}

/// A target that ends while `tracer attach` waits: tracer notices at once (no
/// `--duration`, no signal) and reports its counts from the shared counters.
#[test]
fn attach_reports_when_the_target_ends() {
    let dir = temp_dir("attachend");
    let ticker = build_ticker(&dir);
    let mut t = Target::spawn(&ticker, &["1000", "until", "100", "wait"]);
    let (pid, work) = ready(&t.line());
    let (child, json, err_path) = attach_work(&dir, pid, true);
    assert!(
        wait_until(Duration::from_secs(20), || patched(&read_mem(pid, work, 8))),
        "never patched"
    );
    t.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let (_, calls) = done(&t.line());
    let (_, ok) = t.finish();
    assert!(ok);
    let (status, err) = wait_with_timeout(child, &err_path, Duration::from_secs(30));
    assert!(status.success(), "{err}");
    assert!(err.contains("ended"), "{err}");
    assert_eq!(num(report(&json_file(&json), "main:work"), "hits"), calls);
}

/// SIGTERM sent to `tracer run` alone reaches the program (which dies of it, as it
/// would untraced), and tracer reports the counts and dies of the same signal: no
/// orphan is left running.
#[test]
fn sigterm_to_run_reaches_the_program_and_is_reported() {
    let dir = temp_dir("runterm");
    let ticker = build_ticker(&dir);
    let (tracer, mut stdin, mut stdout, json, err_path) =
        run_ticker(&dir, &ticker, &["1000", "until", "50", "wait"]);
    let (pid, _) = ready(&read_line(&mut stdout));
    writeln!(stdin, "go").unwrap();
    let (_, calls) = done(&read_line(&mut stdout));
    // The program now waits for a line that never comes.
    sigterm(&tracer);
    let (status, err) = wait_with_timeout(tracer, &err_path, Duration::from_secs(30));
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{err}");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the program is still running"
    );
    assert_eq!(num(report(&json_file(&json), "main:work"), "hits"), calls);
}

/// `-o` into a directory that does not exist: one clear line and a failure before the
/// program is launched (it would have created a file).
#[test]
fn unwritable_output_refused_before_launch() {
    let dir = temp_dir("badout");
    let marker = dir.join("launched");
    let out = tracer_output(&[
        "run",
        "-p",
        "libc:malloc",
        "-o",
        "/nonexistent/x",
        "--",
        "touch",
        marker.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, &["/nonexistent/x", "-o"]);
    assert!(!marker.exists(), "the program was launched");
}

/// `-o` into a directory that does not exist with `attach`: one clear line, and the
/// target untouched (never traced, no agent loaded, code unchanged).
#[test]
fn unwritable_output_refused_before_attach() {
    let dir = temp_dir("badoutattach");
    let ticker = build_ticker(&dir);
    let mut t = Target::spawn(&ticker, &["0", "bench", "1", "wait"]);
    let (pid, work) = ready(&t.line());
    let original = read_mem(pid, work, 16);
    let out = tracer_output(&[
        "attach",
        &pid.to_string(),
        "-p",
        "main:work",
        "-o",
        "/nonexistent/x",
        // Ends by itself should the output be opened only at the end.
        "--duration",
        "1",
    ]);
    assert_one_line_error(&out, &["/nonexistent/x", "-o"]);
    assert_eq!(read_mem(pid, work, 16), original);
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(!maps.contains("tracer-agent"), "agent loaded:\n{maps}");
    t.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let (_, calls) = done(&t.line());
    assert_eq!(calls, 1);
    let (_, ok) = t.finish();
    assert!(ok);
}

/// The target execs another program while `tracer attach` is away: when tracer comes
/// back to remove its probes, the code at the old sites belongs to the new program
/// (non-PIE executables load at the same address) and is left exactly as it is, and
/// tracer says why.
#[test]
fn attach_leaves_the_code_of_an_exec_d_program_alone() {
    let dir = temp_dir("attachexec");
    let first = cc(&dir, "ticker", TICKER_C, &["-no-pie", "-fno-pie"]);
    // The same source built differently: other code at the same addresses.
    let second = cc(&dir, "ticker-O0", TICKER_C, &["-no-pie", "-fno-pie", "-O0"]);
    let mut t = Target::spawn(&first, &["0", "bench", "1", "wait"]);
    let (pid, work) = ready(&t.line());
    let original = read_mem(pid, work, 8);
    let (child, _, err_path) = attach_work(&dir, pid, false);
    assert!(
        wait_until(Duration::from_secs(20), || patched(&read_mem(pid, work, 8))
            && tracer_pid(pid) == 0),
        "the probe never went live with the target untraced"
    );
    t.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    done(&t.line());
    let exec = format!("exec {}\n", second.display());
    t.stdin
        .as_mut()
        .unwrap()
        .write_all(exec.as_bytes())
        .unwrap();
    let (pid2, _) = ready(&t.line());
    assert_eq!(pid2, pid);
    let new_code = read_mem(pid, work, 8);
    assert_ne!(
        new_code[..5],
        original[..5],
        "the second program has the same bytes there: the test proves nothing"
    );

    sigterm(&child);
    let (status, err) = wait_with_timeout(child, &err_path, Duration::from_secs(30));
    assert!(status.success(), "{status:?}: {err}");
    assert_eq!(
        read_mem(pid, work, 8),
        new_code,
        "tracer wrote into the new program"
    );
    assert!(err.contains("no longer there"), "{err}");
    assert_eq!(tracer_pid(pid), 0);
    t.stdin.as_mut().unwrap().write_all(b"go\nend\n").unwrap();
    assert_eq!(done(&t.line()).1, 1);
    assert!(t.child.wait().unwrap().success());
}

/// Counts the SIGINTs it gets (and how many a process sent rather than the terminal)
/// until a SIGTERM comes, then prints them. Signals of one number merge while pending and
/// lower numbers are delivered first: a SIGINT passed on by tracer before it passed on
/// the SIGTERM is counted.
const INTS_C: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <string.h>
static volatile sig_atomic_t ints, from_process, terms;
static void on_int(int s, siginfo_t *i, void *c)
{
    (void)s; (void)c;
    ints++;
    if (i->si_code <= 0)
        from_process++;
}
static void on_term(int s) { (void)s; terms++; }
int main(void)
{
    struct sigaction a;
    memset(&a, 0, sizeof a);
    a.sa_sigaction = on_int;
    a.sa_flags = SA_SIGINFO;
    sigaction(SIGINT, &a, 0);
    signal(SIGTERM, on_term);
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGTERM);
    sigprocmask(SIG_BLOCK, &block, &old);
    printf("ready\n");
    fflush(stdout);
    while (!ints)
        sigsuspend(&old);
    printf("int\n");
    fflush(stdout);
    while (!terms)
        sigsuspend(&old);
    printf("ints=%d from_process=%d\n", (int)ints, (int)from_process);
    return 0;
}
"#;

/// Ctrl-C on the terminal of `tracer run` reaches the program once (from the terminal,
/// not again from tracer), tracer outlives it, and SIGTERM sent to tracer alone is passed
/// on; the program decides to exit 0, and tracer then reports and exits 0.
#[test]
fn ctrl_c_on_the_terminal_reaches_the_program_once() {
    use std::os::unix::process::CommandExt;
    let dir = temp_dir("ctrlc-run");
    let prog = cc(&dir, "ints", INTS_C, &[]);
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two descriptors; the other pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    let json = dir.join("out.json");
    let (err_to, err_path) = stderr_file(&dir);
    let mut cmd = tracer();
    cmd.args(["run", "-p", "libc:malloc", "--json", "-o"])
        .arg(&json)
        .arg("--")
        .arg(&prog)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err_to);
    // SAFETY: setsid and ioctl are async-signal-safe; `slave` is open in the child.
    unsafe {
        cmd.pre_exec(move || {
            // A session of its own whose controlling terminal is the pty, tracer's group
            // in its foreground: the terminal's Ctrl-C goes to tracer and the program.
            if libc::setsid() == -1 || libc::ioctl(slave, libc::TIOCSCTTY, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let mut tracer = cmd.spawn().unwrap();
    // SAFETY: our copy of the slave side is no longer needed.
    unsafe { libc::close(slave) };
    let mut stdout = BufReader::new(tracer.stdout.take().unwrap());
    assert_eq!(read_line(&mut stdout), "ready");
    // SAFETY: writes one byte (the terminal's interrupt character) to our pty master.
    assert_eq!(
        unsafe { libc::write(master, b"\x03".as_ptr().cast(), 1) },
        1
    );
    assert_eq!(read_line(&mut stdout), "int");
    sigterm(&tracer);
    assert_eq!(read_line(&mut stdout), "ints=1 from_process=0");
    let (status, err) = wait_with_timeout(tracer, &err_path, Duration::from_secs(30));
    // SAFETY: closing our own descriptor.
    unsafe { libc::close(master) };
    assert_eq!(status.code(), Some(0), "{err}");
    let reports = json_file(&json);
    assert_eq!(reports.len(), 1, "{err}");
    report(&reports, "libc:malloc");
}

/// A signal handler that calls a probed function, arriving anywhere in the main code's
/// calls of a short exit-probed function: the handler's probe pushes and pops shadow
/// entries of its own between any two instructions of the interrupted trampoline. The
/// program ends as untraced (status, checksum) and every count equals its own.
#[test]
fn signal_handlers_hitting_probes_inside_exit_probes() {
    const NEST_C: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
static volatile long handled, works;
__attribute__((noinline)) long inner(long x) { __asm__ volatile("" ::: "memory"); return x ^ 0x55; }
__attribute__((noinline)) void handler_fn(int s) { handled++; __asm__ volatile("" ::: "memory"); }
static void onsig(int s) { handler_fn(s); }
__attribute__((noinline)) long work(long x) { long a = 0; for (int i = 0; i < 200; i++) a += inner(x + i); return a; }
int main(void) {
    struct sigaction sa; memset(&sa, 0, sizeof sa);
    sa.sa_handler = onsig; sa.sa_flags = SA_RESTART; sigaction(SIGALRM, &sa, 0);
    struct itimerval it = {{0, 500}, {0, 500}}; setitimer(ITIMER_REAL, &it, 0);
    long acc = 0, want = 0;
    while (handled < 400) { acc += work(works); works++; }
    struct itimerval z = {{0, 0}, {0, 0}}; setitimer(ITIMER_REAL, &z, 0);
    for (long l = 0; l < works; l++) for (int i = 0; i < 200; i++) want += (l + i) ^ 0x55;
    printf("ok=%d works=%ld handled=%ld\n", acc == want, works, handled);
    return 5;
}
"#;
    let dir = temp_dir("signal-nest");
    let exe = cc(&dir, "nest", NEST_C, &["-O2"]);
    for mode in ["-x", "--hist"] {
        let report = dir.join(format!("report{mode}.json"));
        let out = tracer_output(&[
            "run",
            mode,
            "--json",
            "-o",
            report.to_str().unwrap(),
            "-p",
            "main:inner",
            "-p",
            "main:handler_fn",
            "--",
            exe.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(5), "{mode}: {out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let field = |k: &str| -> u64 {
            stdout
                .split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or_else(|| panic!("no {k} in {stdout:?}"))
                .parse()
                .unwrap()
        };
        assert!(stdout.starts_with("ok=1 "), "{mode}: {stdout}");
        let (works, handled) = (field("works="), field("handled="));
        let records = json_file(&report);
        let calls = |name: &str| -> (u64, u64) {
            let r = records
                .iter()
                .find(|r| r["probe"] == format!("main:{name}"))
                .unwrap_or_else(|| panic!("{mode}: no {name} in {records:?}"));
            match mode {
                "-x" => (r["hits"].as_u64().unwrap(), r["exits"].as_u64().unwrap()),
                _ => {
                    let n = r["calls"].as_u64().unwrap();
                    (n, n)
                }
            }
        };
        assert_eq!(calls("inner"), (200 * works, 200 * works), "{mode}");
        let (hits, exits) = calls("handler_fn");
        if mode == "-x" {
            assert_eq!((hits, exits), (handled, handled), "{mode}");
        } else {
            // A signal landing while the timing handler runs finds the thread busy: its
            // call is skipped (counted apart), not timed.
            assert!(
                hits == exits && hits <= handled && hits > 0,
                "{mode}: {hits}"
            );
        }
    }
}

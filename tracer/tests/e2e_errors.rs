//! tracer's failures end to end: each is one `tracer: ...` line naming the cause, a
//! non-zero exit, and a target left as it was.

mod common;
use common::*;

/// A running `tiny` program: its PID and the addresses of `tiny` and `good`.
fn start_tiny(dir: &std::path::Path) -> (Target, u64, u64) {
    let exe = cc(dir, "tiny", TINY_C, &["-pthread", "-pie", "-fPIE"]);
    let mut t = Target::spawn(&exe, &[]);
    let l = t.line();
    let f: Vec<&str> = l.split_whitespace().collect();
    assert_eq!(f.len(), 3, "unexpected first line {l:?}");
    assert_eq!(f[0].parse::<i32>().unwrap(), t.pid());
    (t, hex(f[1]), hex(f[2]))
}

/// The target's code at `addrs` is as before, nobody traces it, and it still runs to a
/// clean end.
fn assert_untouched(mut t: Target, addrs: &[(u64, Vec<u8>)]) {
    let pid = t.pid();
    for (a, bytes) in addrs {
        assert_eq!(
            &read_mem(pid, *a, bytes.len()),
            bytes,
            "code at {a:#x} changed"
        );
    }
    assert_eq!(tracer_pid(pid), 0, "target still traced");
    let (last, ok) = t.finish();
    assert!(ok && last == "ok 1", "target did not end cleanly: {last:?}");
}

/// Attaching to a PID that does not exist.
#[test]
fn no_such_pid() {
    let out = tracer_output(&["attach", "999999", "-p", "libc:malloc"]);
    assert_one_line_error(&out, &["999999"]);
}

/// A spec matching nothing: named in the error with a suggestion, the attached target
/// untouched; with `run`, the launched program never runs.
#[test]
fn spec_matches_nothing() {
    let dir = temp_dir("nomatch");
    let (t, tiny, good) = start_tiny(&dir);
    let before = vec![
        (tiny, read_mem(t.pid(), tiny, 3)),
        (good, read_mem(t.pid(), good, 8)),
    ];
    let out = tracer_output(&["attach", &t.pid().to_string(), "-p", "main:goood"]);
    assert_one_line_error(&out, &["main:goood", "main:good"]);
    assert_untouched(t, &before);

    let target = build_target(&dir);
    let out = tracer_output(&["run", "-p", "libtarget:wrk", "--", target.to_str().unwrap()]);
    assert_one_line_error(&out, &["libtarget:wrk", "libtarget:work"]);
    assert!(out.stdout.is_empty(), "the program ran anyway");
}

/// A 3-byte function is refused by the relocator with the reason; alone it fails the
/// attach and the target is untouched; next to a good probe it is reported and the good
/// probe counts.
#[test]
fn relocator_refusal() {
    let dir = temp_dir("tiny");
    let (t, tiny, good) = start_tiny(&dir);
    let pid = t.pid().to_string();
    let before = vec![
        (tiny, read_mem(t.pid(), tiny, 3)),
        (good, read_mem(t.pid(), good, 8)),
    ];
    let out = tracer_output(&["attach", &pid, "-p", "main:tiny", "--duration", "0.2"]);
    assert_one_line_error(&out, &["main:tiny", "3 bytes"]);

    let json = dir.join("out.json");
    let out = tracer_output(&[
        "attach",
        &pid,
        "-p",
        "main:tiny",
        "-p",
        "main:good",
        "--duration",
        "0.3",
        "--json",
        "-o",
        json.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.lines()
            .any(|l| l.contains("main:tiny") && l.contains("3 bytes")),
        "refusal not reported: {err}"
    );
    let reports = json_lines(&std::fs::read_to_string(&json).unwrap());
    assert_eq!(reports.len(), 2, "{reports:?}");
    let tiny = report(&reports, "main:tiny");
    assert!(
        tiny["refused"]
            .as_str()
            .is_some_and(|r| r.contains("3 bytes")),
        "{tiny}"
    );
    assert!(
        num(report(&reports, "main:good"), "hits") > 0,
        "{reports:?} {err}"
    );
    assert_untouched(t, &before);
}

/// A command that does not exist.
#[test]
fn command_not_found() {
    let out = tracer_output(&["run", "-p", "libc:malloc", "--", "/nonexistent"]);
    assert_one_line_error(&out, &["/nonexistent", "not found"]);
}

/// A statically linked program cannot load the agent: said plainly, for run and attach.
#[test]
fn statically_linked_target() {
    let dir = temp_dir("static");
    let exe = cc(&dir, "tiny-static", TINY_C, &["-static", "-pthread"]);
    let out = tracer_output(&["run", "-p", "main:good", "--", exe.to_str().unwrap()]);
    assert_one_line_error(&out, &["statically linked"]);
    assert!(out.stdout.is_empty(), "the program ran anyway");

    let mut t = Target::spawn(&exe, &[]);
    let first = t.line();
    let good = hex(first.split_whitespace().nth(2).expect("good address"));
    let before = vec![(good, read_mem(t.pid(), good, 8))];
    let out = tracer_output(&["attach", &t.pid().to_string(), "-p", "main:good"]);
    assert_one_line_error(&out, &["statically linked"]);
    assert_untouched(t, &before);
}

/// A target already traced by someone else (here the test itself, with PTRACE_SEIZE):
/// refused with the reason, and the other tracer keeps its tracee.
#[test]
fn target_already_traced() {
    let dir = temp_dir("traced");
    let (t, tiny, good) = start_tiny(&dir);
    let pid = t.pid();
    // SAFETY: seizing our own child; it keeps running and is killed by Target's drop.
    let r = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) };
    assert_eq!(r, 0, "seize: {}", std::io::Error::last_os_error());
    // TracerPid names the tracing thread, which is this test's thread.
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    assert_eq!(tracer_pid(pid), me);
    let before = [
        (tiny, read_mem(pid, tiny, 3)),
        (good, read_mem(pid, good, 8)),
    ];
    let out = tracer_output(&["attach", &pid.to_string(), "-p", "main:good"]);
    assert_one_line_error(&out, &[&pid.to_string(), "traced"]);
    assert_eq!(tracer_pid(pid), me, "the other tracer lost its tracee");
    for (a, bytes) in &before {
        assert_eq!(
            &read_mem(pid, *a, bytes.len()),
            bytes,
            "code at {a:#x} changed"
        );
    }
}

/// Attaching without the right to trace the target (tracer running as another,
/// unprivileged user): one line naming the permission problem, the target untouched.
#[test]
fn permission_denied() {
    let dir = temp_dir("perm");
    let (t, tiny, good) = start_tiny(&dir);
    let before = [
        (tiny, read_mem(t.pid(), tiny, 8)),
        (good, read_mem(t.pid(), good, 8)),
    ];
    // The tracer binary must be reachable by `nobody`: copy it next to nothing private.
    let exe = std::env::temp_dir().join(format!("tracer-perm-{}", std::process::id()));
    std::fs::copy(env!("CARGO_BIN_EXE_tracer"), &exe).unwrap();
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&exe)
        .args(["attach", &t.pid().to_string(), "-p", "main:good"])
        .output()
        .expect("setpriv runs");
    let _ = std::fs::remove_file(&exe);
    let line = assert_one_line_error(&out, &[&t.pid().to_string()]);
    assert!(
        line.contains("not allowed to trace") && line.contains("CAP_SYS_PTRACE"),
        "not a permission error: {line}"
    );
    assert_untouched(t, &before);
}

/// Two probes whose patches would overlap (an offset inside the bytes another probe
/// takes over): the first is installed, the second refused with the reason, and the
/// program runs as before.
#[test]
fn overlapping_probes_are_refused() {
    let dir = temp_dir("overlap");
    let exe = cc(&dir, "tiny", TINY_C, &["-pthread", "-pie", "-fPIE"]);
    let out = tracer()
        .args([
            "run",
            "-p",
            "main:twoinsn",
            "-p",
            "main:twoinsn+2",
            "--json",
            "--",
        ])
        .arg(&exe)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.lines().any(|l| l.contains("main:twoinsn+0x2")
            && l.contains("would overlap")
            && l.contains("main:twoinsn")),
        "{err}"
    );
    let reports: Vec<_> = json_lines(
        &err.lines()
            .filter(|l| l.starts_with('{'))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    assert_eq!(reports.len(), 2, "{err}");
    assert!(report(&reports, "main:twoinsn").get("refused").is_none());
    let second = report(&reports, "main:twoinsn+0x2");
    assert!(
        second["refused"]
            .as_str()
            .is_some_and(|r| r.contains("would overlap")),
        "{second}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().last().is_some_and(|l| l.starts_with("ok ")),
        "{stdout}"
    );
}

/// A process stopped by SIGSTOP cannot run the calls that load the agent: refused at
/// once with what to do, nothing mapped or started in it; continued, it runs on as before.
#[test]
fn a_stopped_process_is_refused_untouched() {
    let dir = temp_dir("stopped");
    let (t, tiny, good) = start_tiny(&dir);
    let pid = t.pid();
    let before = vec![
        (tiny, read_mem(pid, tiny, 3)),
        (good, read_mem(pid, good, 8)),
    ];
    let maps = |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let maps_before = maps(pid);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let stat = || std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !stat().contains(") T ") {
        assert!(std::time::Instant::now() < deadline, "never stopped");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let out = tracer_output(&["attach", &pid.to_string(), "-p", "main:good"]);
    assert_one_line_error(&out, &["stopped", &format!("kill -CONT {pid}")]);
    assert_eq!(
        maps(pid),
        maps_before,
        "the refused attach changed the mappings"
    );
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    // Let its loop run (it says "ok 1" only once it called its functions).
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_untouched(t, &before);
}

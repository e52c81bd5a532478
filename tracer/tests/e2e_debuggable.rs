//! A process tracer attached to and detached from stays debuggable: `gdb -p` completes and
//! reads the agent's symbols, and every name the loader reports for a loaded object
//! (what debuggers, profilers and in-process unwinders open) is the object's own file.

mod common;
use common::*;
use std::fs::File;
use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Waits on stdin. Each line runs `work` a few times; the line `check` also opens every
/// object `dl_iterate_phdr` names, as an unwinder or profiler in the process would, and
/// prints `elf NAME` when it is a regular ELF file or `bad NAME` otherwise, then `end`.
const DEBUGGEE_C: &str = r#"
#define _GNU_SOURCE
#include <fcntl.h>
#include <link.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

__attribute__((noipa)) unsigned long work(unsigned long x) { return x * 2654435761u ^ (x >> 7); }

static int check(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size; (void)data;
    const char *n = info->dlpi_name;
    /* The main program has no name here and the vDSO no file (no slash). */
    if (!n || !strchr(n, '/')) return 0;
    /* O_NONBLOCK: a name that resolves to a pipe must not hang this check. */
    int fd = open(n, O_RDONLY | O_NONBLOCK);
    struct stat st;
    char magic[4] = {0};
    int ok = fd >= 0 && fstat(fd, &st) == 0 && S_ISREG(st.st_mode)
        && pread(fd, magic, 4, 0) == 4 && memcmp(magic, "\177ELF", 4) == 0;
    if (fd >= 0) close(fd);
    printf("%s %s\n", ok ? "elf" : "bad", n);
    return 0;
}

int main(void) {
    char line[64];
    unsigned long r = 0;
    printf("ready\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        for (unsigned long i = 0; i < 100; i++) r ^= work(i);
        if (strncmp(line, "check", 5) == 0) {
            dl_iterate_phdr(check, 0);
            printf("end\n");
        } else {
            printf("r=%lu\n", r);
        }
        fflush(stdout);
    }
    return 0;
}
"#;

fn gdb_installed() -> bool {
    Command::new("gdb")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `gdb -p PID -batch` with `commands`; fails the test if gdb has not finished in a
/// minute (it finishes in about a second; the limit only catches a hang).
fn gdb_batch(dir: &std::path::Path, pid: i32, commands: &[&str]) -> String {
    let out_path = dir.join(format!("gdb-{pid}.out"));
    let out = File::create(&out_path).unwrap();
    let mut cmd = Command::new("gdb");
    cmd.args(["-nx", "-p", &pid.to_string(), "-batch"]);
    for c in commands {
        cmd.args(["-ex", c]);
    }
    let mut gdb = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("run gdb");
    let mut status = None;
    let finished = wait_until(Duration::from_secs(60), || {
        status = gdb.try_wait().unwrap();
        status.is_some()
    });
    if !finished {
        let wchan = std::fs::read_to_string(format!("/proc/{}/wchan", gdb.id()));
        let _ = gdb.kill();
        let _ = gdb.wait();
        panic!(
            "gdb -p {pid} did not finish in 60 s (waiting in {wchan:?}); its output so far:\n{}",
            std::fs::read_to_string(&out_path).unwrap_or_default()
        );
    }
    let text = std::fs::read_to_string(&out_path).unwrap();
    assert!(status.unwrap().success(), "gdb failed:\n{text}");
    text
}

/// Sends `check` to the debuggee and returns the `elf`/`bad` lines up to `end`.
fn loaded_object_names(t: &mut Target) -> Vec<String> {
    writeln!(t.stdin.as_mut().unwrap(), "check").unwrap();
    let mut lines = Vec::new();
    loop {
        let l = t.line();
        assert!(!l.is_empty(), "debuggee stopped early after {lines:?}");
        if l == "end" {
            return lines;
        }
        lines.push(l);
    }
}

fn attach(pid: i32) {
    let out = tracer_output(&[
        "attach",
        &pid.to_string(),
        "-p",
        "main:work",
        "--duration",
        "0.3",
    ]);
    assert!(
        out.status.success(),
        "attach failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Attaches twice (the second session reuses the agent), runs `gdb -p`, and checks that
/// gdb lists the agent under a name containing `agent_name(maps)` with its symbols read
/// and prints a backtrace through `main`, that the names the program's own loader reports
/// all open as ELF files, and that the program still works after gdb detached.
fn check_debuggable(dir: &std::path::Path, t: &mut Target, agent_name: impl Fn(&str) -> String) {
    assert_eq!(t.line(), "ready");
    let pid = t.pid();
    attach(pid);
    attach(pid);
    assert_eq!(tracer_pid(pid), 0);

    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let name = agent_name(&maps);
    let text = gdb_batch(dir, pid, &["info sharedlibrary", "bt", "detach"]);
    let agent = text
        .lines()
        .find(|l| l.contains(&name))
        .unwrap_or_else(|| panic!("gdb does not list the agent as {name}:\n{text}"));
    assert!(
        agent.contains(" Yes "),
        "gdb did not read the agent's symbols: {agent:?}\n{text}"
    );
    assert!(
        text.contains(" in main "),
        "no backtrace through main:\n{text}"
    );
    assert_eq!(tracer_pid(pid), 0, "gdb detached");

    let names = loaded_object_names(t);
    assert!(
        names.iter().any(|l| l.contains(&name)),
        "the loader does not list the agent as {name}: {names:?}"
    );
    let bad: Vec<&String> = names.iter().filter(|l| !l.starts_with("elf ")).collect();
    assert!(bad.is_empty(), "names that are not their ELF file: {bad:?}");

    // Still running normally after tracer and gdb: a plain line gets its answer.
    writeln!(t.stdin.as_mut().unwrap(), "go").unwrap();
    assert!(t.line().starts_with("r="));
    let (last, ok) = t.finish();
    assert!(ok, "debuggee failed; last line {last:?}");
}

/// The agent loaded from its file in /tmp: gdb finds it by that name.
#[test]
fn gdb_attaches_after_tracer_detached() {
    if !gdb_installed() {
        eprintln!("SKIPPED gdb_attaches_after_tracer_detached: gdb is not installed (apt-get install gdb; .ci/run installs it)");
        return;
    }
    let dir = temp_dir("gdb");
    let exe = cc(&dir, "debuggee", DEBUGGEE_C, &["-pie", "-fPIE"]);
    let mut t = Target::spawn(&exe, &[]);
    check_debuggable(&dir, &mut t, |_| "tracer-agent".into());
}

/// The target's /tmp/tracer-UID is a `noexec` mount (its own mount namespace): the agent
/// comes from a memfd, and gdb finds it as `/proc/PID/map_files/START-END` of its first
/// mapping. Nothing of the refused file stays mapped.
#[test]
fn gdb_attaches_after_tracer_detached_memfd_fallback() {
    if !gdb_installed() {
        eprintln!("SKIPPED gdb_attaches_after_tracer_detached_memfd_fallback: gdb is not installed (apt-get install gdb; .ci/run installs it)");
        return;
    }
    let dir = temp_dir("gdb-memfd");
    let exe = cc(&dir, "debuggee", DEBUGGEE_C, &["-pie", "-fPIE"]);
    let script = "d=/tmp/tracer-$(id -u) && mkdir -p $d && \
        mount -t tmpfs -o noexec,mode=755 tracer-test-noexec $d && exec \"$0\"";
    let exe = exe.to_str().unwrap();
    let mut t = Target::spawn(
        std::path::Path::new("unshare"),
        &[
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            exe,
        ],
    );
    if t.stdout.fill_buf().map_or(true, |b| b.is_empty()) {
        eprintln!("SKIPPED gdb_attaches_after_tracer_detached_memfd_fallback: cannot mount a noexec /tmp/tracer-UID in a new mount namespace (unshare --mount as root)");
        return;
    }
    let pid = t.pid();
    check_debuggable(&dir, &mut t, |maps| {
        assert!(
            !maps.contains("/tracer-agent-"),
            "refused file mapped:\n{maps}"
        );
        let first = maps
            .lines()
            .find(|l| l.ends_with("/memfd:tracer-agent (deleted)") && l.contains(" 00000000 "))
            .unwrap_or_else(|| panic!("agent not loaded from a memfd:\n{maps}"));
        let range = first.split_whitespace().next().unwrap();
        format!("/proc/{pid}/map_files/{range}")
    });
}

/// Under `tracer run`, the program's loader names the agent by a file that opens as the
/// agent's ELF image (not a descriptor number that means another file by then).
#[test]
fn run_loader_names_resolve_to_their_files() {
    let dir = temp_dir("gdb-run");
    let exe = cc(&dir, "debuggee", DEBUGGEE_C, &["-pie", "-fPIE"]);
    let mut child = tracer()
        .args(["run", "-p", "main:work", "--"])
        .arg(&exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tracer");
    child.stdin.take().unwrap().write_all(b"check\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tracer run failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.lines().any(|l| l.contains("tracer-agent")),
        "the loader does not list the agent:\n{stdout}"
    );
    let bad: Vec<&str> = stdout.lines().filter(|l| l.starts_with("bad ")).collect();
    assert!(bad.is_empty(), "names that are not their ELF file: {bad:?}");
}

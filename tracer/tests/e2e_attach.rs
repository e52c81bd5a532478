//! `tracer attach` end to end: a running multi-threaded program, attached to and detached
//! from again and again, must compute exactly what it computes untraced.

mod common;
use common::*;
use std::process::Stdio;
use std::time::Duration;

/// Attach with `--duration` probing `main:step`, return the JSON reports.
fn attach_json(pid: i32, dir: &std::path::Path, duration: &str) -> Vec<serde_json::Value> {
    attach_probe_json(pid, dir, "main:step", duration)
}

/// Attach with `--duration` probing `spec`, return the JSON reports.
fn attach_probe_json(
    pid: i32,
    dir: &std::path::Path,
    spec: &str,
    duration: &str,
) -> Vec<serde_json::Value> {
    let json = dir.join(format!("attach-{pid}.json"));
    let out = tracer_output(&[
        "attach",
        &pid.to_string(),
        "-p",
        spec,
        "--duration",
        duration,
        "--json",
        "-o",
        json.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "attach failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_lines(&std::fs::read_to_string(&json).expect("read -o file"))
}

/// Four threads call `step` in tight loops. While attached, the first bytes of `step` are
/// patched; after each of 20 attach/detach cycles they are the original bytes again,
/// TracerPid is 0 and hits were counted; at the end the program's checksum equals an
/// untraced replay with the same iteration counts.
#[test]
fn attach_detach_20_times_keeps_checksum_and_code() {
    let dir = temp_dir("spin");
    let spin = cc(&dir, "spin", SPIN_C, &["-pthread", "-pie", "-fPIE"]);
    let mut t = Target::spawn(&spin, &[]);
    let first = t.line();
    let mut parts = first.split_whitespace();
    let pid: i32 = parts.next().unwrap().parse().unwrap();
    let step = hex(parts.next().expect("step address"));
    assert_eq!(pid, t.pid());
    let original = read_mem(pid, step, 16);

    // First cycle: watch the patch appear while tracer is attached.
    let json = dir.join("first.json");
    let child = tracer()
        .args(["attach", &pid.to_string(), "-p", "main:step", "--duration"])
        .args(["1.5", "--json", "-o", json.to_str().unwrap()])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tracer");
    let mut died = false;
    let patched = wait_until(Duration::from_secs(10), || {
        if std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z"))
            .unwrap_or(true)
        {
            died = true;
            return true;
        }
        read_mem(pid, step, 16) != original
    });
    let out = child.wait_with_output().expect("wait tracer");
    if died {
        let st = t.child.wait();
        panic!(
            "DIED {st:?} tracer: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(patched, "step was never patched while attached");
    let reports = json_lines(&std::fs::read_to_string(&json).unwrap());
    let mut total_hits = num(report(&reports, "main:step"), "hits");
    assert!(total_hits > 0);
    assert_eq!(read_mem(pid, step, 16), original, "code not restored");
    assert_eq!(tracer_pid(pid), 0);

    for i in 1..20 {
        let reports = attach_json(pid, &dir, "0.5");
        let r = report(&reports, "main:step");
        let hits = num(r, "hits");
        assert!(hits > 0, "cycle {i}: no hits: {r}");
        assert_eq!(num(r, "skipped"), 0, "cycle {i}: {r}");
        total_hits += hits;
        assert_eq!(read_mem(pid, step, 16), original, "cycle {i}: not restored");
        assert_eq!(tracer_pid(pid), 0, "cycle {i}: still traced");
    }

    let (last, ok) = t.finish();
    assert!(ok, "spin failed after the attaches: {last}");
    let f: Vec<&str> = last.split_whitespace().collect();
    assert_eq!(f.len(), 7, "unexpected final line {last:?}");
    let iterations: u64 = f[1..5].iter().map(|n| n.parse::<u64>().unwrap()).sum();
    assert!(
        total_hits <= iterations,
        "{total_hits} hits for {iterations} calls"
    );

    let replay = std::process::Command::new(&spin)
        .arg("replay")
        .args(&f[1..5])
        .output()
        .expect("untraced replay");
    assert!(replay.status.success());
    assert_eq!(
        String::from_utf8_lossy(&replay.stdout).trim_end(),
        last,
        "traced checksum differs from the untraced replay"
    );
}

const CHURN_C: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
static volatile unsigned long total;
__attribute__((noipa)) unsigned long work(unsigned long x) { return x * 3 + 1; }
/* Each thread works a little outside libc, so that some thread is always at a point
   where the agent can be loaded safely, while the main thread keeps cloning. */
static void *one(void *p) {
    unsigned long x = (unsigned long)p;
    for (int k = 0; k < 20000; k++) x = work(x);
    total += x;
    return 0;
}
int main(void) {
    printf("%d\n", getpid()); fflush(stdout);
    /* Runs until killed (the test's Target does that). */
    for (unsigned long i = 0;; i++) {
        pthread_t t, t2;
        if (pthread_create(&t, 0, one, (void *)i)) return 2;
        if (pthread_create(&t2, 0, one, (void *)i)) return 2;
        pthread_join(t, 0);
        pthread_join(t2, 0);
    }
}
"#;

/// A program that creates a thread every few microseconds: attaching, injecting and
/// patching catch threads halfway through `clone`, which must never corrupt them. Ten
/// attach cycles, each counting hits; the program survives them all.
#[test]
fn attach_while_threads_are_created_and_exit() {
    let dir = temp_dir("churn");
    let exe = cc(&dir, "churn", CHURN_C, &["-pthread", "-pie", "-fPIE"]);
    let mut t = Target::spawn(&exe, &[]);
    let pid: i32 = t.line().parse().unwrap();
    for cycle in 0..10 {
        let reports = attach_probe_json(pid, &dir, "main:work", "0.1");
        assert!(
            num(report(&reports, "main:work"), "hits") > 0,
            "cycle {cycle}: {reports:?}"
        );
        assert_eq!(tracer_pid(pid), 0, "cycle {cycle}");
    }
    assert!(
        t.child.try_wait().unwrap().is_none(),
        "the program died: {:?}",
        t.child.try_wait()
    );
}

/// `tracer attach` without `--duration` runs until Ctrl-C (SIGINT): then it restores the
/// code, detaches, prints the counts and exits 0; the program goes on untraced.
#[test]
fn ctrl_c_detaches_and_reports() {
    let dir = temp_dir("ctrlc");
    let spin = cc(&dir, "spin", SPIN_C, &["-pthread", "-pie", "-fPIE"]);
    let mut t = Target::spawn(&spin, &[]);
    let first = t.line();
    let mut parts = first.split_whitespace();
    let pid: i32 = parts.next().unwrap().parse().unwrap();
    let step = hex(parts.next().unwrap());
    let original = read_mem(pid, step, 16);
    let child = tracer()
        .args(["attach", &pid.to_string(), "-p", "main:step", "--json"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || read_mem(pid, step, 16)
            != original),
        "never patched"
    );
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: kill with the PID of our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let reports = json_lines(
        &err.lines()
            .filter(|l| l.starts_with('{'))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    assert!(num(report(&reports, "main:step"), "hits") > 0, "{err}");
    assert_eq!(read_mem(pid, step, 16), original);
    assert_eq!(tracer_pid(pid), 0);
    let (last, ok) = t.finish();
    assert!(ok && last.starts_with("n "), "{last}");
}

/// What `--timings` says `name` counted (0 when it counted nothing).
fn timings_count(stderr: &str, name: &str) -> u64 {
    stderr
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(name))
        .and_then(|v| v.trim_start_matches(':').trim().parse().ok())
        .unwrap_or(0)
}

/// A later attach uses what the first one left in the target (the agent and its init's
/// description, and the park page's scratch area for its remote calls and libc's
/// functions): it makes two remote function calls and no remote system call at all (it made seven: a scratch page mapped, protected and unmapped, and a
/// buffer mapped and unmapped for each agent call), reads no libc file, and the program
/// keeps exactly its own threads.
#[test]
fn a_later_attach_makes_no_remote_system_call() {
    let dir = temp_dir("later_attach");
    let spin = cc(&dir, "spin", SPIN_C, &["-pthread", "-pie", "-fPIE"]);
    let mut t = Target::spawn(&spin, &[]);
    let pid = t.pid();
    let _ = t.line();
    let threads = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .count()
    };
    // spin's main thread and the four it starts after its first line.
    let before = 5;
    assert!(wait_until(Duration::from_secs(5), || threads() == before));
    let attach = || {
        let out = tracer_output(&[
            "attach",
            &pid.to_string(),
            "-p",
            "main:step",
            "--duration",
            "0",
            "--timings",
            "-o",
            "/dev/null",
        ]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        err
    };
    let first = attach();
    // The park page only (memfd_create, ftruncate, mmap, close, mprotect): it brings the
    // scratch area, and no scratch page is mapped (and unmapped) to make it.
    assert_eq!(
        timings_count(&first, "remote system calls"),
        5,
        "the first attach maps its park page: {first}"
    );
    assert_eq!(
        timings_count(&first, "libc functions remembered in the target"),
        0,
        "{first}"
    );
    for i in 0..3 {
        let later = attach();
        assert_eq!(
            timings_count(&later, "remote system calls"),
            0,
            "attach {i} after the first: {later}"
        );
        // `pthread_create` for the agent thread, and one agent call that lists patches
        // to adopt and prepares: the agent's init is read from its memory (it made four:
        // init, adoption and prepare apart).
        assert_eq!(
            timings_count(&later, "remote function calls"),
            2,
            "attach {i} after the first: {later}"
        );
        // The first attach wrote libc's functions into its park page.
        assert_eq!(
            timings_count(&later, "libc functions remembered in the target"),
            1,
            "{later}"
        );
    }
    assert!(
        wait_until(Duration::from_secs(5), || threads() == before),
        "the program has {} threads, {before} before",
        threads()
    );
    let (last, ok) = t.finish();
    assert!(ok, "spin failed after the attaches: {last}");
}

//! Counts with many threads, end to end: 8 threads call a probed function, exit, and
//! the hits and returns the tracer reports are the calls the program counted itself,
//! read live (attach, threads gone, target running) and after the target died (run).

mod common;
use common::*;
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

/// Prints "PID STEP_ADDRESS", waits for a line on stdin, runs 8 threads that call step() (each a
/// different number of times, counting its own calls), joins them, prints
/// "calls=N result=R", waits for another line and exits.
const THREADS_C: &str = r#"
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <unistd.h>

__attribute__((noipa)) uint64_t step(uint64_t x)
{
    x ^= x >> 31;
    x *= 0x9e3779b97f4a7c15ull;
    return x ^ (x >> 29);
}

struct job { uint64_t n, calls, acc; };

static void *run(void *p)
{
    struct job *j = p;
    uint64_t acc = j->n;
    for (uint64_t i = 0; i < j->n; i++) {
        acc = step(acc + i);
        j->calls++;
    }
    j->acc = acc;
    return 0;
}

int main(void)
{
    char buf[64];
    struct job jobs[8] = {0};
    pthread_t th[8];
    printf("%d %p\n", getpid(), (void *)step);
    fflush(stdout);
    (void)!read(0, buf, sizeof buf);
    for (int k = 0; k < 8; k++) {
        jobs[k].n = 200000 + 1000 * k;
        pthread_create(&th[k], 0, run, &jobs[k]);
    }
    uint64_t calls = 0, acc = 0;
    for (int k = 0; k < 8; k++) {
        pthread_join(th[k], 0);
        calls += jobs[k].calls;
        acc = acc * 31 + jobs[k].acc;
    }
    printf("calls=%llu result=%llu\n", (unsigned long long)calls, (unsigned long long)acc);
    fflush(stdout);
    (void)!read(0, buf, sizeof buf);
    return 0;
}
"#;

fn calls(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("calls="))
        .unwrap_or_else(|| panic!("no calls= in {line:?}"))
        .parse()
        .expect("number")
}

/// `tracer run -x`: the report, made after the program exited, has hits and exits equal
/// to its own count of calls made by 8 threads. `env`: extra environment for the run.
fn run_with_threads(tag: &str, env: &[(&str, &str)]) {
    let dir = temp_dir(tag);
    let exe = cc(&dir, "threads", THREADS_C, &["-O2", "-pthread"]);
    let json = dir.join("out.json");
    let mut child = tracer()
        .args(["run", "-x", "-p", "main:step", "--json", "-o"])
        .arg(&json)
        .arg("--")
        .arg(&exe)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tracer run");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"go\nstop\n")
        .unwrap();
    let out = child.wait_with_output().expect("wait tracer");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tracer run failed: {err}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("calls="))
        .expect("calls line");
    let want = calls(line);
    let reports = json_lines(&std::fs::read_to_string(&json).expect("read -o file"));
    let r = report(&reports, "main:step");
    assert_eq!(num(r, "hits"), want, "{r}; stderr: {err}");
    assert_eq!(num(r, "exits"), want, "{r}");
    assert_eq!(num(r, "skipped"), 0, "{r}");
}

#[test]
fn run_counts_eight_threads_exactly_after_the_target_died() {
    run_with_threads("threads-run", &[]);
}

/// Without glibc's rseq registration the counters are not sharded; still exact.
#[test]
fn run_counts_eight_threads_exactly_without_rseq() {
    run_with_threads(
        "threads-norseq",
        &[("GLIBC_TUNABLES", "glibc.pthread.rseq=0")],
    );
}

/// `tracer attach -x`, stopped with SIGINT once the program's 8 threads made their calls
/// and exited: the report, read while the program still runs, matches its own count.
#[test]
fn attach_counts_eight_threads_exactly_after_they_exited() {
    let dir = temp_dir("threads-attach");
    let exe = cc(&dir, "threads", THREADS_C, &["-O2", "-pthread"]);
    let mut t = Target::spawn(&exe, &[]);
    let first = t.line();
    let mut parts = first.split_whitespace();
    let pid: i32 = parts.next().unwrap().parse().expect("pid");
    let step = hex(parts.next().expect("step address"));
    let json = dir.join("out.json");
    let child = tracer()
        .args([
            "attach",
            &pid.to_string(),
            "-x",
            "-p",
            "main:step",
            "--json",
            "-o",
        ])
        .arg(&json)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tracer attach");
    // Patched: the first byte of step is a jmp.
    assert!(
        wait_until(Duration::from_secs(20), || read_mem(pid, step, 1)[0]
            == 0xe9),
        "step never patched"
    );
    t.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let line = t.line();
    let want = calls(&line);
    // SAFETY: kill with a pid of our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().expect("wait tracer");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tracer attach failed: {err}");
    let reports = json_lines(&std::fs::read_to_string(&json).expect("read -o file"));
    let r = report(&reports, "main:step");
    assert_eq!(num(r, "hits"), want, "{r}; stderr: {err}");
    assert_eq!(num(r, "exits"), want, "{r}");
    let (_, ok) = t.finish();
    assert!(ok, "the program failed after the session");
}

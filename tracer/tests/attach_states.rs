//! `tracer attach` works whatever the target's threads are doing: all blocked in futex
//! (`pthread_join`, `pthread_cond_wait`), in `sigtimedwait`, in `read`, all spinning in their
//! own code, all spinning inside libc (`malloc`/`free`, `strlen`), and a mixture. Each state
//! is attached 10 times (a fresh program each time); while attached the program calls the
//! probed function a number of times it counts itself, and the probe's hits must equal it.
mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

const STATES_C: &str = include_str!("../../tests/programs/states.c");
/// Calls of `work` per SIGUSR2 (CALLS in states.c).
const CALLS: u64 = 1000;
const ROUNDS: usize = 10;

fn threads_of(pid: i32) -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("read task dir")
        .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
        .collect();
    v.sort();
    v
}

fn state(pid: i32, tid: i32) -> char {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap_or_default();
    s.rsplit(')')
        .next()
        .and_then(|r| r.trim_start().chars().next())
        .unwrap_or('?')
}

/// `tracer attach PID -p main:work` until the probes are live; the child with its stderr.
fn start_attach(pid: i32, json: &Path) -> (Child, BufReader<std::process::ChildStderr>) {
    let mut child = tracer()
        .args([
            "attach",
            &pid.to_string(),
            "-p",
            "main:work",
            "--json",
            "-o",
        ])
        .arg(json)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tracer");
    let mut err = BufReader::new(child.stderr.take().expect("piped"));
    let mut l = String::new();
    err.read_line(&mut l).expect("read tracer stderr");
    assert!(
        l.contains("probe(s) live"),
        "attach failed: {l}{}",
        std::io::read_to_string(&mut err).unwrap_or_default()
    );
    (child, err)
}

/// Ctrl-C the tracer (it detaches) and return the hits of `main:work`.
fn stop_attach(
    mut child: Child,
    mut err: BufReader<std::process::ChildStderr>,
    json: &Path,
) -> u64 {
    // SAFETY: kill with the pid of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let rest = std::io::read_to_string(&mut err).unwrap_or_default();
    let st = child.wait().expect("wait tracer");
    assert!(st.success(), "tracer failed at detach: {rest}");
    let reports = json_lines(&std::fs::read_to_string(json).expect("read -o file"));
    report(&reports, "main:work")["hits"]
        .as_u64()
        .expect("hits")
}

fn usr2(pid: i32) {
    // SAFETY: kill with the pid of our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR2) }, 0);
}

/// The program's "done N" line after a SIGUSR2.
fn done(t: &mut Target) -> u64 {
    let l = t.line();
    l.strip_prefix("done ")
        .unwrap_or_else(|| panic!("unexpected output {l:?}"))
        .parse()
        .expect("count")
}

/// Waits until `pid` has exactly `n` threads (the agent's thread ends once let go).
fn assert_threads(pid: i32, n: usize, what: &str) {
    let ok = wait_until(Duration::from_secs(10), || threads_of(pid).len() == n);
    assert!(
        ok,
        "{what}: {} threads, expected {n}",
        threads_of(pid).len()
    );
}

/// One round: a fresh program in `mode`; once every thread is in its state, attach, make
/// the program call `work` CALLS times, detach; hits equal its count. Afterwards the
/// program still answers, with exactly its own threads (the agent's has ended), and no
/// tracer attached.
fn round(exe: &Path, dir: &Path, mode: &str, blocked: bool, r: usize) {
    let mut t = Target::spawn(exe, &[mode]);
    let ready = t.line();
    let n: usize = ready
        .strip_prefix("ready ")
        .expect("ready line")
        .parse()
        .unwrap();
    let pid = t.pid();
    let before = threads_of(pid);
    assert_eq!(before.len(), n);
    if blocked {
        let all_asleep = wait_until(Duration::from_secs(10), || {
            before.iter().all(|&tid| state(pid, tid) == 'S')
        });
        assert!(all_asleep, "{mode}: threads never all blocked");
    }
    let json = dir.join(format!("{mode}-{r}.json"));
    let (child, err) = start_attach(pid, &json);
    usr2(pid);
    let counted = done(&mut t);
    let hits = stop_attach(child, err, &json);
    assert_eq!(counted, CALLS, "{mode} round {r}: the program's own count");
    assert_eq!(hits, counted, "{mode} round {r}: hits while attached");
    assert_eq!(tracer_pid(pid), 0, "{mode}: detached");
    assert_threads(pid, n, mode);
    assert_eq!(threads_of(pid), before, "{mode}: the program's own threads");
    // Unprobed again, and healthy.
    usr2(pid);
    assert_eq!(done(&mut t), 2 * CALLS, "{mode}: runs on after detach");
}

fn check_state(mode: &str, blocked: bool) {
    let dir = temp_dir(mode);
    let exe = cc(&dir, "states", STATES_C, &["-pthread"]);
    for r in 0..ROUNDS {
        round(&exe, &dir, mode, blocked, r);
    }
}

#[test]
fn attach_when_every_thread_waits_in_join_or_condvar() {
    check_state("join", true);
}

#[test]
fn attach_when_every_thread_waits_in_sigtimedwait() {
    check_state("sigwait", true);
}

#[test]
fn attach_when_every_thread_waits_in_read() {
    check_state("read", true);
}

#[test]
fn attach_when_every_thread_spins_in_its_own_code() {
    check_state("spin", false);
}

#[test]
fn attach_when_every_thread_spins_in_malloc_and_free() {
    check_state("malloc", false);
}

#[test]
fn attach_when_every_thread_spins_in_strlen() {
    check_state("strlen", false);
}

/// Each strlen call takes about a million instructions: a thread stopped at random is
/// almost always inside libc, and single steps would take minutes to leave.
#[test]
fn attach_when_every_thread_is_inside_one_long_strlen() {
    check_state("longstr", false);
}

/// Every thread is (almost always) inside a dl_iterate_phdr callback, holding the loader
/// lock dlopen needs: the other threads must run while the agent loads.
#[test]
fn attach_when_every_thread_holds_the_loader_lock_in_dl_iterate_phdr() {
    check_state("dliter", false);
}

#[test]
fn attach_when_threads_do_all_of_these_at_once() {
    check_state("mixed", false);
}

/// Attach after attach: each starts an agent thread of its own, which ends at detach.
#[test]
fn attach_after_attach_leaves_only_the_programs_threads() {
    let dir = temp_dir("reattach");
    let exe = cc(&dir, "states", STATES_C, &["-pthread"]);
    let mut t = Target::spawn(&exe, &["join"]);
    let n: usize = t.line().strip_prefix("ready ").unwrap().parse().unwrap();
    let pid = t.pid();
    let mut total = 0;
    for r in 0..3 {
        let json = dir.join(format!("re-{r}.json"));
        let (child, err) = start_attach(pid, &json);
        usr2(pid);
        total += CALLS;
        assert_eq!(done(&mut t), total);
        assert_eq!(stop_attach(child, err, &json), CALLS);
        assert_threads(pid, n, "after detach");
    }
}

/// A child forked after the agent was loaded has the agent and the park page: attaching to
/// it works the same.
#[test]
fn attach_to_a_forked_child_of_an_attached_program() {
    let dir = temp_dir("fork");
    let exe = cc(&dir, "states", STATES_C, &["-pthread"]);
    let mut t = Target::spawn(&exe, &["join"]);
    let n: usize = t.line().strip_prefix("ready ").unwrap().parse().unwrap();
    let pid = t.pid();
    let json = dir.join("parent.json");
    let (child, err) = start_attach(pid, &json);
    usr2(pid);
    assert_eq!(done(&mut t), CALLS);
    assert_eq!(stop_attach(child, err, &json), CALLS);
    assert_threads(pid, n, "parent after detach");

    // SAFETY: kill with the pid of our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let l = t.line();
    let kid: i32 = l
        .strip_prefix("forked ")
        .expect("forked line")
        .parse()
        .unwrap();
    struct Kill(i32);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: kill with the pid the program printed for its own child.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
    let _kill = Kill(kid);
    assert_eq!(threads_of(kid).len(), 1);
    let json = dir.join("child.json");
    let (child, err) = start_attach(kid, &json);
    usr2(kid);
    assert_eq!(
        done(&mut t),
        2 * CALLS,
        "the child counts on from the parent's count"
    );
    assert_eq!(stop_attach(child, err, &json), CALLS);
    assert_threads(kid, 1, "child after detach");
}

/// A program whose main thread calls pthread_exit ends when its last worker returns. After
/// an attach and detach it still does: tracer leaves no thread of its own behind.
#[test]
fn a_program_whose_main_thread_exits_first_still_ends_after_attach() {
    let dir = temp_dir("pthread-exit");
    let exe = cc(
        &dir,
        "mainexit",
        r#"
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <unistd.h>
static atomic_int main_gone, calls;
__attribute__((noinline)) void work(void) { atomic_fetch_add(&calls, 1); }
static void *worker(void *a) {
    (void)a;
    while (!atomic_load(&main_gone)) usleep(1000);
    usleep(20000);
    printf("main gone\n"); fflush(stdout);
    char c;
    while (read(0, &c, 1) == 1 && c != 'q') work();
    printf("bye\n"); fflush(stdout);
    return 0;
}
int main(void) {
    pthread_t t;
    pthread_create(&t, 0, worker, 0);
    printf("ready\n"); fflush(stdout);
    char c;
    while (read(0, &c, 1) == 1 && c != 'm') {}
    atomic_store(&main_gone, 1);
    pthread_exit(0);
}
"#,
        &["-pthread"],
    );
    let mut t = Target::spawn(&exe, &[]);
    assert_eq!(t.line(), "ready");
    let pid = t.pid();
    let json = dir.join("mainexit.json");
    let (child, err) = start_attach(pid, &json);
    stop_attach(child, err, &json);
    let mut stdin = t.stdin.take().unwrap();
    stdin.write_all(b"m").unwrap();
    stdin.flush().unwrap();
    assert_eq!(t.line(), "main gone");
    stdin.write_all(b"q").unwrap();
    stdin.flush().unwrap();
    assert_eq!(t.line(), "bye");
    let ended = wait_until(Duration::from_secs(10), || {
        t.child.try_wait().is_ok_and(|s| s.is_some())
    });
    assert!(ended, "the process did not end with its last thread");
}

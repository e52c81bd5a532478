//! Attach/stop/resume/detach on a real 4-thread program; signals sent while stopped.
mod common;

use common::{cc, line, spawn, temp_dir};
use tracer::threads::{attach, list_tasks, thread_state};

const WORKERS: &str = r#"
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t got_usr1, got_usr2;
static void on_usr1(int s) { (void)s; got_usr1 = 1; }
static void on_usr2(int s) { (void)s; got_usr2 = 1; }
static uint64_t sums[4];
static pthread_barrier_t barrier;

static void *work(void *arg) {
    uint64_t id = (uint64_t)(uintptr_t)arg, x = id + 1;
    pthread_barrier_wait(&barrier);
    for (uint64_t k = 0; k < 3000000; k++) {
        x = x * 6364136223846793005ULL + k + id;
        /* Sleeps mix syscalls (to be interrupted and restarted) into the work. */
        if (k % 3000 == 0) { struct timespec ts = {0, 1000000}; nanosleep(&ts, 0); }
    }
    sums[id] = x;
    return 0;
}

int main(void) {
    signal(SIGUSR1, on_usr1);
    signal(SIGUSR2, on_usr2);
    pthread_t t[4];
    pthread_barrier_init(&barrier, 0, 5);
    for (int i = 0; i < 4; i++) pthread_create(&t[i], 0, work, (void *)(uintptr_t)i);
    pthread_barrier_wait(&barrier);
    printf("ready\n"); fflush(stdout);
    uint64_t c = 0;
    for (int i = 0; i < 4; i++) { pthread_join(t[i], 0); c ^= sums[i] * (i + 1); }
    /* Wait a little for signals that may still be on their way. */
    for (int i = 0; i < 100 && !(got_usr1 && got_usr2); i++) usleep(10000);
    printf("checksum %llx usr1 %d usr2 %d\n", (unsigned long long)c, got_usr1, got_usr2);
    return 0;
}
"#;

#[test]
fn twenty_attach_detach_cycles_keep_the_checksum_and_signals() {
    let dir = temp_dir("attach");
    let exe = cc(&dir, "workers", WORKERS, &["-pthread"]);

    let (mut reference, mut ref_out) = spawn(&exe, &[], &[]);
    assert_eq!(line(&mut ref_out), "ready");
    let (mut child, mut out) = spawn(&exe, &[], &[]);
    assert_eq!(line(&mut out), "ready");
    let pid = child.id() as i32;

    for cycle in 0..20 {
        let mut p = attach(pid).unwrap_or_else(|e| panic!("cycle {cycle}: {e}"));
        let tids = p.threads();
        assert_eq!(
            tids,
            list_tasks(pid).unwrap(),
            "cycle {cycle}: every thread seized"
        );
        assert_eq!(tids.len(), 5, "main + 4 workers");
        for &tid in &tids {
            assert_eq!(
                thread_state(pid, tid).unwrap(),
                't',
                "cycle {cycle}: thread {tid} stopped"
            );
        }
        if cycle == 7 {
            // Signals arriving while every thread is held must be delivered afterwards.
            // SAFETY: plain kill() to our own child.
            unsafe {
                libc::kill(pid, libc::SIGUSR1);
                libc::kill(pid, libc::SIGUSR2);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        p.resume_all().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        if cycle % 2 == 0 {
            // Stop again while attached, then detach from the stopped state.
            p.stop_all().unwrap();
            for &tid in &p.threads() {
                assert_eq!(thread_state(pid, tid).unwrap(), 't');
            }
        }
        p.detach().unwrap();
        for tid in list_tasks(pid).unwrap() {
            assert_ne!(
                thread_state(pid, tid).unwrap(),
                't',
                "cycle {cycle}: {tid} still traced"
            );
        }
        assert_eq!(tracer::threads::tracer_pid(pid).unwrap(), 0);
    }

    let traced = line(&mut out);
    assert!(child.wait().unwrap().success());
    let untraced = line(&mut ref_out);
    assert!(reference.wait().unwrap().success());
    assert!(traced.starts_with("checksum "), "{traced}");
    let sum = |s: &str| s.split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(
        sum(&traced),
        sum(&untraced),
        "same computation traced and untraced"
    );
    assert!(
        traced.ends_with("usr1 1 usr2 1"),
        "signals sent while stopped were lost: {traced}"
    );
}

const STOPPED: &str = r#"
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("ready\n"); fflush(stdout); for (int i = 0; i < 3000; i++) usleep(1000); printf("done\n"); return 0; }
"#;

#[test]
fn a_sigstopped_target_stays_stopped_after_detach() {
    let dir = temp_dir("stopped");
    let exe = cc(&dir, "stopped", STOPPED, &[]);
    let (mut child, mut out) = spawn(&exe, &[], &[]);
    assert_eq!(line(&mut out), "ready");
    let pid = child.id() as i32;
    // SAFETY: plain kill() to our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    for _ in 0..100 {
        if thread_state(pid, pid).unwrap() == 'T' {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(thread_state(pid, pid).unwrap(), 'T');
    let mut p = attach(pid).unwrap();
    assert_eq!(thread_state(pid, pid).unwrap(), 't');
    // A remote syscall runs the thread; afterwards it must be group-stopped again.
    let r = tracer::remote_call::syscall(&mut p, pid, libc::SYS_getpid, &[]).unwrap();
    assert_eq!(r, pid as i64);
    p.resume_all().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    p.detach().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(
        thread_state(pid, pid).unwrap(),
        'T',
        "still stopped by SIGSTOP"
    );
    // SAFETY: plain kill() to our own child.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(line(&mut out), "done");
    assert!(child.wait().unwrap().success());
}

/// Threads are created and exit all the time, from several threads.
const CHURN: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
static void *leaf(void *a) { volatile long n = 0; for (int i = 0; i < 20000; i++) n += i; return a; }
static void *spawner(void *a) {
    long made = 0;
    for (int i = 0; i < 1500; i++) {
        pthread_t t;
        if (pthread_create(&t, 0, leaf, 0) == 0) { pthread_join(t, 0); made++; }
    }
    return (void *)made;
}
int main(void) {
    pthread_t s[3];
    for (int i = 0; i < 3; i++) pthread_create(&s[i], 0, spawner, 0);
    printf("ready\n"); fflush(stdout);
    long total = 0;
    for (int i = 0; i < 3; i++) { void *r; pthread_join(s[i], &r); total += (long)r; }
    printf("made %ld\n", total);
    return 0;
}
"#;

#[test]
fn threads_created_and_exiting_during_attach_are_all_handled() {
    let dir = temp_dir("churn");
    let exe = cc(&dir, "churn", CHURN, &["-pthread"]);
    let (mut child, mut out) = spawn(&exe, &[], &[]);
    assert_eq!(line(&mut out), "ready");
    let pid = child.id() as i32;
    let mut cycles = 0;
    while cycles < 30 {
        let Ok(mut p) = attach(pid) else {
            // It may finish before 30 cycles on a fast machine.
            break;
        };
        let known = p.threads();
        for tid in list_tasks(pid).unwrap() {
            // A thread that exited while stopped stays a zombie until reaped.
            let st = thread_state(pid, tid).unwrap_or('X');
            assert!(matches!(st, 't' | 'Z' | 'X'), "thread {tid} is {st}");
            if st == 't' {
                assert!(known.contains(&tid), "stopped thread {tid} is known");
            }
        }
        p.resume_all().unwrap();
        p.service(std::time::Duration::from_millis(3)).unwrap();
        p.detach().unwrap();
        cycles += 1;
    }
    assert!(cycles >= 5, "only {cycles} cycles");
    assert_eq!(line(&mut out), "made 4500");
    assert!(child.wait().unwrap().success());
}

const LATE_THREAD: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
static void *sleeper(void *p) { (void)p; for (;;) usleep(1000); return 0; }
int main(void) {
    printf("ready\n"); fflush(stdout);
    usleep(200000);
    pthread_t t;
    pthread_create(&t, 0, sleeper, 0);
    for (;;) pause();
}
"#;

/// A thread created while we are attached and the process runs (its clone event and its
/// first stop handled by `service`) is stopped by the next `stop_all` like any other.
#[test]
fn thread_created_while_attached_is_stopped_later() {
    let dir = temp_dir("late");
    let exe = cc(&dir, "late", LATE_THREAD, &["-pthread"]);
    /// Kills the program however the test ends, so it never outlives it.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let (child, mut out) = spawn(&exe, &[], &[]);
    let child = KillOnDrop(child);
    assert_eq!(line(&mut out), "ready");
    let pid = child.0.id() as i32;
    let mut p = attach(pid).unwrap();
    p.resume_all().unwrap();
    // The program creates its thread 200 ms after "ready": let the clone event and the
    // new thread's own first stop be handled, and the thread resumed, by `service`.
    p.service(std::time::Duration::from_millis(600)).unwrap();
    assert_eq!(p.threads().len(), 2);
    p.stop_all()
        .expect("every thread stops, the late one included");
    for tid in list_tasks(pid).unwrap() {
        assert_eq!(thread_state(pid, tid).unwrap(), 't', "thread {tid}");
    }
    p.detach().unwrap();
    drop(child);
}

//! Remote calls and syscalls in real threads: results, full state restored, restarts.
mod common;

use std::time::{Duration, Instant};

use common::{cc, hex, line, spawn, temp_dir};
use nix::sys::ptrace::{self, regset::NT_PRFPREG};
use nix::unistd::Pid;
use tracer::remote_call::{self, RemoteCallError};
use tracer::threads::attach;

const TARGET: &str = r#"
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <errno.h>

/* Uses vector registers (memset, doubles) so a missing xstate restore would show. */
__attribute__((noinline)) long mix6(long a, long b, long c, long d, long e, long f) {
    volatile char buf[512];
    memset((char *)buf, (int)a, sizeof buf);
    double x = a * 1.5 + b * 2.25;
    return a + 10 * b + 100 * c + 1000 * d + 10000 * e + 100000 * f + (long)x + buf[17];
}

__attribute__((noinline)) long stack_align(void) {
    /* rsp at entry + 8 must be a multiple of 16: check via a local's address. */
    long probe;
    __asm__ volatile("mov %%rsp, %0" : "=r"(probe));
    return probe;
}

__attribute__((noinline)) void spin(void) { for (;;) __asm__ volatile(""); }

int main(void) {
    printf("%p %p %p\n", (void *)mix6, (void *)spin, (void *)stack_align);
    fflush(stdout);
    struct timespec t0, t1, d = {2, 0};
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int rc = clock_nanosleep(CLOCK_MONOTONIC, 0, &d, 0);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    long ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
    printf("rc %d slept %ld\n", rc, ms);
    return 0;
}
"#;

#[test]
fn remote_calls_restore_everything_and_the_sleep_resumes() {
    let dir = temp_dir("remote");
    let exe = cc(&dir, "target", TARGET, &[]);
    let (mut child, mut out) = spawn(&exe, &[], &[]);
    let addrs: Vec<u64> = line(&mut out).split_whitespace().map(hex).collect();
    let (mix6, spin) = (addrs[0], addrs[1]);
    let pid = child.id() as i32;
    std::thread::sleep(Duration::from_millis(200)); // now inside clock_nanosleep

    let mut p = attach(pid).unwrap();
    let before = p.regs(pid).unwrap();
    assert_eq!(
        before.orig_rax as i64,
        libc::SYS_clock_nanosleep,
        "stopped in the sleep"
    );
    let fp_before = ptrace::getregset::<NT_PRFPREG>(Pid::from_raw(pid)).unwrap();

    let args = [7u64, 3, 5, 2, 9, 4];
    let r = remote_call::call(&mut p, pid, mix6, &args, Duration::from_secs(5)).unwrap();
    let expect = 7 + 30 + 500 + 2000 + 90000 + 400000 + (7.0f64 * 1.5 + 3.0 * 2.25) as i64 + 7;
    assert_eq!(r as i64, expect);

    let after = p.regs(pid).unwrap();
    let fp_after = ptrace::getregset::<NT_PRFPREG>(Pid::from_raw(pid)).unwrap();
    assert_eq!(
        format!("{before:?}"),
        format!("{after:?}"),
        "general registers restored"
    );
    assert_eq!(
        fp_before.xmm_space, fp_after.xmm_space,
        "xmm registers restored"
    );
    assert_eq!(fp_before.mxcsr, fp_after.mxcsr);

    // stack_align is a leaf without a frame: it returns rsp as it was at its entry.
    let sp = remote_call::call(&mut p, pid, addrs[2], &[], Duration::from_secs(5)).unwrap();
    assert!(sp < before.rsp - 128, "call frame below the red zone");
    assert_eq!((sp + 8) % 16, 0, "System V alignment at callee entry");

    // A function that never returns: time-out, clear error, state restored.
    let t = Instant::now();
    let e = remote_call::call(&mut p, pid, spin, &[], Duration::from_millis(300)).unwrap_err();
    assert!(matches!(e, RemoteCallError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("did not return"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3));
    let after = p.regs(pid).unwrap();
    assert_eq!(
        format!("{before:?}"),
        format!("{after:?}"),
        "registers restored after time-out"
    );

    // Remote syscalls.
    let r = remote_call::syscall(&mut p, pid, libc::SYS_getpid, &[]).unwrap();
    assert_eq!(r, pid as i64);
    let r = remote_call::syscall(&mut p, pid, libc::SYS_close, &[9999]).unwrap();
    assert_eq!(r, -(libc::EBADF as i64));

    p.resume_all().unwrap();
    p.detach().unwrap();
    let res = line(&mut out);
    assert!(child.wait().unwrap().success());
    let parts: Vec<&str> = res.split_whitespace().collect();
    assert_eq!(
        parts[1], "0",
        "clock_nanosleep returned 0, not EINTR: {res}"
    );
    let ms: u64 = parts[3].parse().unwrap();
    assert!(
        (2000..4000).contains(&ms),
        "slept the full 2 s once restarted: {res}"
    );
}

#[test]
fn too_many_arguments_is_an_error() {
    let dir = temp_dir("args");
    let exe = cc(&dir, "target", TARGET, &[]);
    let (mut child, mut out) = spawn(&exe, &[], &[]);
    let addrs: Vec<u64> = line(&mut out).split_whitespace().map(hex).collect();
    let pid = child.id() as i32;
    let mut p = attach(pid).unwrap();
    let e = remote_call::call(&mut p, pid, addrs[0], &[0; 7], Duration::from_secs(1)).unwrap_err();
    assert!(matches!(e, RemoteCallError::TooManyArgs(7)));
    p.detach().unwrap();
    assert!(line(&mut out).starts_with("rc 0"));
    assert!(child.wait().unwrap().success());
}

const SPINNER: &str = r#"
#include <stdio.h>
__attribute__((noinline)) void busy(void) { volatile long n = 0; for (;;) n++; }
int main(void) { printf("%p\n", (void *)busy); fflush(stdout); busy(); }
"#;

#[test]
fn single_step_leaves_an_instruction_but_not_a_loop() {
    let dir = temp_dir("step");
    let exe = cc(&dir, "spinner", SPINNER, &[]);
    let (mut child, mut out) = spawn(&exe, &[], &[]);
    let busy = hex(&line(&mut out));
    let pid = child.id() as i32;
    std::thread::sleep(Duration::from_millis(50));
    let mut p = attach(pid).unwrap();
    let rip = p.regs(pid).unwrap().rip;
    assert!(
        (busy..busy + 64).contains(&rip),
        "spinning in busy(): {rip:#x}"
    );
    let next = p.step_out_of(pid, rip, rip + 1, 10).unwrap();
    assert_ne!(next, rip);
    assert!((busy..busy + 64).contains(&next));
    let e = p.step_out_of(pid, busy, busy + 64, 200).unwrap_err();
    assert!(e.to_string().contains("leave the address range"), "{e}");
    assert!(p.is_stopped(pid));
    p.detach().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        tracer::threads::thread_state(pid, pid).unwrap(),
        'R',
        "runs again"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

const ABORTER: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
__attribute__((noinline)) void give_up(void) { abort(); }
int main(void) {
    printf("%p\n", (void *)give_up); fflush(stdout);
    sleep(1);
    printf("alive\n");
    return 0;
}
"#;

/// A remotely called function that aborts fails the call at once, with the signal
/// named, and the target lives on as if the call had never been made.
#[test]
fn an_aborting_call_fails_fast_and_the_target_lives() {
    let dir = temp_dir("abort");
    let exe = cc(&dir, "aborter", ABORTER, &[]);
    let (mut child, mut out) = spawn(&exe, &[], &[]);
    let give_up = hex(&line(&mut out));
    let pid = child.id() as i32;
    let mut p = attach(pid).unwrap();
    let t0 = Instant::now();
    let e = remote_call::call(&mut p, pid, give_up, &[], Duration::from_secs(10)).unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t0.elapsed()
    );
    assert!(
        matches!(
            e,
            RemoteCallError::Crashed {
                signal: nix::sys::signal::Signal::SIGABRT,
                ..
            }
        ),
        "{e}"
    );
    p.detach().unwrap();
    assert_eq!(line(&mut out), "alive");
    assert!(child.wait().unwrap().success());
}

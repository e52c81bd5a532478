//! Waking up when a traced thread changes state, instead of polling with sleeps.
//!
//! `waitpid` has no timeout, and the tracer needs one on every wait (a thread that never
//! stops must not hang it). Polling `WNOHANG` with growing naps noticed a stop up to a nap
//! late: a remote call that took 50 us was seen after 150 to 600 us, and an attach makes
//! dozens of them. Every ptrace stop and every exit of a traced thread sends `SIGCHLD` to
//! the tracer, so the wait blocks `SIGCHLD` in the calling thread, checks `WNOHANG`, and
//! sleeps in `sigtimedwait` until the signal comes (a stop after the check leaves it
//! pending, so none is missed between the two). Another thread of the tracer may take the
//! signal first (it is sent to the whole process): each sleep is therefore capped at
//! [`SLICE`], after which the `WNOHANG` check runs again anyway.

use std::time::{Duration, Instant};

/// Longest sleep between two `WNOHANG` checks, for a wake-up another thread took.
pub const SLICE: Duration = Duration::from_millis(1);

/// Blocks `SIGCHLD` in the calling thread for good. Called first in `main`, before any
/// thread starts, so that every thread of the tracer inherits it: a thread that let it
/// through (a pack's event reader, say) would take the signal a wait sleeps for and drop
/// it (its default action), and that wait would only see its stop at the end of a
/// [`SLICE`]. Programs the tracer starts get an empty mask (see `launch`).
pub fn block_for_the_process() {
    std::mem::forget(ChildSignalBlock::new());
}

/// `SIGCHLD` blocked in this thread while the guard lives; the previous mask is restored
/// when it is dropped (a `SIGCHLD` still pending is then ignored, its default action).
pub struct ChildSignalBlock {
    old: libc::sigset_t,
    /// A thread's mask is restored in that thread: the guard never moves to another.
    _same_thread: std::marker::PhantomData<*const ()>,
}

fn sigchld_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise the set they are given.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        set
    }
}

impl ChildSignalBlock {
    /// Blocks `SIGCHLD` in the calling thread.
    pub fn new() -> ChildSignalBlock {
        let set = sigchld_set();
        // SAFETY: both pointers are valid sigset_t for the call.
        let old = unsafe {
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            old
        };
        ChildSignalBlock {
            old,
            _same_thread: std::marker::PhantomData,
        }
    }

    /// Sleeps until a `SIGCHLD` arrives (or is already pending), `deadline` passes or
    /// [`SLICE`] elapses, whichever is first.
    pub fn sleep(&self, deadline: Option<Instant>) {
        let now = Instant::now();
        let limit = deadline.map_or(SLICE, |d| d.saturating_duration_since(now).min(SLICE));
        if limit.is_zero() {
            return;
        }
        let set = sigchld_set();
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: limit.as_nanos() as libc::c_long,
        };
        // SAFETY: valid set and timespec; no siginfo wanted. EAGAIN (time-out) and EINTR
        // both just mean "check again".
        unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
    }
}

impl Default for ChildSignalBlock {
    fn default() -> Self {
        ChildSignalBlock::new()
    }
}

impl Drop for ChildSignalBlock {
    fn drop(&mut self) {
        // SAFETY: restores the mask `new` saved, in the same thread (the guard is !Send).
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sigchld_blocked() -> bool {
        // SAFETY: queries this thread's mask into a local set.
        unsafe {
            let mut cur: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur);
            libc::sigismember(&cur, libc::SIGCHLD) == 1
        }
    }

    /// Blocked while the guard lives, as it was before once dropped, nested or not; a
    /// child's exit wakes the sleep and stays for `waitpid` to collect.
    #[test]
    fn the_mask_is_restored_and_a_child_event_is_seen() {
        std::thread::spawn(|| {
            assert!(!sigchld_blocked());
            {
                let outer = ChildSignalBlock::new();
                assert!(sigchld_blocked());
                {
                    let _inner = ChildSignalBlock::new();
                }
                assert!(sigchld_blocked(), "the inner guard unblocked it");
                // SAFETY: fork in a test thread; the child only calls _exit.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    // SAFETY: async-signal-safe exit of the forked child.
                    unsafe { libc::_exit(7) };
                }
                let deadline = Instant::now() + Duration::from_secs(10);
                let status = loop {
                    let mut st = 0;
                    // SAFETY: waits for our own child with a local status word.
                    let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
                    if r == pid {
                        break Some(st);
                    }
                    if Instant::now() >= deadline {
                        break None;
                    }
                    outer.sleep(Some(deadline));
                };
                let st = status.expect("the child's exit was never collected");
                assert!(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 7);
            }
            assert!(!sigchld_blocked(), "the mask was not restored");
        })
        .join()
        .unwrap();
    }
}

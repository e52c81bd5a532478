//! Waiting while the target runs untraced.
//!
//! Installed probes need no ptrace: the patches are in the target's code and the counters
//! in shared memory. A ptrace-attached thread, on the other hand, stops at every signal it
//! receives until its tracer notices and resumes it, which costs a program with a 1 kHz
//! interval timer most of its time. So tracer detaches once the probes are live and waits
//! in the kernel, never polling: a pidfd becomes readable when the target has ended, a
//! signalfd when tracer itself is asked to stop. Nothing here costs the target anything.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

/// `si_code` of a signal the kernel generated itself: for SIGINT, SIGQUIT and SIGHUP,
/// a terminal's (a key or a hang-up), which reaches the whole foreground process group.
const SI_KERNEL: i32 = 0x80;

/// A signal tracer received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    pub signal: i32,
    /// Sent by the terminal to the whole foreground process group (Ctrl-C, Ctrl-\,
    /// hang-up), hence also to a program tracer launched, as opposed to sent by a process
    /// to tracer alone (`kill PID`).
    pub from_terminal: bool,
}

/// Some signals blocked in tracer and read from a signalfd instead of interrupting it.
/// Dropping it unblocks them again.
pub struct SignalFd {
    fd: OwnedFd,
    old_mask: libc::sigset_t,
}

impl SignalFd {
    /// Blocks `signals` (for this thread, which must be tracer's only one) and opens a
    /// signalfd for them. Signals that arrive before anyone looks stay queued there.
    pub fn block(signals: &[i32]) -> io::Result<SignalFd> {
        // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
        let mut mask: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut old_mask: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers to local sigsets.
        unsafe {
            libc::sigemptyset(&mut mask);
            for &s in signals {
                libc::sigaddset(&mut mask, s);
            }
        }
        // SAFETY: valid pointers to local sigsets.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &mask, &mut old_mask) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: a new signalfd for a valid mask.
        let fd = unsafe { libc::signalfd(-1, &mask, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd == -1 {
            let e = io::Error::last_os_error();
            // SAFETY: restoring the mask saved above.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut()) };
            return Err(e);
        }
        Ok(SignalFd {
            // SAFETY: signalfd returned a new descriptor that we own.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            old_mask,
        })
    }

    /// The next queued signal, if any.
    pub fn take(&self) -> io::Result<Option<Received>> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = size_of::<libc::signalfd_siginfo>();
        loop {
            // SAFETY: reads at most `size` bytes into `info`.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    (&mut info as *mut libc::signalfd_siginfo).cast(),
                    size,
                )
            };
            if n == size as isize {
                return Ok(Some(Received {
                    signal: info.ssi_signo as i32,
                    from_terminal: info.ssi_code == SI_KERNEL,
                }));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(None),
                _ => return Err(e),
            }
        }
    }
}

impl Drop for SignalFd {
    fn drop(&mut self) {
        // SAFETY: restoring the mask saved at creation.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut()) };
    }
}

/// A pidfd: readable once the process has ended (every thread), whoever its parent is.
/// Holding it also pins the PID: a recycled PID cannot be mistaken for the target.
pub struct PidFd(OwnedFd);

impl PidFd {
    pub fn open(pid: i32) -> io::Result<PidFd> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd == -1 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pidfd_open returned a new descriptor that we own.
        Ok(PidFd(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// Whether the process has ended, without waiting.
    pub fn ended(&self) -> io::Result<bool> {
        let mut fds = [libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        poll(&mut fds, 0)?;
        Ok(fds[0].revents != 0)
    }
}

/// What ended a [`wait`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Woke {
    /// The process has ended (a child of ours is left a zombie for us to reap).
    Ended,
    /// tracer received a signal.
    Signal(Received),
    /// The deadline passed.
    Deadline,
}

fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    loop {
        // SAFETY: `fds` is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Sleeps in the kernel until the process ends, a blocked signal arrives or `deadline`
/// passes. An end that coincides with a signal is reported first.
pub fn wait(pidfd: &PidFd, signals: &SignalFd, deadline: Option<Instant>) -> io::Result<Woke> {
    loop {
        let timeout_ms = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Round up: waking a little early would only loop.
                left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
            }
        };
        let mut fds = [
            libc::pollfd {
                fd: pidfd.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: signals.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        poll(&mut fds, timeout_ms)?;
        if fds[0].revents != 0 {
            return Ok(Woke::Ended);
        }
        if let Some(r) = signals.take()? {
            return Ok(Woke::Signal(r));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(Woke::Deadline);
        }
    }
}

/// `/proc/PID/comm`: the name of the program image a process runs (exec sets it to the
/// file's base name, 15 bytes at most). A zombie keeps it, which lets an exec be noticed
/// after the end, without following the process with ptrace.
pub fn comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end_matches('\n').to_string())
}

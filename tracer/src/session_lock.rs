//! One tracer session per target at a time.
//!
//! Once its probes are in, a tracer detaches and lets the target run (see `detached.rs`),
//! so nothing in the kernel says a process has live probes. A second tracer attaching
//! meanwhile would take the first one's sites over (the agent reuses a probe for the same
//! request and zeroes its counters) and remove them at its own detach, under the first
//! one's feet. The session therefore holds an exclusive `flock` on the agent's shared
//! memfd, opened through `/proc/PID/fd/N`: every tracer opens the same inode, whatever its
//! user or mount namespace; the lock lasts as long as the session's tracer process, and the
//! kernel drops it when that process dies, even of SIGKILL, so the next attach can adopt the
//! patches a killed tracer left (see `Session::install`).

use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

/// The lock of one session; released when dropped (or when the tracer dies).
#[derive(Debug)]
pub struct SessionLock {
    _file: File,
}

/// Why a session could not take the target.
#[derive(Debug)]
pub enum LockError {
    /// Another live tracer holds the target; its pid when `/proc/locks` names it.
    Busy { pid: i32, holder: Option<i32> },
    /// The agent's shared memory could not be opened or locked.
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockError::Busy { pid, holder } => {
                write!(
                    f,
                    "process {pid} already has live probes from another tracer"
                )?;
                if let Some(h) = holder {
                    write!(f, " (pid {h})")?;
                }
                write!(
                    f,
                    "; wait for it to detach or stop it (a tracer that died leaves its \
                     probes to the next attach)"
                )
            }
            LockError::Io { path, source } => write!(f, "cannot lock {path}: {source}"),
        }
    }
}

impl std::error::Error for LockError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LockError::Busy { .. } => None,
            LockError::Io { source, .. } => Some(source),
        }
    }
}

impl SessionLock {
    /// Take the target `pid` whose agent shares memory through its descriptor `shared_fd`.
    pub fn take(pid: i32, shared_fd: i32) -> Result<SessionLock, LockError> {
        let path = format!("/proc/{pid}/fd/{shared_fd}");
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        // Checked to be the agent's file: the program may have closed or reused the number.
        let file = crate::agent_fd::open(pid, shared_fd, "tracer-shared", false).map_err(io)?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(SessionLock { _file: file });
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(io(err));
        }
        let holder = file
            .metadata()
            .ok()
            .and_then(|m| std::fs::read_to_string("/proc/locks").ok().map(|t| (m, t)))
            .and_then(|(m, text)| flock_holder(&text, m.ino()));
        Err(LockError::Busy { pid, holder })
    }
}

/// Whether a session holds the lock [`SessionLock::take`] takes on `f`'s file: a shared lock
/// is refused then. One granted is dropped at once (a tracer taking its session lock in
/// that instant is told the target is busy, and can retry).
pub fn held(f: &File) -> bool {
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    if r == 0 {
        // SAFETY: as above.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
        return false;
    }
    std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
}

/// The pid holding an exclusive `flock` on inode `ino`, from `/proc/locks` text such as
/// `1: FLOCK  ADVISORY  WRITE 1234 00:01:5678 0 EOF`. Another process's lock on an inode of
/// the same number on another device would be misnamed: the pid is only shown to the user.
fn flock_holder(locks: &str, ino: u64) -> Option<i32> {
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[1] != "FLOCK" || f[3] != "WRITE" {
            return None;
        }
        let inode: u64 = f[5].rsplit(':').next()?.parse().ok()?;
        (inode == ino).then(|| f[4].parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_is_read_from_proc_locks() {
        let text = "1: POSIX  ADVISORY  WRITE 99 00:1a:5678 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 1234 00:01:5678 0 EOF\n\
                    3: FLOCK  ADVISORY  WRITE 77 00:01:42 0 EOF\n";
        assert_eq!(flock_holder(text, 5678), Some(1234));
        assert_eq!(flock_holder(text, 42), Some(77));
        assert_eq!(flock_holder(text, 1), None);
    }

    #[test]
    fn a_second_lock_on_the_same_inode_is_refused_and_released_on_drop() {
        // Named and mapped as the agent's is: a lock is taken only on that file.
        let fd =
            nix::sys::memfd::memfd_create(c"tracer-shared", nix::sys::memfd::MFdFlags::empty())
                .expect("memfd");
        let file = File::from(fd.try_clone().expect("dup"));
        file.set_len(4096).expect("size");
        // SAFETY: a shared mapping of our own memfd, only kept, never read.
        let _map = unsafe { memmap2::MmapOptions::new().len(4096).map(&file) }.expect("map");
        let me = std::process::id() as i32;
        let first = SessionLock::take(me, fd.as_raw_fd()).expect("first");
        match SessionLock::take(me, fd.as_raw_fd()) {
            Err(LockError::Busy { holder, .. }) => assert_eq!(holder, Some(me)),
            other => panic!("second lock: {other:?}"),
        }
        drop(first);
        SessionLock::take(me, fd.as_raw_fd()).expect("after release");
    }
}

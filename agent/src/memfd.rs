//! Every memfd the agent keeps open in the target is created here, away from the
//! program's descriptor numbers, and checked before it is used again.
//!
//! The program owns its fd table. A memfd left at the lowest free number (3, 4, ...)
//! shifts every number the program opens afterwards, and a program that closes fds it
//! does not know (a daemon's `closefrom(3)`, a close loop before `exec`) and opens a file
//! of its own gets our number back: a later `ftruncate` or `mmap` through it would cut or
//! overwrite the program's file. So:
//!
//! - [`create`] moves each new memfd to the lowest free number at or above [`floor`]
//!   (`F_DUPFD_CLOEXEC`) and closes the low one: the program's own numbering is that of
//!   an untraced run.
//! - It records the file's `(st_dev, st_ino)`; [`is`] checks with `fstat` that a kept
//!   number still names that file before anything sizes or maps through it, and
//!   [`close_if`] closes a number only while it does. A number the program closed, or
//!   closed and reused, is never touched again.
//! - Memfds nothing needs after mapping (the code allocator's) are closed at once.
//!
//! The check and the use are two system calls: agent code that sizes or maps through a
//! kept fd runs in the tracer's remote calls, with every other thread of the target
//! stopped, so the program cannot close and reuse the number in between.

use std::ffi::CStr;
use std::io;

/// Refusal reason when the counter region must grow and its descriptor is gone.
pub const SHARED_LOST: &str =
    "the target closed the tracer's shared-memory descriptor (the counter region cannot grow)";

/// Which file a kept descriptor names: `(st_dev, st_ino)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
}

/// The lowest descriptor number a kept memfd takes: 64 below the soft `RLIMIT_NOFILE`,
/// within `[3, 960]`.
///
/// - Below the soft limit, since `F_DUPFD` cannot reach it, with room for the handful of
///   memfds the agent keeps and for a program that counts its descriptors against the
///   limit (it still gets every number up to the limit but ours).
/// - At most 960: the kernel sizes a process's fd table to its highest open descriptor,
///   and soft limits of a million are common in containers; 960 keeps the table within
///   1024 entries, the size most programs have anyway, and below `FD_SETSIZE`.
/// - At least 3: with a tiny limit the memfd goes where it would have gone anyway.
pub fn floor() -> i32 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 3;
    }
    r.rlim_cur.saturating_sub(64).clamp(3, 960) as i32
}

/// A new memfd named `name` (`flags` as for `memfd_create`, `MFD_CLOEXEC` added) at a
/// number at or above [`floor`], and its identity. When the move fails (the table is
/// full up there) the memfd keeps its low number: still checked before every use.
pub fn create(name: &CStr, flags: libc::c_uint) -> io::Result<(i32, Identity)> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags, and returns a new fd.
    let low = unsafe { libc::memfd_create(name.as_ptr(), flags | libc::MFD_CLOEXEC) };
    if low < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: duplicating the descriptor just created.
    let high = unsafe { libc::fcntl(low, libc::F_DUPFD_CLOEXEC, floor()) };
    let fd = if high >= 0 {
        // SAFETY: closing the low number we created just above; `high` names the file.
        unsafe { libc::close(low) };
        high
    } else {
        low
    };
    match identity(fd) {
        Some(id) => Ok((fd, id)),
        None => {
            let e = io::Error::last_os_error();
            // SAFETY: our own new descriptor.
            unsafe { libc::close(fd) };
            Err(e)
        }
    }
}

/// The identity of the file `fd` names, or None when `fd` is not open.
pub fn identity(fd: i32) -> Option<Identity> {
    if fd < 0 {
        return None;
    }
    // SAFETY: stat is plain data.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat into a local.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    Some(Identity {
        dev: st.st_dev,
        ino: st.st_ino,
    })
}

/// Whether `fd` still names the file `id` (not closed, not reused by the program).
pub fn is(fd: i32, id: Identity) -> bool {
    identity(fd) == Some(id)
}

/// Close `fd` when it still names `id`; a number the program took is left alone.
pub fn close_if(fd: i32, id: Identity) {
    if is(fd, id) {
        // SAFETY: our own descriptor (checked just above).
        unsafe { libc::close(fd) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_memfds_go_high_and_are_checked() {
        let (fd, id) = create(c"memfd-test", 0).unwrap();
        assert!(fd >= floor(), "{fd} below the floor {}", floor());
        assert!(is(fd, id));
        // SAFETY: fcntl on our own fd.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        // The program closes it: the number is no longer ours, and close_if leaves it.
        // (Not reused here: other tests of this process open descriptors meanwhile.)
        // SAFETY: closing our own fd.
        unsafe { libc::close(fd) };
        assert!(!is(fd, id));
        close_if(fd, id);
    }
}

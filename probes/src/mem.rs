//! Reads of target memory that never fault, whatever the pointer.
//!
//! A handler runs inside the target at the probed call; a wild pointer dereferenced there
//! would crash the program being traced. `process_vm_readv` on our own pid makes the kernel
//! do the copy and report a bad address as `EFAULT` instead of a signal. It is issued with
//! a raw `syscall` instruction: a handler may run inside malloc or with libc's locks held,
//! so it calls no libc. The pid is cached per process (see [`pid`]), so a read is one
//! system call. What one read costs is measured by `cargo bench -p tracer --bench packs`
//! (row `read::<u64>`).

use crate::fork;
use crate::pod::Pod;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering};

const SYS_GETPID: u64 = 39;
const SYS_PROCESS_VM_READV: u64 = 310;
const PAGE: u64 = 4096;

#[repr(C)]
struct IoVec {
    base: u64,
    len: u64,
}

/// Raw syscall with up to six arguments; returns the kernel's value (negative errno).
///
/// # Safety
/// The caller passes arguments valid for syscall `nr`.
unsafe fn syscall6(nr: u64, a: [u64; 6]) -> i64 {
    let ret: i64;
    // SAFETY: the `syscall` instruction clobbers rcx and r11 only, declared below; the
    // caller vouches for the arguments.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr as i64 => ret,
            in("rdi") a[0], in("rsi") a[1], in("rdx") a[2],
            in("r10") a[3], in("r8") a[4], in("r9") a[5],
            lateout("rcx") _, lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// This process's pid with the fork generation it was read in (high half); 0 before the
/// first read.
static PID: AtomicU64 = AtomicU64::new(0);

/// This process's pid: cached, asked again after a fork (see [`fork`]). Without a fork
/// hook registered (`fork::watch`, done by the pack's init and the tracer's sessions) it
/// is asked every time: a handler may run in a child, where the parent's pid would read
/// the parent's memory.
fn pid() -> u64 {
    let Some(generation) = fork::generation() else {
        return getpid();
    };
    let cached = PID.load(Ordering::Relaxed);
    if cached != 0 && (cached >> 32) as u32 == generation {
        return cached & 0xffff_ffff;
    }
    let pid = getpid();
    PID.store((generation as u64) << 32 | pid, Ordering::Relaxed);
    pid
}

fn getpid() -> u64 {
    // SAFETY: getpid takes no argument.
    unsafe { syscall6(SYS_GETPID, [0; 6]) as u64 }
}

/// Copy `dst.len()` bytes from `addr` in this process; returns how many were copied (less
/// than asked when the range runs into unmapped memory).
pub fn read_bytes(addr: u64, dst: &mut [u8]) -> usize {
    if dst.is_empty() || addr == 0 {
        return 0;
    }
    let pid = pid();
    let local = IoVec {
        base: dst.as_mut_ptr() as u64,
        len: dst.len() as u64,
    };
    let remote = IoVec {
        base: addr,
        len: dst.len() as u64,
    };
    let iov = |v: &IoVec| v as *const IoVec as u64;
    // SAFETY: `local` describes `dst`, writable for its length; `remote` is only read by
    // the kernel, which checks it.
    let n = unsafe {
        syscall6(
            SYS_PROCESS_VM_READV,
            [pid, iov(&local), 1, iov(&remote), 1, 0],
        )
    };
    n.max(0) as usize
}

/// A `T` read from `addr`, or `None` when any of its bytes is not readable.
pub fn read<T: Pod>(addr: u64) -> Option<T> {
    let mut v = MaybeUninit::<T>::zeroed();
    // SAFETY: the buffer is `size_of::<T>()` zeroed bytes of `v`.
    let buf = unsafe {
        std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of::<T>())
    };
    if read_bytes(addr, buf) != buf.len() {
        return None;
    }
    // SAFETY: every byte was written and `Pod` makes any bytes a valid `T`.
    Some(unsafe { v.assume_init() })
}

/// A NUL-terminated string copied out of target memory into a fixed buffer.
pub struct StrBuf {
    buf: [u8; StrBuf::CAPACITY],
    len: usize,
    /// The string went on past the bound it was read with.
    pub truncated: bool,
}

impl StrBuf {
    pub const CAPACITY: usize = 256;

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The string, with invalid UTF-8 cut at the first bad byte.
    pub fn as_str(&self) -> &str {
        let b = self.as_bytes();
        match std::str::from_utf8(b) {
            Ok(s) => s,
            // `valid_up_to` bytes are valid UTF-8 by definition.
            Err(e) => std::str::from_utf8(&b[..e.valid_up_to()]).unwrap_or(""),
        }
    }
}

impl std::ops::Deref for StrBuf {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

/// The C string at `addr`, at most `max` bytes (and at most [`StrBuf::CAPACITY`]), or
/// `None` when its first byte is not readable. Reads page by page so a string ending just
/// before an unmapped page is still found; one running into unmapped memory comes back
/// cut there, with `truncated` set (as it is when longer than `max`).
pub fn read_str(addr: u64, max: usize) -> Option<StrBuf> {
    let max = max.min(StrBuf::CAPACITY);
    let mut out = StrBuf {
        buf: [0; StrBuf::CAPACITY],
        len: 0,
        truncated: false,
    };
    let mut at = addr;
    while out.len < max {
        let page_left = (PAGE - at % PAGE) as usize;
        let want = page_left.min(max - out.len);
        let got = read_bytes(at, &mut out.buf[out.len..out.len + want]);
        if got == 0 {
            // Unreadable from the first byte: no string. Past it: what was readable,
            // marked as cut.
            out.truncated = true;
            return (out.len > 0).then_some(out);
        }
        if let Some(nul) = out.buf[out.len..out.len + got].iter().position(|&b| b == 0) {
            out.len += nul;
            return Some(out);
        }
        out.len += got;
        at += got as u64;
    }
    out.truncated = true;
    Some(out)
}

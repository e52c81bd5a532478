//! Reading the code being analysed: the [`Memory`] trait, its in-process and in-buffer
//! implementations, and the readers that take a function, a window after it or a run
//! before it, keeping whatever prefix is readable.

use super::{Function, Refusal, UNKNOWN_SIZE_WINDOW};

/// Largest symbol size accepted: far above any real function, so a larger size is a
/// corrupt symbol rather than code to read.
const MAX_FUNCTION_SIZE: u64 = 64 << 20;

/// Read access to the code being analysed.
pub trait Memory {
    /// Fills `buf` with the bytes at `addr`. Returns false, without any other effect, if
    /// any of the bytes cannot be read.
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool;
}

/// Reads the current process with `process_vm_readv`, so that an unmapped or unreadable
/// address is an error instead of a crash.
#[derive(Clone, Copy, Debug, Default)]
pub struct SelfMemory;

impl Memory for SelfMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        if buf.is_empty() {
            return true;
        }
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: `local` describes `buf`, which we borrow mutably for the call. The
        // remote range is only read by the kernel, which checks it and reports EFAULT
        // instead of faulting.
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        n >= 0 && n as usize == buf.len()
    }
}

/// Code held in a buffer, as if mapped at `base` (for code read from another process,
/// or assembled in tests).
#[derive(Clone, Copy, Debug)]
pub struct SliceMemory<'a> {
    /// Address of `bytes[0]`.
    pub base: u64,
    /// The bytes.
    pub bytes: &'a [u8],
}

impl Memory for SliceMemory<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        let Some(start) = addr.checked_sub(self.base) else {
            return false;
        };
        let Ok(start) = usize::try_from(start) else {
            return false;
        };
        match start
            .checked_add(buf.len())
            .and_then(|end| self.bytes.get(start..end))
        {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
}

/// Reads the function's code: all of it when the size is known, otherwise up to
/// [`UNKNOWN_SIZE_WINDOW`] bytes, stopping at the first unreadable page.
pub(super) fn read_code(func: &Function, mem: &dyn Memory) -> Result<Vec<u8>, Refusal> {
    match func.size {
        Some(size) => {
            // A symbol size this large, or one running past the end of the address space,
            // is corrupt; refuse instead of allocating it or wrapping around.
            let len = usize::try_from(size)
                .ok()
                .filter(|&l| l as u64 <= MAX_FUNCTION_SIZE)
                .filter(|&l| func.address.checked_add(l as u64).is_some())
                .ok_or(Refusal::Unreadable {
                    address: func.address,
                    len: size,
                })?;
            let mut buf = vec![0u8; len];
            if !mem.read(func.address, &mut buf) {
                return Err(Refusal::Unreadable {
                    address: func.address,
                    len: size,
                });
            }
            Ok(buf)
        }
        None => read_window(func, func.address.saturating_add(UNKNOWN_SIZE_WINDOW), mem),
    }
}

/// Reads from `func.address` up to `end`, keeping the longest readable prefix.
pub(super) fn read_window(func: &Function, end: u64, mem: &dyn Memory) -> Result<Vec<u8>, Refusal> {
    const PAGE: u64 = 4096;
    let mut buf = Vec::new();
    let mut addr = func.address;
    while addr < end {
        let chunk_end = ((addr / PAGE) + 1).saturating_mul(PAGE).min(end);
        let mut chunk = vec![0u8; (chunk_end - addr) as usize];
        if mem.read(addr, &mut chunk) {
            buf.extend_from_slice(&chunk);
            addr = chunk_end;
            continue;
        }
        // Keep the longest readable prefix: a [`Memory`] need not fail by pages.
        let (mut lo, mut hi) = (0usize, chunk.len());
        while lo + 1 < hi {
            let mid = (lo + hi) / 2;
            if mem.read(addr, &mut chunk[..mid]) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        if lo > 0 && mem.read(addr, &mut chunk[..lo]) {
            buf.extend_from_slice(&chunk[..lo]);
        }
        break;
    }
    if buf.is_empty() {
        return Err(Refusal::Unreadable {
            address: func.address,
            len: 1,
        });
    }
    Ok(buf)
}

/// The longest readable run of at most `max` bytes ending at `end`, with its address.
pub(super) fn read_back(end: u64, max: u64, mem: &dyn Memory) -> Option<(u64, Vec<u8>)> {
    let max = max.min(end);
    let mut buf = vec![0u8; max as usize];
    if mem.read(end - max, &mut buf) {
        return Some((end - max, buf));
    }
    let (mut lo, mut hi) = (0u64, max);
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        if mem.read(end - mid, &mut buf[..mid as usize]) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    if lo == 0 || !mem.read(end - lo, &mut buf[..lo as usize]) {
        return None;
    }
    buf.truncate(lo as usize);
    Some((end - lo, buf))
}

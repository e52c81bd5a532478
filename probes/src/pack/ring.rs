//! The event ring: many producers (target threads in handlers), one consumer (the tracer,
//! from another process), in the shared region.
//!
//! A producer reserves space with a compare-and-swap on `reserve` (lock-free: a failed
//! CAS means another thread progressed), writes a BUSY header, fills the record, then
//! commits or discards it by rewriting the header, as aya's `RingBuf` entries are
//! reserved then submitted or discarded. When the consumer has not freed enough space the
//! record is dropped and counted: a producer never waits. A record never wraps: one that
//! would is preceded by a padding record up to the end of the data.
//!
//! The consumer processes records in order from `tail`, zeroes their bytes and then
//! advances `tail`, so free space always reads as zero: a header not yet written by a
//! producer that reserved it reads 0 ("not ready"), never stale data.
//!
//! Header word: low 32 bits the record's length in bytes (header included, a multiple of
//! 8), high 32 bits [`flag`]s.

use super::abi::{ring_control, Binding, RING_CONTROL};
use std::sync::atomic::{AtomicU64, Ordering::*};

pub mod flag {
    pub const BUSY: u64 = 1 << 32;
    pub const COMMITTED: u64 = 2 << 32;
    pub const DISCARDED: u64 = 4 << 32;
    pub const PAD: u64 = 8 << 32;
}
pub const HEADER: usize = 8;
/// Largest record accepted (header included).
pub const MAX_RECORD: usize = 4096;

/// A handle on a ring's control block (the data follows it).
///
/// The capacity lives in the handle, set by the agent when it attaches the ring, not
/// read from the shared control block: shared memory can be overwritten from outside,
/// and the capacity is what keeps the producer's writes inside the data.
#[repr(C)]
pub struct Ring {
    bind: Binding,
    cap: AtomicU64,
}

/// The ring `emit!` writes to, bound by the agent through the exported pointer
/// [`super::abi::RING_SYMBOL`].
pub static RING: Ring = Ring::new();

/// Exported instead of `RING` itself, which the pack then reaches directly rather than
/// through the GOT, where a same-named symbol of the target could interpose.
#[cfg(feature = "pack-exports")]
#[unsafe(export_name = "__tracer_ring")]
static RING_EXPORT: &Ring = &RING;

/// Space reserved in the ring; commit or discard it (dropping it discards).
pub struct Entry<'a> {
    header: &'a AtomicU64,
    data: *mut u8,
    len: usize,
    done: bool,
}

impl Entry<'_> {
    /// The record's bytes after the header.
    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `data` and `len` describe the reserved space, exclusively ours until
        // the header is rewritten.
        unsafe { std::slice::from_raw_parts_mut(self.data, self.len) }
    }

    pub fn commit(mut self) {
        self.finish(flag::COMMITTED);
    }

    pub fn discard(mut self) {
        self.finish(flag::DISCARDED);
    }

    fn finish(&mut self, f: u64) {
        self.done = true;
        self.header.store((self.len + HEADER) as u64 | f, Release);
    }
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.finish(flag::DISCARDED);
        }
    }
}

impl Ring {
    pub const fn new() -> Self {
        Ring {
            bind: Binding::unbound(),
            cap: AtomicU64::new(0),
        }
    }

    /// Point the ring at its control block, with `cap` bytes of data after it.
    ///
    /// # Safety
    /// `ctl` is a ring control block initialised by `abi::init_region` for `cap` (a power
    /// of two) and stays mapped while the ring can be used.
    pub unsafe fn attach(&self, ctl: *mut u8, cap: usize) {
        assert!(cap.is_power_of_two());
        self.cap.store(cap as u64, Release);
        // SAFETY: as the caller promises; the capacity is published before the pointer.
        unsafe { self.bind.bind(ctl) }
    }

    fn word(ctl: *mut u8, off: usize) -> &'static AtomicU64 {
        // SAFETY: control words are 8-aligned inside the bound control block.
        unsafe { &*(ctl.add(off) as *const AtomicU64) }
    }

    /// Reserve a record of `len` bytes (rounded up to 8), or `None` (counted as a drop)
    /// when the ring is full or unbound.
    #[inline]
    pub fn reserve(&self, len: usize) -> Option<Entry<'_>> {
        let ctl = self.bind.get()?;
        let rec = (len + HEADER + 7) & !7;
        let cap = self.cap.load(Relaxed) as usize;
        let reserve = Self::word(ctl, ring_control::RESERVE);
        let tail = Self::word(ctl, ring_control::TAIL);
        if rec > MAX_RECORD || rec > cap / 4 {
            Self::word(ctl, ring_control::DROPS).fetch_add(1, Relaxed);
            return None;
        }
        // SAFETY: the data follows the control block.
        let data = unsafe { ctl.add(RING_CONTROL) };
        let mut r = reserve.load(Relaxed);
        loop {
            let t = tail.load(Acquire);
            let off = r as usize & (cap - 1);
            let pad = if off + rec > cap { cap - off } else { 0 };
            if (r + (pad + rec) as u64).wrapping_sub(t) > cap as u64 {
                Self::word(ctl, ring_control::DROPS).fetch_add(1, Relaxed);
                return None;
            }
            match reserve.compare_exchange_weak(r, r + (pad + rec) as u64, AcqRel, Relaxed) {
                Ok(_) => {
                    if pad > 0 {
                        // SAFETY: `off` is inside the data; the padding is ours.
                        Self::word(data, off)
                            .store(pad as u64 | flag::PAD | flag::COMMITTED, Release);
                    }
                    let at = (off + pad) & (cap - 1);
                    let header = Self::word(data, at);
                    header.store((rec as u64) | flag::BUSY, Relaxed);
                    return Some(Entry {
                        header,
                        // SAFETY: the record lies inside the data (no wrap by construction).
                        data: unsafe { data.add(at + HEADER) },
                        len: rec - HEADER,
                        done: false,
                    });
                }
                Err(now) => r = now,
            }
        }
    }
}

impl Default for Ring {
    fn default() -> Self {
        Self::new()
    }
}

//! Bounds-checked access to memory shared with the target.
//!
//! The target can write anything into the region at any time, so every access is checked
//! against the mapping's length and done as an atomic (never a `&[u8]` over memory
//! another process changes). A bad offset yields `None`, never a read outside.

use std::sync::atomic::{AtomicU64, Ordering};

/// A window onto shared memory, 8-byte aligned.
#[derive(Clone, Copy)]
pub struct View<'a> {
    words: &'a [AtomicU64],
}

impl<'a> View<'a> {
    pub fn new(words: &'a [AtomicU64]) -> Self {
        View { words }
    }

    /// # Safety
    /// `ptr` is 8-aligned and `len` bytes from it stay mapped for `'a`.
    pub unsafe fn from_raw(ptr: *const u8, len: usize) -> Self {
        // SAFETY: as the caller promises; AtomicU64 has no invalid bit pattern and any
        // concurrent writer is fine for atomics.
        View {
            words: unsafe { std::slice::from_raw_parts(ptr as *const AtomicU64, len / 8) },
        }
    }

    pub fn len(&self) -> usize {
        self.words.len() * 8
    }

    /// The first `bytes` bytes (rounded down to 8), or all when shorter.
    pub fn prefix(&self, bytes: usize) -> View<'a> {
        View {
            words: &self.words[..(bytes / 8).min(self.words.len())],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    fn word(&self, off: usize) -> Option<&AtomicU64> {
        if !off.is_multiple_of(8) {
            return None;
        }
        self.words.get(off / 8)
    }

    pub fn u64(&self, off: usize) -> Option<u64> {
        Some(self.word(off)?.load(Ordering::Acquire))
    }

    pub fn u32(&self, off: usize) -> Option<u32> {
        let w = self.u64(off & !7)?;
        Some((w >> (8 * (off & 4))) as u32)
    }

    pub fn store(&self, off: usize, v: u64) -> Option<()> {
        self.word(off)?.store(v, Ordering::Release);
        Some(())
    }

    /// Copy `len` bytes from `off` (both 8-aligned, `len` rounded up).
    pub fn bytes(&self, off: usize, len: usize) -> Option<Vec<u8>> {
        let end = off.checked_add(len)?;
        if !off.is_multiple_of(8) || end.div_ceil(8) > self.words.len() {
            return None;
        }
        let mut out = Vec::with_capacity(len.div_ceil(8) * 8);
        for w in &self.words[off / 8..end.div_ceil(8)] {
            out.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        out.truncate(len);
        Some(out)
    }

    /// Copy `len` bytes from `off` into `out` (replacing its contents), reusing its
    /// allocation; false when the range is outside the view or `off` is not 8-aligned.
    pub fn bytes_into(&self, off: usize, len: usize, out: &mut Vec<u8>) -> bool {
        out.clear();
        let Some(end) = off.checked_add(len) else {
            return false;
        };
        if !off.is_multiple_of(8) || end.div_ceil(8) > self.words.len() {
            return false;
        }
        for w in &self.words[off / 8..end.div_ceil(8)] {
            out.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        out.truncate(len);
        true
    }

    /// Zero `len` bytes from `off` (both 8-aligned).
    pub fn zero(&self, off: usize, len: usize) -> Option<()> {
        let end = off.checked_add(len)?;
        if !off.is_multiple_of(8) || !len.is_multiple_of(8) || end / 8 > self.words.len() {
            return None;
        }
        for w in &self.words[off / 8..end / 8] {
            w.store(0, Ordering::Relaxed);
        }
        Some(())
    }
}

/// Zeroed, 64-byte aligned memory viewed as shared memory: the tests' and benches'
/// stand-in for the memfd when writer and reader are in one process.
pub struct OwnedRegion {
    words: Vec<AtomicU64>,
    pad: usize,
}

impl OwnedRegion {
    pub fn new(bytes: usize) -> Self {
        let words: Vec<AtomicU64> = (0..bytes / 8 + 8).map(|_| AtomicU64::new(0)).collect();
        let pad = (64 - (words.as_ptr() as usize % 64)) % 64 / 8;
        OwnedRegion { words, pad }
    }

    pub fn view(&self) -> View<'_> {
        View::new(&self.words[self.pad..self.pad + self.words.len() - 8])
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.words[self.pad..].as_ptr() as *mut u8
    }
}

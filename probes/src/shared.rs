//! Memory shared between the agent (writer) and the tracer (reader).
//!
//! The agent creates it as a memfd; the tracer maps the same file through
//! `/proc/PID/fd/N`, so counters can be read while the target runs and after it died.

use std::sync::atomic::{AtomicU32, AtomicU64};

/// What a probe instruments.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// A function entry.
    Entry = 0,
    /// A function entry and its returns.
    Exit = 1,
    /// Any instruction boundary.
    Offset = 2,
}

/// Counters of one probe, each probe on cache lines of its own so that probes hit from
/// different threads do not share lines.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct ProbeCounters {
    /// Entries (or instruction hits) that ran the handler.
    pub hits: AtomicU64,
    /// Returns that ran the exit handler.
    pub exits: AtomicU64,
    /// Hits that arrived while the same thread was inside a handler: only the original
    /// code ran.
    pub skipped: AtomicU64,
    /// Handler panics caught; the first one disables the probe.
    pub panics: AtomicU64,
    /// Returns not seen because the stack was unwound past them (`longjmp`, exceptions)
    /// or the per-thread shadow stack was full.
    pub lost_exits: AtomicU64,
    /// [`flags`] bits.
    pub flags: AtomicU32,
    /// How the trampoline reaches the agent: `agent::emitter::CallEncoding` as a number.
    pub encoding: AtomicU32,
}

/// Bits of [`ProbeCounters::flags`].
pub mod flags {
    /// Installed and live.
    pub const ENABLED: u32 = 1;
    /// Disabled after a handler panicked.
    pub const DISABLED_BY_PANIC: u32 = 2;
}

/// Magic at the start of the shared region: "TRACERv1".
pub const MAGIC: u64 = u64::from_le_bytes(*b"TRACERv1");

/// Header of the shared region; `capacity` counters follow at offset
/// [`SharedHeader::COUNTERS_OFFSET`].
#[repr(C, align(64))]
#[derive(Debug)]
pub struct SharedHeader {
    pub magic: u64,
    /// Number of counter slots; grows (the memfd is extended, counters never move).
    pub capacity: u32,
    /// Slots in use.
    pub used: AtomicU32,
}

impl SharedHeader {
    pub const COUNTERS_OFFSET: usize = 64;

    /// Bytes needed for `capacity` probes.
    pub fn region_size(capacity: usize) -> usize {
        Self::COUNTERS_OFFSET + capacity * std::mem::size_of::<ProbeCounters>()
    }
}

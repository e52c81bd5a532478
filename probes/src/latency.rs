//! The per-probe latency aggregates of the built-in `--hist` and `--summary`: one slot per
//! probe id (the probe's counter slot number) in a sealed memfd the agent creates and the
//! tracer maps, updated by the agent at each return with atomic adds, exact under threads.
//!
//! ```text
//! header (64 bytes): magic, slots, shards
//! probe i, shard j at HEADER + (i * shards + j) * SLOT_SIZE:
//!     count, total_ns, u64::MAX - min_ns, max_ns, then BUCKETS log2 buckets
//! ```
//!
//! Each probe has one [`LatencySlot`] per shard, and a return is recorded in the shard of
//! the CPU it runs on (as the hit counters are, see `agent::shared`): with 4 threads
//! really running at once on 2 cores, a single slot per probe cost 3.5 to 3.7 times the
//! single-thread cost per return, its lines bouncing between the cores. A reader sums the
//! shards. The minimum is kept inverted so that a zeroed slot (a fresh memfd, whose
//! pages are only allocated where written) is an empty one.
//!
//! Buckets are the pack histograms' (`probes::pack::abi::map_kind::HIST_LOG2`): bucket 0
//! holds 0 ns, bucket k holds `[2^(k-1), 2^k)` ns.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Exported by the agent: `extern "C" fn(slots: u64) -> *const LatencyInfo` (null on
/// failure): the region with room for probe ids below `slots`, every slot zeroed (a new
/// session). A region too small is replaced by a new one (the old one stays mapped for
/// threads still returning through it).
pub const REGION_SYMBOL: &str = "tracer_agent_latency";
/// Exported by the agent: the exit shim (`probes::pack::abi::Shim`) that records a
/// return's duration into its probe's slot; the tracer puts it in a probe's exit slot.
pub const EXIT_SHIM_SYMBOL: &str = "tracer_agent_latency_exit";

/// "TRLATv1\0".
pub const MAGIC: u64 = u64::from_le_bytes(*b"TRLATv1\0");
pub const HEADER: usize = 64;
/// As the pack log2 histograms: 0, then one per power of two.
pub const BUCKETS: usize = 65;

/// What [`REGION_SYMBOL`] returns, in the agent's memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LatencyInfo {
    pub magic: u64,
    /// The memfd, in the target's fd table.
    pub fd: i32,
    pub _pad: u32,
    pub len: u64,
    pub slots: u64,
    /// Shards per probe.
    pub shards: u64,
}

const _: () = assert!(std::mem::size_of::<LatencyInfo>() == 8 + 4 + 4 + 8 + 8 + 8);
// SAFETY: repr(C) with integer fields only and no padding (checked above): every byte
// pattern is a valid record.
unsafe impl crate::pod::Pod for LatencyInfo {}

/// One probe's aggregates.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct LatencySlot {
    pub count: AtomicU64,
    pub total_ns: AtomicU64,
    /// `u64::MAX - min_ns`: 0 until the first return.
    pub min_inverted: AtomicU64,
    pub max_ns: AtomicU64,
    pub buckets: [AtomicU64; BUCKETS],
}

pub const SLOT_SIZE: usize = std::mem::size_of::<LatencySlot>();
const _: () = assert!(SLOT_SIZE.is_multiple_of(64));

/// Byte offsets of the fields, for readers that go through bounds-checked views.
pub mod offsets {
    pub const COUNT: usize = 0;
    pub const TOTAL: usize = 8;
    /// Inverted: `u64::MAX - min`, 0 for none yet.
    pub const MIN_INVERTED: usize = 16;
    pub const MAX: usize = 24;
    pub const BUCKETS: usize = 32;
}
const _: () = assert!(std::mem::offset_of!(LatencySlot, buckets) == offsets::BUCKETS);
const _: () = assert!(std::mem::offset_of!(LatencySlot, max_ns) == offsets::MAX);

/// The log2 bucket of `ns`.
#[inline(always)]
pub fn bucket(ns: u64) -> usize {
    (64 - ns.leading_zeros()) as usize
}

/// Most shards per probe: CPUs beyond share them (a probe's slots stay within 5 KiB).
pub const MAX_SHARDS: usize = 8;

/// Bytes of a region with `slots` probes of `shards` shards.
pub fn region_size(slots: usize, shards: usize) -> usize {
    HEADER + slots * shards * SLOT_SIZE
}

/// Where probe `id`'s shard `shard` starts, from the start of the region.
pub fn slot_offset(id: usize, shard: usize, shards: usize) -> usize {
    HEADER + (id * shards + shard) * SLOT_SIZE
}

impl LatencySlot {
    /// Record one call of `ns` nanoseconds: every field an atomic of its own, so that no
    /// update is lost whatever the threads; a reader mid-update may see the count one
    /// ahead of the buckets, never a lost call.
    #[inline]
    pub fn record(&self, ns: u64) {
        self.count.fetch_add(1, Relaxed);
        self.total_ns.fetch_add(ns, Relaxed);
        // Checked first: once the extremes settle, most calls change neither, and a load
        // leaves the line shared where a locked op would take it.
        let inverted = u64::MAX - ns;
        if inverted > self.min_inverted.load(Relaxed) {
            self.min_inverted.fetch_max(inverted, Relaxed);
        }
        if ns > self.max_ns.load(Relaxed) {
            self.max_ns.fetch_max(ns, Relaxed);
        }
        self.buckets[bucket(ns)].fetch_add(1, Relaxed);
    }

    /// The smallest duration recorded, if any.
    pub fn min_ns(&self) -> Option<u64> {
        match self.min_inverted.load(Relaxed) {
            0 => None,
            inverted => Some(u64::MAX - inverted),
        }
    }

    /// Empty (a new session).
    pub fn reset(&self) {
        for a in [
            &self.count,
            &self.total_ns,
            &self.min_inverted,
            &self.max_ns,
        ] {
            a.store(0, Relaxed);
        }
        for b in &self.buckets {
            b.store(0, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_the_pack_histograms() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1), 1);
        assert_eq!(bucket(2), 2);
        assert_eq!(bucket(3), 2);
        assert_eq!(bucket(4), 3);
        assert_eq!(bucket(1023), 10);
        assert_eq!(bucket(1024), 11);
        assert_eq!(bucket(u64::MAX), 64);
    }

    #[test]
    fn record_keeps_count_total_extremes_and_buckets() {
        // SAFETY: all-zero bytes are valid atomics.
        let s: LatencySlot = unsafe { std::mem::zeroed() };
        assert_eq!(s.min_ns(), None);
        for ns in [5, 1000, 3, 70_000] {
            s.record(ns);
        }
        assert_eq!(s.count.load(Relaxed), 4);
        assert_eq!(s.total_ns.load(Relaxed), 71_008);
        assert_eq!(s.min_ns(), Some(3));
        assert_eq!(s.max_ns.load(Relaxed), 70_000);
        let sum: u64 = s.buckets.iter().map(|b| b.load(Relaxed)).sum();
        assert_eq!(sum, 4);
        assert_eq!(s.buckets[bucket(1000)].load(Relaxed), 1);
    }

    #[test]
    fn no_update_lost_under_threads() {
        // SAFETY: all-zero bytes are valid atomics.
        let s: LatencySlot = unsafe { std::mem::zeroed() };
        assert_eq!(s.min_ns(), None);
        std::thread::scope(|sc| {
            for t in 0..4u64 {
                let s = &s;
                sc.spawn(move || {
                    for i in 0..50_000u64 {
                        s.record(t * 1000 + i % 7);
                    }
                });
            }
        });
        assert_eq!(s.count.load(Relaxed), 200_000);
        let sum: u64 = s.buckets.iter().map(|b| b.load(Relaxed)).sum();
        assert_eq!(sum, 200_000);
        assert_eq!(s.min_ns(), Some(0));
        assert_eq!(s.max_ns.load(Relaxed), 3006);
    }
}

//! Draining the event ring from the tracer's side (the producer is
//! `probes::pack::ring`; the protocol is described there).
//!
//! The target may corrupt anything, so every step is bounded: one drain visits at most
//! the ring's capacity in bytes, a header is accepted only when its length fits both the
//! data and what was reserved, and on any inconsistency the consumer reports it, drops
//! what is in the ring (zeroing it so producers start clean) and goes on.

use super::view::View;
use probes::pack::abi::{ring_control, RING_CONTROL};
use probes::pack::ring::{flag, HEADER};

/// What one drain did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Drained {
    pub records: u64,
    pub discarded: u64,
    /// A record was reserved but not yet committed: the drain stopped there.
    pub pending: bool,
    pub problems: Vec<String>,
}

/// The consumer of one ring.
pub struct Consumer {
    ring: usize,
    cap: usize,
    /// The record being handed over, reused so a drain does not allocate per record.
    buf: Vec<u8>,
}

impl Consumer {
    /// A consumer of the ring at `ring_offset` with `cap` data bytes (from the layout, not
    /// from shared memory).
    pub fn new(ring_offset: usize, cap: usize) -> Self {
        Consumer {
            ring: ring_offset,
            cap,
            buf: Vec::with_capacity(probes::pack::ring::MAX_RECORD),
        }
    }

    /// Records the producers dropped because the ring was full, as they counted.
    pub fn dropped(&self, view: View) -> u64 {
        view.u64(self.ring + ring_control::DROPS).unwrap_or(0)
    }

    /// Hand every committed record's payload (after the ring header) to `f`, in order,
    /// freeing their space; stop at the first record not yet committed.
    pub fn drain(&mut self, view: View, mut f: impl FnMut(&[u8])) -> Drained {
        let mut out = Drained::default();
        let Some((mut tail, reserve)) = self.positions(view, &mut out.problems) else {
            return out;
        };
        let data = self.ring + RING_CONTROL;
        let mut budget = self.cap;
        let mut unpublished = 0usize;
        while tail != reserve && budget > 0 {
            let off = (tail as usize) & (self.cap - 1);
            let h = view.u64(data + off).unwrap_or(0);
            let len = (h & 0xffff_ffff) as usize;
            if !self.header_fits(reserve.wrapping_sub(tail), off, h, len) {
                out.problems.push(format!(
                    "event ring corrupted at {tail:#x}: records in it dropped"
                ));
                self.reset(view, reserve);
                return out;
            }
            if h == 0 || h & flag::BUSY != 0 && h & (flag::COMMITTED | flag::DISCARDED) == 0 {
                out.pending = true;
                break;
            }
            self.hand_over(view, data + off, h, len, &mut f, &mut out);
            view.zero(data + off, len);
            tail = tail.wrapping_add(len as u64);
            budget = budget.saturating_sub(len);
            // Producers read `tail` on every reserve: publishing it per record would move
            // its cache line between cores per record. Publish every eighth of the ring.
            unpublished += len;
            if unpublished >= self.cap / 8 {
                view.store(self.ring + ring_control::TAIL, tail);
                unpublished = 0;
            }
        }
        if unpublished > 0 {
            view.store(self.ring + ring_control::TAIL, tail);
        }
        out
    }

    /// The ring's tail and reserve positions, None when its control words are outside
    /// the region; a capacity other than the layout's is reported.
    fn positions(&self, view: View, problems: &mut Vec<String>) -> Option<(u64, u64)> {
        let (Some(tail), Some(reserve)) = (
            view.u64(self.ring + ring_control::TAIL),
            view.u64(self.ring + ring_control::RESERVE),
        ) else {
            problems.push("event ring outside the shared region".into());
            return None;
        };
        if view.u64(self.ring + ring_control::CAPACITY) != Some(self.cap as u64) {
            problems.push("event ring header corrupted (capacity)".into());
        }
        Some((tail, reserve))
    }

    /// Whether header `h` (record length `len`) at data offset `off`, with `ahead` bytes
    /// reserved from there, can be a record: a zero header is a reservation not yet
    /// written.
    fn header_fits(&self, ahead: u64, off: usize, h: u64, len: usize) -> bool {
        ahead <= self.cap as u64
            && (h == 0
                || (len >= HEADER
                    && len.is_multiple_of(8)
                    && off + len <= self.cap
                    && len as u64 <= ahead))
    }

    /// Hand the finished record at `at` (header `h`, `len` bytes) to `f` if committed,
    /// and count it.
    fn hand_over(
        &mut self,
        view: View,
        at: usize,
        h: u64,
        len: usize,
        f: &mut impl FnMut(&[u8]),
        out: &mut Drained,
    ) {
        if h & flag::PAD != 0 {
            // padding to the end of the data
        } else if h & flag::COMMITTED != 0 {
            if view.bytes_into(at + HEADER, len - HEADER, &mut self.buf) {
                f(&self.buf);
            } else {
                out.problems
                    .push("event record outside the shared region".into());
            }
            out.records += 1;
        } else {
            out.discarded += 1;
        }
    }

    /// Skip the record a producer reserved and never finished (its thread died in the
    /// handler): without this the ring would stay blocked behind it.
    pub fn skip_stuck(&mut self, view: View) {
        let reserve = view.u64(self.ring + ring_control::RESERVE).unwrap_or(0);
        self.reset(view, reserve);
    }

    /// Empty the ring: zero its data and move the tail to `reserve`.
    fn reset(&mut self, view: View, reserve: u64) -> u64 {
        view.zero(self.ring + RING_CONTROL, self.cap);
        view.store(self.ring + ring_control::TAIL, reserve);
        reserve
    }
}

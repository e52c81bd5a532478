//! The tracer's side of the latency aggregates: ask the agent for its region (one remote
//! call, after preparing, when probe ids are known), map it, and read each probe's
//! figures, summed over its shards (layout: `probes::latency`).

use crate::pack::region::{RegionError, SharedRegion};
use crate::pack::view::View;
use probes::latency::{offsets, region_size, slot_offset, LatencyInfo, BUCKETS, MAGIC, MAX_SHARDS};

/// One probe's latency figures, in nanoseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatencyStats {
    /// Returns timed.
    pub count: u64,
    pub total_ns: u64,
    /// 0 when nothing returned yet.
    pub min_ns: u64,
    pub max_ns: u64,
    /// Log2 buckets: 0 ns, then `[2^(k-1), 2^k)` ns for bucket k.
    pub buckets: Vec<u64>,
}

impl LatencyStats {
    pub fn mean_ns(&self) -> u64 {
        self.total_ns.checked_div(self.count).unwrap_or(0)
    }
}

/// Why the agent's latency region cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum LatencyError {
    #[error("the agent's latency region has a wrong magic")]
    Magic,
    #[error("the agent's latency region says {slots} probes of {shards} shards")]
    Shape { slots: usize, shards: usize },
    #[error("latency region: {0}")]
    Region(#[source] RegionError),
    #[error("the agent's latency region does not match its description")]
    Header,
}

/// The agent's latency region, mapped here.
pub struct LatencyRegion {
    region: SharedRegion,
    slots: usize,
    shards: usize,
}

impl LatencyRegion {
    /// Map the region the agent described in `info` (in process `pid`), checking it is
    /// sealed and as long as its header says.
    pub fn open(pid: i32, info: &LatencyInfo) -> Result<LatencyRegion, LatencyError> {
        if info.magic != MAGIC {
            return Err(LatencyError::Magic);
        }
        let (slots, shards) = (info.slots as usize, info.shards as usize);
        if !shards.is_power_of_two() || shards > MAX_SHARDS || slots > 1 << 20 {
            return Err(LatencyError::Shape { slots, shards });
        }
        let region =
            SharedRegion::open_agent(pid, info.fd, "tracer-latency", region_size(slots, shards))
                .map_err(LatencyError::Region)?;
        let r = LatencyRegion {
            region,
            slots,
            shards,
        };
        let v = r.view();
        let header = [v.u64(0), v.u64(8), v.u64(16)];
        if header != [Some(MAGIC), Some(info.slots), Some(info.shards)] {
            return Err(LatencyError::Header);
        }
        Ok(r)
    }

    fn view(&self) -> View<'_> {
        self.region.view()
    }

    /// The figures of probe `id`, summed over its shards; None for an id the region has
    /// no slot for.
    pub fn read(&self, id: u32) -> Option<LatencyStats> {
        let id = id as usize;
        if id >= self.slots {
            return None;
        }
        let v = self.view();
        let mut s = LatencyStats {
            count: 0,
            total_ns: 0,
            min_ns: 0,
            max_ns: 0,
            buckets: vec![0; BUCKETS],
        };
        let mut min_inverted = 0;
        for shard in 0..self.shards {
            let at = slot_offset(id, shard, self.shards);
            s.count = s.count.wrapping_add(v.u64(at + offsets::COUNT)?);
            s.total_ns = s.total_ns.wrapping_add(v.u64(at + offsets::TOTAL)?);
            min_inverted = min_inverted.max(v.u64(at + offsets::MIN_INVERTED)?);
            s.max_ns = s.max_ns.max(v.u64(at + offsets::MAX)?);
            for (b, sum) in s.buckets.iter_mut().enumerate() {
                *sum = sum.wrapping_add(v.u64(at + offsets::BUCKETS + 8 * b)?);
            }
        }
        if min_inverted != 0 {
            s.min_ns = u64::MAX - min_inverted;
        }
        Some(s)
    }
}

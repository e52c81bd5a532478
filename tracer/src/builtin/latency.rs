//! The tracer's side of the latency aggregates: ask the agent for its region (one remote
//! call, after preparing, when probe ids are known), map it, and read each probe's
//! figures (layout: `probes::latency`).

use crate::pack::region::SharedRegion;
use crate::pack::view::View;
use probes::latency::{offsets, LatencyInfo, BUCKETS, HEADER, MAGIC, SLOT_SIZE};
use std::path::Path;

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

/// The agent's latency region, mapped here.
pub struct LatencyRegion {
    region: SharedRegion,
    slots: usize,
}

impl LatencyRegion {
    /// Map the region the agent described in `info` (in process `pid`), checking it is
    /// sealed and as long as its header says.
    pub fn open(pid: i32, info: &LatencyInfo) -> Result<LatencyRegion, String> {
        if info.magic != MAGIC {
            return Err("the agent's latency region has a wrong magic".into());
        }
        let slots = info.slots as usize;
        let needed = HEADER + slots * SLOT_SIZE;
        let path = format!("/proc/{pid}/fd/{}", info.fd);
        let region = SharedRegion::open(Path::new(&path), needed)
            .map_err(|e| format!("latency region: {e}"))?;
        let r = LatencyRegion { region, slots };
        if r.view().u64(0) != Some(MAGIC) || r.view().u64(8) != Some(info.slots) {
            return Err("the agent's latency region does not match its description".into());
        }
        Ok(r)
    }

    fn view(&self) -> View<'_> {
        self.region.view()
    }

    /// The figures of probe `id`; None for an id the region has no slot for.
    pub fn read(&self, id: u32) -> Option<LatencyStats> {
        let id = id as usize;
        if id >= self.slots {
            return None;
        }
        let v = self.view();
        let at = HEADER + id * SLOT_SIZE;
        let buckets = (0..BUCKETS)
            .map(|b| v.u64(at + offsets::BUCKETS + 8 * b))
            .collect::<Option<Vec<u64>>>()?;
        let count = v.u64(at + offsets::COUNT)?;
        let min = v.u64(at + offsets::MIN)?;
        Some(LatencyStats {
            count,
            total_ns: v.u64(at + offsets::TOTAL)?,
            min_ns: if count == 0 || min == u64::MAX {
                0
            } else {
                min
            },
            max_ns: v.u64(at + offsets::MAX)?,
            buckets,
        })
    }
}

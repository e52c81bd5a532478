//! Reading the shared counters: the agent's memfd mapped read-only, each probe's counts
//! summed over its shards.

use super::{ProbeReport, Session, SessionError};
use probes::abi::remote::AgentInfo;
use probes::abi::shared::{Counts, SharedHeader, MAGIC};
use std::fs::File;

/// The shared counters, mapped read-only from the target's memfd. Stays valid after the
/// target exits.
pub(super) struct Counters {
    map: memmap2::Mmap,
    /// Shards per slot, from the header (fixed when the agent created the region).
    shards: usize,
    inode: u64,
}

impl Counters {
    /// Map the region at the memfd's current length: the agent extends it when it
    /// needs more counter slots, so map after preparing.
    pub(super) fn map(pid: i32, info: &AgentInfo) -> Result<Counters, SessionError> {
        let path = format!("/proc/{pid}/fd/{}", info.shared_fd);
        // Checked to be the agent's file: the program may have closed or reused the number.
        let f = crate::agent_fd::open(pid, info.shared_fd, "tracer-shared", false)
            .map_err(super::agent_io(format!("cannot open {path}")))?;
        Counters::map_file(&f, &path)
    }

    /// Map the counter region open as `f` (`path` names it in messages).
    pub(super) fn map_file(f: &File, path: &str) -> Result<Counters, SessionError> {
        use std::os::unix::fs::MetadataExt;
        let meta = f
            .metadata()
            .map_err(super::agent_io(format!("cannot stat {path}")))?;
        let len = meta.len() as usize;
        if len < SharedHeader::COUNTERS_OFFSET {
            return Err(SessionError::Agent(format!(
                "shared region {path} is {len} bytes, too short"
            )));
        }
        // SAFETY: a read-only shared mapping of the agent's memfd, which is never
        // truncated (it only grows); the agent changes it only through atomics, which
        // are read here as atomics.
        let map = unsafe { memmap2::MmapOptions::new().len(len).map(f) }
            .map_err(super::agent_io(format!("cannot map {path}")))?;
        // SAFETY: the mapping is at least a header long (checked) and page-aligned.
        let h = unsafe { &*(map.as_ptr() as *const SharedHeader) };
        if h.magic != MAGIC {
            return Err(SessionError::Agent(
                "shared region has a wrong magic".into(),
            ));
        }
        let shards = h.shards as usize;
        Ok(Counters {
            map,
            shards,
            inode: meta.ino(),
        })
    }

    /// A probe's counts, summed over its shards.
    fn get(&self, id: u32) -> Counts<'_> {
        let off = SharedHeader::slot_offset(id as usize, self.shards);
        assert!(off + SharedHeader::slot_size(self.shards) <= self.map.len());
        // SAFETY: in bounds, aligned, atomics written by the agent, laid out as the
        // header says.
        unsafe { Counts::from_slot(self.map.as_ptr().add(off), self.shards) }
    }
}

impl Session {
    /// The inode of the counter region's memfd: a forked child names its parent's region
    /// by it.
    pub fn counters_inode(&self) -> u64 {
        self.counters.inode
    }

    /// The counters of every installed probe as `region` holds them: the counter region
    /// of a forked child of the process (same probes, same slots, counts of its own).
    pub fn report_from(&self, region: &File) -> Result<Vec<ProbeReport>, SessionError> {
        Ok(self.report_with(&Counters::map_file(region, "a forked child's counters")?))
    }

    /// Current counters of every installed probe.
    pub fn report(&self) -> Vec<ProbeReport> {
        self.report_with(&self.counters)
    }

    fn report_with(&self, counters: &Counters) -> Vec<ProbeReport> {
        self.installed()
            .into_iter()
            .map(|p| {
                let c = counters.get(p.id);
                ProbeReport {
                    label: p.label.clone(),
                    module: p.module.clone(),
                    symbol: p.symbol.clone(),
                    address: p.site,
                    hits: c.hits(),
                    exits: c.exits(),
                    skipped: c.skipped(),
                    panics: c.panics(),
                    lost_exits: c.lost_exits(),
                    encoding: p.encoding,
                    saves: c.line.saves.load(std::sync::atomic::Ordering::Relaxed),
                    saves_avx512: c
                        .line
                        .saves_avx512
                        .load(std::sync::atomic::Ordering::Relaxed),
                }
            })
            .collect()
    }
}

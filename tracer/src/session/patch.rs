//! Writing the patches and restoring the original bytes: with every thread stopped and
//! none strictly inside a patched range, span by span, each write read back.

use super::{Session, SessionError};
use crate::threads::Process;

impl Session {
    /// Write the patches (or the original bytes) with every thread stopped and no thread
    /// strictly inside a patched range.
    pub(super) fn write_patches(
        &mut self,
        proc: &mut Process,
        install: bool,
    ) -> Result<(), SessionError> {
        if !proc.all_stopped() {
            proc.stop_all()?;
        }
        if install {
            // Each thread's registers read once, not once per probe (10,000 probes times
            // every thread were as many ptrace calls).
            for tid in proc.threads() {
                let mut rip = proc.regs(tid)?.rip;
                for p in &self.installed {
                    if rip > p.site && rip < p.site + p.stolen_len {
                        rip = proc.step_out_of(tid, p.site + 1, p.site + p.stolen_len, 64)?;
                    }
                }
            }
        }
        let writes: Vec<(u64, [u8; 5])> = self
            .installed
            .iter()
            .map(|p| (p.site, if install { p.patch } else { p.original }))
            .collect();
        write_all_verified(proc, &writes)?;
        self.patched = install;
        Ok(())
    }

    /// Stop every thread, restore every original byte (read back to check). Trampolines
    /// stay mapped: threads may be inside them or return through them.
    ///
    /// Only sites that still hold our patch are restored: the target ran untraced since
    /// the install and may have exec'd another program (or rewritten its code), and
    /// writing there would corrupt code that is not ours. Returns the labels of the
    /// probes whose patch was gone (left alone).
    pub fn remove(&mut self, proc: &mut Process) -> Result<Vec<String>, SessionError> {
        if !self.patched {
            return Ok(Vec::new());
        }
        let gone = self.restore_in(proc)?;
        self.patched = false;
        Ok(gone)
    }

    /// [`Session::remove`] in another process holding a copy of these patches (a forked
    /// child of the process the session installed them in); the session stays as it is.
    pub fn restore_in(&self, proc: &mut Process) -> Result<Vec<String>, SessionError> {
        let mut gone = Vec::new();
        if !proc.all_stopped() {
            proc.stop_all()?;
        }
        let sites: Vec<u64> = self.installed.iter().map(|p| p.site).collect();
        let now = read_sites(proc, &sites);
        let mut writes = Vec::new();
        for (p, now) in self.installed.iter().zip(now) {
            if now != Some(p.patch) {
                gone.push(if p.hidden {
                    format!("the agent's hook at {:#x}", p.site)
                } else {
                    p.label.clone()
                });
                continue;
            }
            writes.push((p.site, p.original));
        }
        write_all_verified(proc, &writes)?;
        Ok(gone)
    }
}

/// Sites close together (within [`SPAN`] bytes) are read and written as one span: 10,000
/// patches were 20,000 system calls on `/proc/PID/mem`, now a few per page. Every thread
/// is stopped, so the bytes between the sites are written back as they were just read.
const SPAN: u64 = 4096;

/// `sites` grouped into spans: (start, end, indices into `sites`), `sites` in any order.
fn spans(sites: &[u64]) -> Vec<(u64, u64, Vec<usize>)> {
    let mut order: Vec<usize> = (0..sites.len()).collect();
    order.sort_by_key(|&i| sites[i]);
    let mut out: Vec<(u64, u64, Vec<usize>)> = Vec::new();
    for i in order {
        let (start, end) = (sites[i], sites[i] + 5);
        match out.last_mut() {
            // Only sites starting in a page the span already covers: every byte written
            // back is then in a page some patch needs mapped.
            Some(s) if end - s.0 <= SPAN && start / 4096 <= (s.1 - 1) / 4096 => {
                s.1 = s.1.max(end);
                s.2.push(i);
            }
            _ => out.push((start, end, vec![i])),
        }
    }
    out
}

/// The 5 bytes at each site (None where unreadable).
fn read_sites(proc: &Process, sites: &[u64]) -> Vec<Option<[u8; 5]>> {
    let mut out = vec![None; sites.len()];
    for (start, end, members) in spans(sites) {
        let mut buf = vec![0u8; (end - start) as usize];
        let whole = proc.read_memory(start, &mut buf).is_ok();
        for i in members {
            let mut b = [0u8; 5];
            let ok = if whole {
                let off = (sites[i] - start) as usize;
                b.copy_from_slice(&buf[off..off + 5]);
                true
            } else {
                proc.read_memory(sites[i], &mut b).is_ok()
            };
            out[i] = ok.then_some(b);
        }
    }
    out
}

/// Writes each (site, bytes) and reads it back to check, span by span.
fn write_all_verified(proc: &Process, writes: &[(u64, [u8; 5])]) -> Result<(), SessionError> {
    let sites: Vec<u64> = writes.iter().map(|w| w.0).collect();
    for (start, end, members) in spans(&sites) {
        let fail = || SessionError::PatchVerify {
            site: sites[members[0]],
        };
        let mut buf = vec![0u8; (end - start) as usize];
        proc.read_memory(start, &mut buf).map_err(|_| fail())?;
        for &i in &members {
            let off = (sites[i] - start) as usize;
            buf[off..off + 5].copy_from_slice(&writes[i].1);
        }
        proc.write_memory(start, &buf).map_err(|_| fail())?;
        let mut back = vec![0u8; buf.len()];
        proc.read_memory(start, &mut back).map_err(|_| fail())?;
        if let Some(&i) = members.iter().find(|&&i| {
            let off = (sites[i] - start) as usize;
            back[off..off + 5] != writes[i].1
        }) {
            return Err(SessionError::PatchVerify { site: sites[i] });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::spans;

    /// Sites close together share a span; a site starting in a page the span does not
    /// cover starts another (the bytes between might not be mapped); every site is in exactly
    /// one span, whatever the input order.
    #[test]
    fn spans_join_sites_within_the_pages_they_cover() {
        let sites = [0x1010, 0x1ffd, 0x1000, 0x2008, 0x5000, 0x5004];
        let s = spans(&sites);
        assert_eq!(
            s.iter().map(|(a, b, _)| (*a, *b)).collect::<Vec<_>>(),
            // A span stays within SPAN bytes: 0x1ffd starts another, whose bytes reach
            // into page 0x2000, so 0x2008 joins it.
            vec![(0x1000, 0x1015), (0x1ffd, 0x200d), (0x5000, 0x5009)]
        );
        let mut all: Vec<usize> = s.iter().flat_map(|(_, _, m)| m.clone()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..sites.len()).collect::<Vec<_>>());
        assert_eq!(spans(&[0x1ff0, 0x3000]).len(), 2);
    }
}

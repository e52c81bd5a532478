//! The neighbour scan of many probes at once: every direct branch around a batch of
//! functions, decoded once.
//!
//! `check_neighbours` decodes 4 KiB before and after each function on its own: for
//! 10,000 small functions side by side that is 80 MiB of decoding for 300 KiB of code,
//! and it was a third of the time to prepare them. A [`NeighbourIndex`] merges the
//! windows of a batch into intervals, decodes each interval once and keeps the direct
//! branches it finds, sorted by target; each probe then asks for the branches whose
//! source lies in its own windows and whose target lands strictly inside its stolen
//! bytes, a binary search.
//!
//! The sweep restarts at every start and end of a function of the batch (points where
//! instructions are known to begin, the end as the per-probe scan took it), so it is in
//! step with the code there; between them it decodes as a linear sweep does, and like
//! the per-probe scan it refuses more, never less, than the in-function checks alone.

use super::checks::{direct_target, Range};
use super::memory::read_window;
use super::{Function, Memory, Refusal, NEIGHBOUR_WINDOW, UNKNOWN_SIZE_WINDOW};
use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic};

const PAGE: u64 = 4096;

/// A direct branch found around the batch.
#[derive(Clone, Copy, Debug)]
struct Branch {
    target: u64,
    from: u64,
    mnemonic: Mnemonic,
}

/// The direct branches around a batch of functions.
#[derive(Debug, Default)]
pub struct NeighbourIndex {
    /// Address ranges swept, sorted and disjoint, `[start, end)`.
    covered: Vec<(u64, u64)>,
    /// Sorted by target.
    branches: Vec<Branch>,
    /// The code read, by address: the probes of the batch read their functions from
    /// here rather than with a system call each (`process_vm_readv` took 7 us a call on
    /// this machine, most of the time to prepare a small function).
    runs: Vec<(u64, Vec<u8>)>,
}

impl NeighbourIndex {
    /// Sweep the neighbourhoods of `functions` (in any order) through `mem`.
    pub fn build(functions: &[Function], mem: &dyn Memory) -> Self {
        let mut windows: Vec<(u64, u64)> = functions.iter().map(window).collect();
        windows.sort_unstable();
        let mut covered: Vec<(u64, u64)> = Vec::new();
        for (s, e) in windows {
            match covered.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => covered.push((s, e)),
            }
        }
        let mut restarts: Vec<u64> = functions
            .iter()
            .flat_map(|f| [f.address, f.address.saturating_add(f.size.unwrap_or(0))])
            .collect();
        restarts.sort_unstable();
        restarts.dedup();
        let mut branches = Vec::new();
        let mut runs = Vec::new();
        for &(s, e) in &covered {
            for (base, code) in readable_runs(s, e, mem) {
                sweep(base, &code, &restarts, &mut branches);
                runs.push((base, code));
            }
        }
        branches.sort_unstable_by_key(|b| (b.target, b.from));
        NeighbourIndex {
            covered,
            branches,
            runs,
        }
    }

    /// Copy the bytes at `addr` from the code read for the batch, if one run holds them
    /// all.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        let i = self.runs.partition_point(|(base, _)| *base <= addr);
        let Some((base, code)) = i.checked_sub(1).map(|i| &self.runs[i]) else {
            return false;
        };
        let start = (addr - base) as usize;
        match start
            .checked_add(buf.len())
            .and_then(|end| code.get(start..end))
        {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }

    /// The verdict of `check_neighbours` for a function spanning `start..end` whose
    /// stolen bytes are `range`, or `None` when the index does not cover its windows.
    pub(super) fn check(&self, start: u64, end: u64, range: Range) -> Option<Result<(), Refusal>> {
        let lo = start.saturating_sub(NEIGHBOUR_WINDOW);
        let hi = end.saturating_add(NEIGHBOUR_WINDOW);
        let i = self.covered.partition_point(|&(_, e)| e <= lo);
        let &(s, e) = self.covered.get(i)?;
        if s > lo || e < hi {
            return None;
        }
        let first = self.branches.partition_point(|b| b.target <= range.start);
        for b in &self.branches[first..] {
            if b.target >= range.end {
                break;
            }
            let before = lo <= b.from && b.from < start;
            let after = end <= b.from && b.from < hi;
            if before || after {
                return Some(Err(Refusal::BranchIntoStolen {
                    from: b.from,
                    mnemonic: b.mnemonic,
                    target: b.target,
                    stolen_start: range.start,
                    stolen_end: range.end,
                }));
            }
        }
        Some(Ok(()))
    }

    /// Bytes of code held for the batch.
    pub fn code_bytes(&self) -> usize {
        self.runs.iter().map(|(_, c)| c.len()).sum()
    }
}

/// Memory read through a batch's code first, then through `inner` (for code outside
/// the batch's windows, or not readable when it was read).
pub struct BatchMemory<'a> {
    pub index: &'a NeighbourIndex,
    pub inner: &'a dyn Memory,
}

impl Memory for BatchMemory<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        self.index.read(addr, buf) || self.inner.read(addr, buf)
    }
}

/// What the per-probe scan of `f` reads: 4 KiB before it, the function (or the window
/// analysed when its size is unknown) and 4 KiB after.
fn window(f: &Function) -> (u64, u64) {
    let len = f.size.unwrap_or(UNKNOWN_SIZE_WINDOW);
    let end = f.address.saturating_add(len);
    (
        f.address.saturating_sub(NEIGHBOUR_WINDOW),
        end.saturating_add(NEIGHBOUR_WINDOW),
    )
}

/// The readable parts of `[start, end)`, each with its address: one read when all of it
/// is readable, else page by page (a mapping's edge cuts a run).
fn readable_runs(start: u64, end: u64, mem: &dyn Memory) -> Vec<(u64, Vec<u8>)> {
    let Ok(len) = usize::try_from(end - start) else {
        return Vec::new();
    };
    let mut all = vec![0u8; len];
    if mem.read(start, &mut all) {
        return vec![(start, all)];
    }
    let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut addr = start;
    let mut open = false;
    while addr < end {
        let next = ((addr / PAGE) + 1).saturating_mul(PAGE).min(end);
        // The readable prefix of this page: a Memory need not fail by pages.
        let f = Function {
            address: addr,
            size: None,
        };
        let chunk = read_window(&f, next, mem).ok();
        match chunk {
            Some(c) => {
                let whole = c.len() as u64 == next - addr;
                match runs.last_mut() {
                    Some((_, v)) if open => v.extend_from_slice(&c),
                    _ => runs.push((addr, c)),
                }
                open = whole;
            }
            None => open = false,
        }
        addr = next;
    }
    runs
}

/// Decode `code` at `base`, restarting at each address of `restarts` inside it, and keep
/// every direct branch.
fn sweep(base: u64, code: &[u8], restarts: &[u64], out: &mut Vec<Branch>) {
    let end = base + code.len() as u64;
    let mut decoder = Decoder::with_ip(64, code, base, DecoderOptions::NONE);
    let mut next_restart = restarts.partition_point(|&r| r <= base);
    let mut ins = Instruction::default();
    while decoder.can_decode() {
        let ip = decoder.ip();
        // Past a restart point: start again there, in step with the code.
        if let Some(&r) = restarts.get(next_restart) {
            if r < end && ip >= r {
                if ip > r {
                    decoder.set_ip(r);
                    if decoder.set_position((r - base) as usize).is_err() {
                        break;
                    }
                }
                next_restart += 1;
                continue;
            }
        }
        decoder.decode_out(&mut ins);
        if let Some(target) = direct_target(&ins) {
            out.push(Branch {
                target,
                from: ins.ip(),
                mnemonic: ins.mnemonic(),
            });
        }
    }
}

//! Memory shared between the agent (writer) and the tracer (reader).
//!
//! The agent creates it as a memfd; the tracer maps the same file through
//! `/proc/PID/fd/N`, so counters can be read while the target runs and after it died.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

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

impl TryFrom<u32> for ProbeKind {
    /// The number received, which names no kind: a tracer and agent built apart.
    type Error = u32;

    fn try_from(v: u32) -> Result<Self, u32> {
        match v {
            0 => Ok(ProbeKind::Entry),
            1 => Ok(ProbeKind::Exit),
            2 => Ok(ProbeKind::Offset),
            k => Err(k),
        }
    }
}

impl ProbeKind {
    /// Whether the patch goes at the function entry (exit probes patch the entry too).
    pub fn at_entry(self) -> bool {
        matches!(self, ProbeKind::Entry | ProbeKind::Exit)
    }
}

/// The first cache line of a probe's counter slot: its flags, the counters only the
/// agent's slow paths touch, and the hit counters of threads whose CPU is unknown.
///
/// When the region is sharded ([`SharedHeader::shards`] > 0) the line is followed by one
/// [`Shard`] per shard, and `hits`, `exits` and `skipped` here are only part of the
/// totals: read a probe through [`Counts`], never through these fields alone.
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
    /// Pack probes: the vector registers saved around their handlers, as [`saves`] packs
    /// them; 0 for other probes.
    pub saves: AtomicU64,
    /// The same for `zmm16-31` and `k0-7` (with AVX-512), as [`saves::avx512`] packs them.
    pub saves_avx512: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<ProbeCounters>() == 64);

/// [`ProbeCounters::saves`]: what the stubs of a probe's pack handlers save (`ymm` in
/// full with AVX, else `xmm`), found by analysing the handlers' code.
pub mod saves {
    /// Bits 0-15: the registers saved around the entry handler.
    pub const ENTRY_SHIFT: u32 = 0;
    /// Bits 16-31: around the return handler.
    pub const EXIT_SHIFT: u32 = 16;
    /// The probe has an entry (or offset) handler of a pack.
    pub const HAS_ENTRY: u64 = 1 << 32;
    /// The probe has a return handler of a pack.
    pub const HAS_EXIT: u64 = 1 << 33;

    /// [`super::ProbeCounters::saves_avx512`]: per handler (entry at `ENTRY_SHIFT`,
    /// return at `EXIT_SHIFT`), `zmm16-31` in 16 bits then `k0-7` in 8.
    pub mod avx512 {
        pub const ENTRY_SHIFT: u32 = 0;
        pub const EXIT_SHIFT: u32 = 32;

        pub fn pack(zmm16: u16, masks: u8, shift: u32) -> u64 {
            (zmm16 as u64 | (masks as u64) << 16) << shift
        }

        /// (zmm16-31, k0-7) of the handler at `shift`.
        pub fn unpack(bits: u64, shift: u32) -> (u16, u8) {
            ((bits >> shift) as u16, (bits >> (shift + 16)) as u8)
        }
    }

    /// With AVX-512: `zmm5 zmm12-13 zmm17 k2` (registers 0-15 are kept in full, as
    /// `zmm`), "none" or "all".
    pub fn describe_avx512(bits: u16, zmm16: u16, masks: u8) -> String {
        if bits == 0xffff && zmm16 == 0xffff && masks == 0xff {
            return "all".into();
        }
        let mut parts = ranges(bits, "zmm", "");
        parts.extend(ranges_from(16, zmm16, "zmm", ""));
        parts.extend(ranges(masks as u16, "k", ""));
        if parts.is_empty() {
            return "none".into();
        }
        parts.join(" ")
    }

    /// `ymm5 ymm12-13`, "none" or "all" for one handler's 16 bits.
    pub fn describe(bits: u16, avx: bool) -> String {
        let name = if avx { "ymm" } else { "xmm" };
        match bits {
            0 => "none".into(),
            0xffff => "all".into(),
            _ => ranges(bits, name, "").join(" "),
        }
    }

    /// The registers of a bit set as runs: `xmm0-3`, `xmm8` (`prefix`, then the numbers,
    /// then `suffix`).
    pub fn ranges(bits: u16, prefix: &str, suffix: &str) -> Vec<String> {
        ranges_from(0, bits, prefix, suffix)
    }

    /// [`ranges`] of a bit set whose bit 0 is register `first` (`zmm16-31`).
    pub fn ranges_from(first: usize, bits: u16, prefix: &str, suffix: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < 16 {
            if bits & (1 << i) == 0 {
                i += 1;
                continue;
            }
            let start = i;
            while i + 1 < 16 && bits & (1 << (i + 1)) != 0 {
                i += 1;
            }
            let (a, b) = (first + start, first + i);
            out.push(if start == i {
                format!("{prefix}{a}{suffix}")
            } else {
                format!("{prefix}{a}-{b}{suffix}")
            });
            i += 1;
        }
        out
    }
}

/// The counters one group of CPUs bumps for a probe, on a cache line of its own so that
/// threads on different CPUs never write the same line (see `agent::shared`).
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct Shard {
    pub hits: AtomicU64,
    pub exits: AtomicU64,
    pub skipped: AtomicU64,
}

/// The counters of one probe as a reader sees them: each total is the sum over the
/// probe's first line and its shards. Every increment is atomic and lands in exactly one
/// of them, so the sums are exact whichever CPU each hit was counted for.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Counts<'a> {
    pub line: &'a ProbeCounters,
    pub shards: &'a [Shard],
}

impl<'a> Counts<'a> {
    /// The counts of the slot at `slot`, followed by `shards` shards.
    ///
    /// # Safety
    /// `slot` points at a slot of a mapped counter region whose header says `shards`,
    /// which stays mapped for `'a`.
    pub unsafe fn from_slot(slot: *const u8, shards: usize) -> Counts<'a> {
        // SAFETY: see the function's contract; slots are 64-byte aligned.
        unsafe {
            Counts {
                line: &*(slot as *const ProbeCounters),
                shards: std::slice::from_raw_parts(
                    slot.add(std::mem::size_of::<ProbeCounters>()) as *const Shard,
                    shards,
                ),
            }
        }
    }

    fn sum(&self, line: &AtomicU64, field: fn(&Shard) -> &AtomicU64) -> u64 {
        let mut n = line.load(Ordering::Relaxed);
        for s in self.shards {
            n = n.wrapping_add(field(s).load(Ordering::Relaxed));
        }
        n
    }

    /// Entries (or instruction hits) that ran the handler.
    pub fn hits(&self) -> u64 {
        self.sum(&self.line.hits, |s| &s.hits)
    }

    /// Returns that ran the exit handler.
    pub fn exits(&self) -> u64 {
        self.sum(&self.line.exits, |s| &s.exits)
    }

    /// Hits inside a handler, where only the original code ran.
    pub fn skipped(&self) -> u64 {
        self.sum(&self.line.skipped, |s| &s.skipped)
    }

    pub fn panics(&self) -> u64 {
        self.line.panics.load(Ordering::Relaxed)
    }

    pub fn lost_exits(&self) -> u64 {
        self.line.lost_exits.load(Ordering::Relaxed)
    }

    pub fn flags(&self) -> u32 {
        self.line.flags.load(Ordering::Relaxed)
    }

    /// Zero every count (a slot reused by a new session), keeping flags and encoding.
    pub fn reset(&self) {
        let l = self.line;
        for a in [&l.hits, &l.exits, &l.skipped, &l.panics, &l.lost_exits] {
            a.store(0, Ordering::Relaxed);
        }
        for s in self.shards {
            for a in [&s.hits, &s.exits, &s.skipped] {
                a.store(0, Ordering::Relaxed);
            }
        }
    }
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

/// Header of the shared region; `capacity` counter slots follow at offset
/// [`SharedHeader::COUNTERS_OFFSET`], each [`SharedHeader::slot_size`] bytes: a
/// [`ProbeCounters`] line and `shards` [`Shard`] lines.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct SharedHeader {
    pub magic: u64,
    /// Number of counter slots; grows (the memfd is extended, counters never move).
    pub capacity: u32,
    /// Slots in use.
    pub used: AtomicU32,
    /// Shards per slot, fixed when the region is created (0: not sharded).
    pub shards: u32,
}

impl SharedHeader {
    pub const COUNTERS_OFFSET: usize = 64;

    /// Bytes of one probe's slot with `shards` shards.
    pub fn slot_size(shards: usize) -> usize {
        std::mem::size_of::<ProbeCounters>() + shards * std::mem::size_of::<Shard>()
    }

    /// Bytes needed for `capacity` probes with `shards` shards each.
    pub fn region_size(capacity: usize, shards: usize) -> usize {
        Self::COUNTERS_OFFSET + capacity * Self::slot_size(shards)
    }

    /// Where slot `id` starts, from the start of the region.
    pub fn slot_offset(id: usize, shards: usize) -> usize {
        Self::COUNTERS_OFFSET + id * Self::slot_size(shards)
    }
}

#[cfg(test)]
mod tests {
    use super::ProbeKind;

    #[test]
    fn probe_kinds_round_trip_and_unknown_numbers_are_errors() {
        for k in [ProbeKind::Entry, ProbeKind::Exit, ProbeKind::Offset] {
            assert_eq!(ProbeKind::try_from(k as u32), Ok(k));
        }
        assert_eq!(ProbeKind::try_from(3), Err(3));
        assert_eq!(ProbeKind::try_from(u32::MAX), Err(u32::MAX));
    }

    #[test]
    fn avx512_saves_round_trip_and_read_as_registers() {
        use super::saves::{avx512, describe_avx512};
        let bits = avx512::pack(0b1011, 0x84, avx512::ENTRY_SHIFT)
            | avx512::pack(0x8000, 1, avx512::EXIT_SHIFT);
        assert_eq!(avx512::unpack(bits, avx512::ENTRY_SHIFT), (0b1011, 0x84));
        assert_eq!(avx512::unpack(bits, avx512::EXIT_SHIFT), (0x8000, 1));
        assert_eq!(
            describe_avx512(1 << 5, 0b1011, 0x84),
            "zmm5 zmm16-17 zmm19 k2 k7"
        );
        assert_eq!(describe_avx512(0, 0, 0), "none");
        assert_eq!(describe_avx512(0xffff, 0xffff, 0xff), "all");
    }
}

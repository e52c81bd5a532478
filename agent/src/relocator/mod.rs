//! Prologue relocation: which instructions a probe steals, whether stealing them is
//! safe, and how they are re-encoded at the trampoline.
//!
//! A probe overwrites the start of a site with a 5-byte `jmp rel32`. The instructions
//! it covers ("stolen") run later from the trampoline, re-encoded for their new address,
//! followed by a jump back to `site + len`. This module is pure analysis and encoding:
//! it reads code through [`Memory`], never allocates executable memory and never
//! patches anything.
//!
//! Stealing is unsafe when something could later transfer control *strictly inside* the
//! stolen bytes (it would land in the middle of the `jmp`), when fewer than five bytes of
//! the function remain, or when an instruction's meaning depends on its address in a way
//! that re-encoding cannot preserve. [`analyze`] checks these over the whole function
//! (its symbol size when known, a bounded window otherwise) and returns a [`Refusal`]
//! naming the culprit.
//!
//! Parts: [`memory`] reads the code, `checks` and `jump_table` decide whether stealing is
//! safe, [`Refusal`] says why not, `rewrite` re-encodes the stolen instructions.

mod checks;
mod jump_table;
pub mod memory;
mod neighbours;
mod refusal;
mod rewrite;
#[cfg(test)]
mod tests;

pub use memory::{Memory, SelfMemory, SliceMemory};
pub use neighbours::{BatchMemory, NeighbourIndex};
pub use refusal::Refusal;
pub use rewrite::relocate;

use crate::emitter::CallEncoding;
use checks::{check_function, check_neighbours, check_stolen, ends_flow, undecodable, Range};
use iced_x86::{Code, Decoder, DecoderOptions, Instruction};
use memory::read_code;
use std::collections::HashSet;

/// Size of the patch written at the site: `jmp rel32`.
pub const PATCH_LEN: usize = 5;

/// How far past the function start the analysis scans when the symbol size is unknown.
/// A larger window can only refuse more, never less.
pub const UNKNOWN_SIZE_WINDOW: u64 = 4096;

/// How much code before and after the function is scanned for branches into the
/// stolen bytes (see `check_neighbours`).
pub const NEIGHBOUR_WINDOW: u64 = 4096;

/// `endbr64`, kept in place by entry probes so indirect-branch tracking keeps working.
const ENDBR64_LEN: u64 = 4;

/// What kind of probe the site is for: the one kind the tracer, the agent and packs
/// share. Entry and exit probes both patch the function entry, past a leading `endbr64`;
/// offset probes patch an instruction boundary inside the function.
pub use probes::ProbeKind;

/// The function a site belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    /// First byte of the function.
    pub address: u64,
    /// Size from the symbol table, when known.
    pub size: Option<u64>,
}

/// The instructions a probe takes over, as decided by [`analyze`].
#[derive(Clone, Debug)]
pub struct Stolen {
    /// The function analysed.
    pub function: Function,
    /// The probe kind analysed for.
    pub kind: ProbeKind,
    /// Where the patch goes (after a leading `endbr64` for entry probes).
    pub site: u64,
    /// Bytes covered by the stolen instructions, at least [`PATCH_LEN`].
    pub len: usize,
    /// The original bytes at `site..site + len` (to restore when the probe is removed).
    pub original: Vec<u8>,
    /// The stolen instructions, decoded at their original addresses.
    pub instructions: Vec<Instruction>,
    /// Whether the site was moved past an `endbr64` at the function start.
    pub skipped_endbr64: bool,
}

impl Stolen {
    /// The first byte after the stolen instructions: where the trampoline jumps back.
    pub fn resume(&self) -> u64 {
        self.site + self.len as u64
    }
}

/// The stolen instructions re-encoded for a new address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relocated {
    /// Where `bytes` must be placed.
    pub new_ip: u64,
    /// The re-encoded instructions. The caller appends the jump back to `resume`.
    pub bytes: Vec<u8>,
    /// `site + len`: where the trampoline continues in the original code.
    pub resume: u64,
    /// Offset in `bytes` of each stolen instruction, in order (for a trailing `call`, of
    /// the `push` it becomes); `u32::MAX` for an instruction the block encoder rewrote
    /// into several (`jrcxz`/`loop` with a far target).
    pub instruction_offsets: Vec<u32>,
    /// False when the last stolen instruction never falls through (`jmp`, `ret`, ...):
    /// the jump back is then unreachable, though harmless.
    pub falls_through: bool,
    /// How a trailing direct `call`, rewritten as `push resume; jmp f`, jumps to `f`
    /// ([`CallEncoding::Rel32`] or, beyond 2 GiB, [`CallEncoding::RipSlot`] with the
    /// target inline); `None` without one, and for an indirect one (its `jmp` goes
    /// through the call's own operand).
    pub call_jump: Option<CallEncoding>,
}

/// Decides which instructions a probe at `site` steals, and whether that is safe.
///
/// For [`ProbeKind::Entry`] and [`ProbeKind::Exit`], `site` must be `func.address`; the returned site is moved
/// past a leading `endbr64`. For [`ProbeKind::Offset`], `site` must be the start of an
/// instruction of the function, which is checked by decoding from the function start.
pub fn analyze(
    func: &Function,
    site: u64,
    kind: ProbeKind,
    mem: &dyn Memory,
) -> Result<Stolen, Refusal> {
    analyze_with(func, site, kind, mem, None)
}

/// [`analyze`], taking the scan of the function's neighbours from `neighbours` when it
/// covers them (a batch of probes decodes their surroundings once).
pub fn analyze_with(
    func: &Function,
    site: u64,
    kind: ProbeKind,
    mem: &dyn Memory,
    neighbours: Option<&NeighbourIndex>,
) -> Result<Stolen, Refusal> {
    if kind.at_entry() && site != func.address {
        return Err(Refusal::EntryNotAtFunctionStart {
            site,
            function: func.address,
        });
    }
    let code = read_code(func, mem)?;
    let code_end = func.address + code.len() as u64;
    // Where the function ends for the size checks; with an unknown size the scan
    // window is no evidence of an end, so only decoded instructions bound the steal.
    let known_end = func.size.map(|s| func.address.saturating_add(s));
    let all = decode_function(&code, func.address);

    let (site, skipped_endbr64) = patch_site(kind, site, &all);
    let first = first_at_site(func, site, &all, code_end, known_end)?;
    let stolen = steal(&all[first..], site, known_end, &code, func.address)?;
    let len = stolen.iter().map(|i| i.len()).sum::<usize>();
    let range = Range {
        start: site,
        end: site + len as u64,
    };
    let stolen_ips: HashSet<u64> = stolen.iter().map(|i| i.ip()).collect();

    check_stolen(&stolen, range, &stolen_ips)?;
    check_function(func, &all, range, code_end, mem, kind.at_entry())?;
    match neighbours.and_then(|n| n.check(func.address, code_end, range)) {
        Some(verdict) => verdict?,
        None => check_neighbours(func.address, code_end, range, mem)?,
    }

    let off = (site - func.address) as usize;
    Ok(Stolen {
        function: *func,
        kind,
        site,
        len,
        original: code[off..off + len].to_vec(),
        instructions: stolen,
        skipped_endbr64,
    })
}

/// Every instruction of `code` at `address`, in a linear sweep; undecodable bytes stay
/// in as invalid instructions, a cut-off instruction at the end does not.
fn decode_function(code: &[u8], address: u64) -> Vec<Instruction> {
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut all: Vec<Instruction> = Vec::new();
    while decoder.can_decode() {
        let ins = decoder.decode();
        if ins.is_invalid() && decoder.last_error() == iced_x86::DecoderError::NoMoreBytes {
            // Cut at the end of the window or of the symbol: nothing more to decode.
            break;
        }
        all.push(ins);
    }
    all
}

/// Where the patch goes: after a leading `endbr64` for entry probes (and whether it
/// was skipped), at `site` otherwise.
fn patch_site(kind: ProbeKind, site: u64, all: &[Instruction]) -> (u64, bool) {
    match all.first() {
        Some(first) if kind.at_entry() && first.code() == Code::Endbr64 => {
            (site + ENDBR64_LEN, true)
        }
        _ => (site, false),
    }
}

/// The index in `all` of the instruction starting at `site`, after checking that the
/// site is in the function, on an instruction boundary, with room for the patch.
fn first_at_site(
    func: &Function,
    site: u64,
    all: &[Instruction],
    code_end: u64,
    known_end: Option<u64>,
) -> Result<usize, Refusal> {
    let outside = Refusal::SiteOutsideFunction {
        site,
        function: func.address,
        end: code_end,
    };
    if site < func.address || site >= code_end {
        return Err(outside);
    }
    // No instruction starting at or after the site: it is inside the last one, if that
    // one reaches it (the bytes past a cut-off instruction decode to nothing).
    let first = all.iter().position(|i| i.ip() >= site).unwrap_or(all.len());
    if first == all.len() && all.last().is_none_or(|i| i.next_ip() <= site) {
        return Err(outside);
    }
    if all.get(first).is_none_or(|i| i.ip() != site) {
        // The preceding instruction spans the site.
        let spanning = &all[first.saturating_sub(1)];
        return Err(Refusal::NotInstructionBoundary {
            site,
            instruction: spanning.ip(),
            mnemonic: spanning.mnemonic(),
        });
    }
    if let Some(end) = known_end {
        let available = end.saturating_sub(site);
        if available < PATCH_LEN as u64 {
            return Err(Refusal::FunctionTooShort { site, available });
        }
    }
    Ok(first)
}

/// Takes whole instructions from `from` (starting at `site`) until the patch is
/// covered, refusing when the function, its flow or its readable bytes end first.
fn steal(
    from: &[Instruction],
    site: u64,
    known_end: Option<u64>,
    code: &[u8],
    base: u64,
) -> Result<Vec<Instruction>, Refusal> {
    let mut stolen: Vec<Instruction> = Vec::new();
    let mut covered = 0usize;
    for ins in from {
        if ins.is_invalid() {
            return Err(undecodable(ins.ip(), code, base));
        }
        if let Some(end) = known_end {
            if ins.next_ip() > end {
                return Err(Refusal::FunctionTooShort {
                    site,
                    available: end - site,
                });
            }
        }
        covered += ins.len();
        stolen.push(*ins);
        if covered >= PATCH_LEN {
            return Ok(stolen);
        }
        if ends_flow(ins) {
            return Err(Refusal::EndsTooSoon {
                site,
                address: ins.ip(),
                mnemonic: ins.mnemonic(),
                covered,
            });
        }
    }
    // Ran out of decodable bytes (end of a readable mapping).
    Err(Refusal::Unreadable {
        address: site + covered as u64,
        len: (PATCH_LEN - covered) as u64,
    })
}

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

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, FlowControl, Instruction,
    InstructionBlock, InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register,
};
use std::collections::HashSet;
use std::fmt;

/// Size of the patch written at the site: `jmp rel32`.
pub const PATCH_LEN: usize = 5;

/// How far past the function start the analysis scans when the symbol size is unknown.
/// A larger window can only refuse more, never less.
pub const UNKNOWN_SIZE_WINDOW: u64 = 4096;

/// Jump tables are read entry by entry while entries land in the function; this bounds
/// the walk for tables followed by data that happens to look like more entries.
const MAX_TABLE_ENTRIES: u64 = 4096;

/// Largest symbol size accepted: far above any real function, so a larger size is a
/// corrupt symbol rather than code to read.
const MAX_FUNCTION_SIZE: u64 = 64 << 20;

/// How much code before and after the function is scanned for branches into the
/// stolen bytes (see `check_neighbours`).
pub const NEIGHBOUR_WINDOW: u64 = 4096;

/// How many instructions back from an indirect `jmp` the register definitions are traced.
const DEF_SEARCH_DEPTH: usize = 24;

/// `endbr64`, kept in place by entry probes so indirect-branch tracking keeps working.
const ENDBR64_LEN: u64 = 4;

/// What kind of probe the site is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// At the function entry (exit probes patch the entry too). The site is the
    /// function address, moved past a leading `endbr64`.
    Entry,
    /// At an instruction boundary inside the function.
    Offset,
}

/// The function a site belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    /// First byte of the function.
    pub address: u64,
    /// Size from the symbol table, when known.
    pub size: Option<u64>,
}

/// Read access to the code being analysed.
pub trait Memory {
    /// Fills `buf` with the bytes at `addr`. Returns false, without any other effect, if
    /// any of the bytes cannot be read.
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool;
}

/// Reads the current process with `process_vm_readv`, so that an unmapped or unreadable
/// address is an error instead of a crash.
#[derive(Clone, Copy, Debug, Default)]
pub struct SelfMemory;

impl Memory for SelfMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        if buf.is_empty() {
            return true;
        }
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: `local` describes `buf`, which we borrow mutably for the call. The
        // remote range is only read by the kernel, which checks it and reports EFAULT
        // instead of faulting.
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        n >= 0 && n as usize == buf.len()
    }
}

/// Code held in a buffer, as if mapped at `base` (for code read from another process,
/// or assembled in tests).
#[derive(Clone, Copy, Debug)]
pub struct SliceMemory<'a> {
    /// Address of `bytes[0]`.
    pub base: u64,
    /// The bytes.
    pub bytes: &'a [u8],
}

impl Memory for SliceMemory<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        let Some(start) = addr.checked_sub(self.base) else {
            return false;
        };
        let Ok(start) = usize::try_from(start) else {
            return false;
        };
        match start
            .checked_add(buf.len())
            .and_then(|end| self.bytes.get(start..end))
        {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
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
    /// Offset in `bytes` of each stolen instruction, in order; `u32::MAX` for an
    /// instruction rewritten into several (`jrcxz`/`loop` with a far target).
    pub instruction_offsets: Vec<u32>,
    /// False when the last stolen instruction never falls through (`jmp`, `ret`, ...):
    /// the jump back is then unreachable, though harmless.
    pub falls_through: bool,
}

/// Why a site cannot be probed. The `Display` text is meant for the user.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// Code could not be read.
    Unreadable { address: u64, len: u64 },
    /// Bytes that do not decode as an instruction, where one is needed.
    Undecodable { address: u64, bytes: Vec<u8> },
    /// An entry probe was asked for an address other than the function's.
    EntryNotAtFunctionStart { site: u64, function: u64 },
    /// The site is outside the function (or outside the scanned window when the size
    /// is unknown).
    SiteOutsideFunction { site: u64, function: u64, end: u64 },
    /// The site is inside an instruction rather than at its start.
    NotInstructionBoundary {
        site: u64,
        instruction: u64,
        mnemonic: Mnemonic,
    },
    /// The function's known size leaves fewer than five bytes at the site.
    FunctionTooShort { site: u64, available: u64 },
    /// An instruction that ends the flow (`ret`, `jmp`, `ud2`, `int3`, `hlt`) comes
    /// before five bytes are covered; stealing the bytes after it would overwrite
    /// padding or another function.
    EndsTooSoon {
        site: u64,
        address: u64,
        mnemonic: Mnemonic,
        covered: usize,
    },
    /// A direct branch or call lands strictly inside the stolen bytes.
    BranchIntoStolen {
        from: u64,
        mnemonic: Mnemonic,
        target: u64,
        stolen_start: u64,
        stolen_end: u64,
    },
    /// A jump-table entry lands strictly inside the stolen bytes.
    JumpTableIntoStolen {
        jump: u64,
        table: u64,
        index: u64,
        target: u64,
    },
    /// An indirect jump whose possible targets cannot be determined.
    IndirectJump { address: u64, mnemonic: Mnemonic },
    /// A RIP-relative operand refers to the stolen bytes (reads or references code that
    /// the patch changes).
    RipRelativeIntoStolen {
        address: u64,
        mnemonic: Mnemonic,
        target: u64,
    },
    /// A stolen instruction cannot run at another address with the same effect.
    Unrelocatable {
        address: u64,
        mnemonic: Mnemonic,
        reason: &'static str,
    },
    /// A stolen instruction refers to `target`, which the re-encoded instruction at
    /// `new_ip` cannot reach with a 32-bit displacement.
    TooFar {
        address: u64,
        target: u64,
        new_ip: u64,
    },
    /// The encoder failed for a reason not covered above.
    EncodeFailed { new_ip: u64, message: String },
}

fn mn(m: &Mnemonic) -> String {
    format!("{m:?}").to_lowercase()
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Unreadable { address, len } => write!(
                f,
                "cannot read {len} bytes of code at {address:#x}: the address is not mapped readable in the target"
            ),
            Refusal::Undecodable { address, bytes } => write!(
                f,
                "the bytes at {address:#x} ({}) are not a valid x86-64 instruction; is this really code?",
                bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
            ),
            Refusal::EntryNotAtFunctionStart { site, function } => write!(
                f,
                "an entry probe must be placed at the function start {function:#x}, not at {site:#x}; use an offset probe instead"
            ),
            Refusal::SiteOutsideFunction { site, function, end } => write!(
                f,
                "the site {site:#x} is outside the function {function:#x}..{end:#x}"
            ),
            Refusal::NotInstructionBoundary { site, instruction, mnemonic } => write!(
                f,
                "the site {site:#x} is in the middle of the `{}` instruction at {instruction:#x}; choose an instruction boundary",
                mn(mnemonic)
            ),
            Refusal::FunctionTooShort { site, available } => write!(
                f,
                "only {available} bytes of the function remain at {site:#x}, fewer than the {PATCH_LEN} the jump patch needs"
            ),
            Refusal::EndsTooSoon { site, address, mnemonic, covered } => write!(
                f,
                "the code at {site:#x} ends with `{}` at {address:#x} after {covered} bytes, fewer than the {PATCH_LEN} the jump patch needs",
                mn(mnemonic)
            ),
            Refusal::BranchIntoStolen { from, mnemonic, target, stolen_start, stolen_end } => write!(
                f,
                "the `{}` at {from:#x} goes to {target:#x}, inside the bytes {stolen_start:#x}..{stolen_end:#x} the patch would overwrite",
                mn(mnemonic)
            ),
            Refusal::JumpTableIntoStolen { jump, table, index, target } => write!(
                f,
                "entry {index} of the jump table at {table:#x} used by the jump at {jump:#x} goes to {target:#x}, inside the bytes the patch would overwrite"
            ),
            Refusal::IndirectJump { address, mnemonic } => write!(
                f,
                "the indirect `{}` at {address:#x} could land anywhere in the function, including inside the bytes the patch would overwrite",
                mn(mnemonic)
            ),
            Refusal::RipRelativeIntoStolen { address, mnemonic, target } => write!(
                f,
                "the `{}` at {address:#x} refers to {target:#x}, inside the bytes the patch would overwrite",
                mn(mnemonic)
            ),
            Refusal::Unrelocatable { address, mnemonic, reason } => write!(
                f,
                "the `{}` at {address:#x} cannot be moved to a trampoline: {reason}",
                mn(mnemonic)
            ),
            Refusal::TooFar { address, target, new_ip } => write!(
                f,
                "the instruction at {address:#x} refers to {target:#x}, out of 32-bit reach from the trampoline at {new_ip:#x}; the trampoline must be within 2 GiB of the code"
            ),
            Refusal::EncodeFailed { new_ip, message } => write!(
                f,
                "re-encoding the instructions for {new_ip:#x} failed: {message}"
            ),
        }
    }
}

impl std::error::Error for Refusal {}

/// Reads the function's code: all of it when the size is known, otherwise up to
/// [`UNKNOWN_SIZE_WINDOW`] bytes, stopping at the first unreadable page.
fn read_code(func: &Function, mem: &dyn Memory) -> Result<Vec<u8>, Refusal> {
    match func.size {
        Some(size) => {
            // A symbol size this large, or one running past the end of the address space,
            // is corrupt; refuse instead of allocating it or wrapping around.
            let len = usize::try_from(size)
                .ok()
                .filter(|&l| l as u64 <= MAX_FUNCTION_SIZE)
                .filter(|&l| func.address.checked_add(l as u64).is_some())
                .ok_or(Refusal::Unreadable {
                    address: func.address,
                    len: size,
                })?;
            let mut buf = vec![0u8; len];
            if !mem.read(func.address, &mut buf) {
                return Err(Refusal::Unreadable {
                    address: func.address,
                    len: size,
                });
            }
            Ok(buf)
        }
        None => read_window(func, func.address.saturating_add(UNKNOWN_SIZE_WINDOW), mem),
    }
}

/// Reads from `func.address` up to `end`, keeping the longest readable prefix.
fn read_window(func: &Function, end: u64, mem: &dyn Memory) -> Result<Vec<u8>, Refusal> {
    const PAGE: u64 = 4096;
    let mut buf = Vec::new();
    let mut addr = func.address;
    while addr < end {
        let chunk_end = ((addr / PAGE) + 1).saturating_mul(PAGE).min(end);
        let mut chunk = vec![0u8; (chunk_end - addr) as usize];
        if mem.read(addr, &mut chunk) {
            buf.extend_from_slice(&chunk);
            addr = chunk_end;
            continue;
        }
        // Keep the longest readable prefix: a [`Memory`] need not fail by pages.
        let (mut lo, mut hi) = (0usize, chunk.len());
        while lo + 1 < hi {
            let mid = (lo + hi) / 2;
            if mem.read(addr, &mut chunk[..mid]) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        if lo > 0 && mem.read(addr, &mut chunk[..lo]) {
            buf.extend_from_slice(&chunk[..lo]);
        }
        break;
    }
    if buf.is_empty() {
        return Err(Refusal::Unreadable {
            address: func.address,
            len: 1,
        });
    }
    Ok(buf)
}

/// The longest readable run of at most `max` bytes ending at `end`, with its address.
fn read_back(end: u64, max: u64, mem: &dyn Memory) -> Option<(u64, Vec<u8>)> {
    let max = max.min(end);
    let mut buf = vec![0u8; max as usize];
    if mem.read(end - max, &mut buf) {
        return Some((end - max, buf));
    }
    let (mut lo, mut hi) = (0u64, max);
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        if mem.read(end - mid, &mut buf[..mid as usize]) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    if lo == 0 || !mem.read(end - lo, &mut buf[..lo as usize]) {
        return None;
    }
    buf.truncate(lo as usize);
    Some((end - lo, buf))
}

/// Whether control never continues to the next instruction after `ins`.
fn ends_flow(ins: &Instruction) -> bool {
    matches!(
        ins.flow_control(),
        FlowControl::Return | FlowControl::UnconditionalBranch | FlowControl::IndirectBranch
    ) || matches!(
        ins.mnemonic(),
        Mnemonic::Ud0 | Mnemonic::Ud1 | Mnemonic::Ud2 | Mnemonic::Int3 | Mnemonic::Hlt
    )
}

/// The direct target of a near branch or call (`jmp`, `jcc`, `call`, `loop`, `jrcxz`,
/// `xbegin`), if `ins` is one.
fn direct_target(ins: &Instruction) -> Option<u64> {
    (0..ins.op_count())
        .any(|i| {
            matches!(
                ins.op_kind(i),
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
            )
        })
        .then(|| ins.near_branch_target())
}

fn is_rip_relative(ins: &Instruction) -> bool {
    ins.is_ip_rel_memory_operand()
}

/// The half-open stolen range, as a helper for the "strictly inside" checks.
#[derive(Clone, Copy)]
struct Range {
    start: u64,
    end: u64,
}

impl Range {
    fn contains(&self, a: u64) -> bool {
        self.start <= a && a < self.end
    }
    fn strictly_inside(&self, a: u64) -> bool {
        self.start < a && a < self.end
    }
}

/// Decides which instructions a probe at `site` steals, and whether that is safe.
///
/// For [`ProbeKind::Entry`], `site` must be `func.address`; the returned site is moved
/// past a leading `endbr64`. For [`ProbeKind::Offset`], `site` must be the start of an
/// instruction of the function, which is checked by decoding from the function start.
pub fn analyze(
    func: &Function,
    site: u64,
    kind: ProbeKind,
    mem: &dyn Memory,
) -> Result<Stolen, Refusal> {
    if kind == ProbeKind::Entry && site != func.address {
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

    let mut decoder = Decoder::with_ip(64, &code, func.address, DecoderOptions::NONE);
    let mut all: Vec<Instruction> = Vec::new();
    while decoder.can_decode() {
        let ins = decoder.decode();
        if ins.is_invalid() && decoder.last_error() == iced_x86::DecoderError::NoMoreBytes {
            // Cut at the end of the window or of the symbol: nothing more to decode.
            break;
        }
        all.push(ins);
    }

    let mut site = site;
    let mut skipped_endbr64 = false;
    if kind == ProbeKind::Entry {
        if let Some(first) = all.first() {
            if first.code() == Code::Endbr64 {
                site += ENDBR64_LEN;
                skipped_endbr64 = true;
            }
        }
    }

    if site < func.address || site >= code_end {
        return Err(Refusal::SiteOutsideFunction {
            site,
            function: func.address,
            end: code_end,
        });
    }
    // No instruction starting at or after the site: it is inside the last one, if that
    // one reaches it (the bytes past a cut-off instruction decode to nothing).
    let first = all.iter().position(|i| i.ip() >= site).unwrap_or(all.len());
    if first == all.len() && all.last().is_none_or(|i| i.next_ip() <= site) {
        return Err(Refusal::SiteOutsideFunction {
            site,
            function: func.address,
            end: code_end,
        });
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

    // Take whole instructions until the patch is covered.
    let mut stolen: Vec<Instruction> = Vec::new();
    let mut covered = 0usize;
    for ins in &all[first..] {
        if ins.is_invalid() {
            return Err(undecodable(ins.ip(), &code, func.address));
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
            break;
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
    if covered < PATCH_LEN {
        // Ran out of decodable bytes (end of a readable mapping).
        let address = site + covered as u64;
        return Err(Refusal::Unreadable {
            address,
            len: (PATCH_LEN - covered) as u64,
        });
    }
    let range = Range {
        start: site,
        end: site + covered as u64,
    };
    let stolen_ips: HashSet<u64> = stolen.iter().map(|i| i.ip()).collect();

    check_stolen(&stolen, range, &stolen_ips)?;
    check_function(func, &all, range, code_end, mem)?;
    check_neighbours(func.address, code_end, range, mem)?;

    let off = (site - func.address) as usize;
    Ok(Stolen {
        function: *func,
        kind,
        site,
        len: covered,
        original: code[off..off + covered].to_vec(),
        instructions: stolen,
        skipped_endbr64,
    })
}

fn undecodable(address: u64, code: &[u8], base: u64) -> Refusal {
    let off = (address - base) as usize;
    let bytes = code[off..code.len().min(off + 15)].to_vec();
    Refusal::Undecodable { address, bytes }
}

/// Checks on the stolen instructions themselves: that each one means the same thing
/// when executed from the trampoline.
fn check_stolen(
    stolen: &[Instruction],
    range: Range,
    stolen_ips: &HashSet<u64>,
) -> Result<(), Refusal> {
    for ins in stolen {
        let unrelocatable = |reason| Refusal::Unrelocatable {
            address: ins.ip(),
            mnemonic: ins.mnemonic(),
            reason,
        };
        match ins.flow_control() {
            // Far transfers carry absolute selectors/offsets; they cannot appear in
            // 64-bit user code except as indirect forms, which need no relocation.
            FlowControl::Call | FlowControl::UnconditionalBranch
                if matches!(ins.op0_kind(), OpKind::FarBranch16 | OpKind::FarBranch32) =>
            {
                return Err(unrelocatable("far direct branches are not supported"));
            }
            _ => {}
        }
        if let Some(target) = direct_target(ins) {
            if ins.flow_control() == FlowControl::Call {
                // A call whose target is the next instruction is the "get my own address"
                // idiom (`call 1f; 1: pop reg`): relocated, it would observe the
                // trampoline's address instead of the original one.
                if target == ins.next_ip() {
                    return Err(unrelocatable(
                        "it calls the next instruction to learn its own address",
                    ));
                }
                if range.strictly_inside(target) {
                    return Err(branch_into(ins, target, range));
                }
            } else if range.contains(target) && !stolen_ips.contains(&target) {
                // Internal branches are fine when they land on a stolen instruction:
                // the block encoder keeps them internal. Anything else would land in the
                // middle of a re-encoded instruction.
                return Err(branch_into(ins, target, range));
            }
        }
        check_rip_relative(ins, range)?;
    }
    Ok(())
}

/// The refusal for a direct branch or call from `ins` to `target`, inside the stolen
/// bytes.
fn branch_into(ins: &Instruction, target: u64, range: Range) -> Refusal {
    Refusal::BranchIntoStolen {
        from: ins.ip(),
        mnemonic: ins.mnemonic(),
        target,
        stolen_start: range.start,
        stolen_end: range.end,
    }
}

/// The rule for RIP-relative operands, stolen or not: taking the address of the site
/// itself (`lea reg, [rip+site]`, e.g. to pass the function as a callback) is fine,
/// since calls through it reach the patch and re-encoding keeps the absolute value. Any
/// other reference into the stolen bytes either reads code the patch changes or
/// materialises an address inside it that could be jumped to.
fn check_rip_relative(ins: &Instruction, range: Range) -> Result<(), Refusal> {
    if !is_rip_relative(ins) {
        return Ok(());
    }
    let target = ins.ip_rel_memory_address();
    let is_lea = ins.mnemonic() == Mnemonic::Lea;
    if range.strictly_inside(target) || (target == range.start && !is_lea) {
        return Err(Refusal::RipRelativeIntoStolen {
            address: ins.ip(),
            mnemonic: ins.mnemonic(),
            target,
        });
    }
    Ok(())
}

/// Checks on the whole function (or scan window): nothing else may reach strictly
/// inside the stolen bytes.
fn check_function(
    func: &Function,
    all: &[Instruction],
    range: Range,
    code_end: u64,
    mem: &dyn Memory,
) -> Result<(), Refusal> {
    let body = Range {
        start: func.address,
        end: code_end,
    };
    let mut info = InstructionInfoFactory::new();
    for (idx, ins) in all.iter().enumerate() {
        if ins.is_invalid() || range.contains(ins.ip()) {
            // Stolen instructions were checked by `check_stolen`. Undecodable bytes
            // elsewhere are data or padding in a linear sweep; they hold no branch.
            continue;
        }
        if let Some(target) = direct_target(ins) {
            if range.strictly_inside(target) {
                return Err(branch_into(ins, target, range));
            }
        }
        check_rip_relative(ins, range)?;
        if ins.flow_control() == FlowControl::IndirectBranch {
            check_indirect_jump(all, idx, range, body, mem, &mut info)?;
        }
    }
    Ok(())
}

/// Best-effort scan of the code around the function for direct branches into the
/// stolen bytes.
///
/// Hand-written functions can have several entry points, and their neighbours jump
/// into them: in glibc 2.36 `__mempcpy_sse2_unaligned` ends with `jmp memcpy+3`, right
/// into the bytes an entry probe on `memcpy@GLIBC_2.2.5` steals. Compiler-split cold
/// parts (`foo.cold`) jump back into their function the same way. Neither shows up
/// inside the symbol's bounds. A linear sweep from an arbitrary address can decode a
/// few instructions out of step before it synchronises, so this can miss a branch; it
/// refuses more, never less, than the in-function checks alone.
fn check_neighbours(start: u64, end: u64, range: Range, mem: &dyn Memory) -> Result<(), Refusal> {
    let after = Function {
        address: end,
        size: None,
    };
    let areas = [
        read_back(start, NEIGHBOUR_WINDOW, mem),
        read_window(&after, end.saturating_add(NEIGHBOUR_WINDOW), mem)
            .ok()
            .map(|c| (end, c)),
    ];
    for (address, code) in areas.into_iter().flatten() {
        let decoder = Decoder::with_ip(64, &code, address, DecoderOptions::NONE);
        for ins in decoder {
            if let Some(target) = direct_target(&ins) {
                if range.strictly_inside(target) {
                    return Err(branch_into(&ins, target, range));
                }
            }
        }
    }
    Ok(())
}

/// Where an indirect jump can go, as far as it matters here.
///
/// Soundness argument. A `jmp reg`/`jmp [mem]` can land strictly inside the stolen bytes
/// only if an address strictly inside them exists somewhere as a value. Such a value can
/// come from:
/// 1. a RIP-relative `lea`/load in this function: refused function-wide by
///    `check_function` (any RIP-relative reference strictly inside the stolen bytes);
/// 2. a return address pushed by a stolen `call`: relocation re-encodes the call so the
///    pushed address is in the trampoline instead;
/// 3. a table of code addresses or offsets in data (switch tables, computed-goto
///    tables). Compilers index such tables with a register: an indexed load feeding the
///    jump. We recognise the PIC switch pattern (`lea rX,[rip+T]; movsxd rY,[rX+rZ*4];
///    add rY,rX; jmp rY`) and tables of absolute 8-byte pointers whose base is known,
///    and read their entries. Any other indexed load or `add` feeding the jump is a
///    table we do not understand: refused.
/// 4. values from other code (function pointers in structures, the GOT, arguments,
///    return values): a jump through them is a tail call to a function entry. C and
///    the usual compilers do not hand out addresses of labels inside another function
///    except through case 3's tables.
///
/// Register definitions are found by walking back linearly up to `DEF_SEARCH_DEPTH`
/// instructions; when no definition is found there, the value comes from further away
/// (an argument or an earlier computation), which is case 4 unless a table load is
/// involved, which would show as an indexed load or `add` near the jump.
fn check_indirect_jump(
    all: &[Instruction],
    idx: usize,
    range: Range,
    body: Range,
    mem: &dyn Memory,
    info: &mut InstructionInfoFactory,
) -> Result<(), Refusal> {
    let jmp = &all[idx];
    let not_understood = || Refusal::IndirectJump {
        address: jmp.ip(),
        mnemonic: jmp.mnemonic(),
    };
    match jmp.op0_kind() {
        OpKind::Memory => {
            if jmp.memory_index() == Register::None {
                // `jmp [rip+GOT]`, `jmp [reg+disp]`, `jmp [abs]`: a single pointer
                // slot, i.e. a tail call (case 4).
                return Ok(());
            }
            // `jmp [base + idx*8 (+disp)]`: a table of absolute pointers.
            if jmp.memory_index_scale() != 8 {
                return Err(not_understood());
            }
            let base = match jmp.memory_base() {
                Register::None => Some(0u64),
                reg => lea_value(all, idx, reg, info),
            };
            let Some(base) = base else {
                return Err(not_understood());
            };
            let table = base.wrapping_add(jmp.memory_displacement64());
            check_pointer_table(jmp.ip(), table, range, body, mem)
        }
        OpKind::Register => {
            let reg = jmp.op0_register().full_register();
            let Some((def_idx, def)) = find_def(all, idx, reg, info) else {
                return Ok(()); // case 4: defined far away, no table nearby.
            };
            match def {
                Def::Write => {
                    let d = &all[def_idx];
                    if d.mnemonic() == Mnemonic::Lea && d.is_ip_rel_memory_operand() {
                        // A direct target materialised in a register; case 1 already
                        // refused it if it points strictly inside the stolen bytes.
                        return Ok(());
                    }
                    if d.mnemonic() == Mnemonic::Mov
                        && d.op0_kind() == OpKind::Register
                        && d.op1_kind() == OpKind::Memory
                        && d.memory_index() != Register::None
                    {
                        // Loaded from an indexed table of absolute pointers.
                        if d.memory_index_scale() != 8 {
                            return Err(not_understood());
                        }
                        let base = match d.memory_base() {
                            Register::None => Some(0u64),
                            r => lea_value(all, def_idx, r, info),
                        };
                        let Some(base) = base else {
                            return Err(not_understood());
                        };
                        let table = base.wrapping_add(d.memory_displacement64());
                        return check_pointer_table(jmp.ip(), table, range, body, mem);
                    }
                    if d.mnemonic() == Mnemonic::Add {
                        return check_pic_switch(all, idx, def_idx, range, body, mem, info)
                            .ok_or_else(not_understood)?;
                    }
                    if (0..d.op_count()).any(|i| d.op_kind(i) == OpKind::Memory)
                        && d.memory_index() != Register::None
                    {
                        // Some other indexed load feeds the jump: a table we do not
                        // understand (case 3).
                        return Err(not_understood());
                    }
                    Ok(())
                }
                Def::Conditional => Err(not_understood()),
            }
        }
        _ => Err(not_understood()),
    }
}

enum Def {
    Write,
    Conditional,
}

/// The closest instruction before `idx` that writes `reg` (any part of it).
fn find_def(
    all: &[Instruction],
    idx: usize,
    reg: Register,
    info: &mut InstructionInfoFactory,
) -> Option<(usize, Def)> {
    let lo = idx.saturating_sub(DEF_SEARCH_DEPTH);
    for i in (lo..idx).rev() {
        let ins = &all[i];
        if ins.is_invalid() {
            return None;
        }
        let used = info.info(ins);
        for u in used.used_registers() {
            if u.register().full_register() != reg {
                continue;
            }
            match u.access() {
                OpAccess::Write | OpAccess::ReadWrite => return Some((i, Def::Write)),
                OpAccess::CondWrite | OpAccess::ReadCondWrite => {
                    return Some((i, Def::Conditional))
                }
                _ => {}
            }
        }
    }
    None
}

/// The value of `reg` just before `all[idx]` if it was set by `lea reg, [rip+X]`
/// (following register-to-register copies).
fn lea_value(
    all: &[Instruction],
    idx: usize,
    reg: Register,
    info: &mut InstructionInfoFactory,
) -> Option<u64> {
    let mut reg = reg.full_register();
    let mut idx = idx;
    for _ in 0..4 {
        let (i, Def::Write) = find_def(all, idx, reg, info)? else {
            return None;
        };
        let d = &all[i];
        if d.mnemonic() == Mnemonic::Lea && d.is_ip_rel_memory_operand() {
            return Some(d.ip_rel_memory_address());
        }
        if d.code() == Code::Mov_r64_rm64 || d.code() == Code::Mov_rm64_r64 {
            if d.op1_kind() != OpKind::Register {
                return None;
            }
            reg = d.op1_register().full_register();
            idx = i;
            continue;
        }
        return None;
    }
    None
}

/// The PIC switch: `lea rX,[rip+T]` ... `movsxd rY,dword [rX+rZ*4]` ... `add rY,rX` ...
/// `jmp rY` (either `add` operand order). Returns `None` if the pattern does not match.
fn check_pic_switch(
    all: &[Instruction],
    jmp_idx: usize,
    add_idx: usize,
    range: Range,
    body: Range,
    mem: &dyn Memory,
    info: &mut InstructionInfoFactory,
) -> Option<Result<(), Refusal>> {
    let add = &all[add_idx];
    if add.code() != Code::Add_r64_rm64 && add.code() != Code::Add_rm64_r64 {
        return None;
    }
    if add.op0_kind() != OpKind::Register || add.op1_kind() != OpKind::Register {
        return None;
    }
    let (a, b) = (add.op0_register(), add.op1_register());
    // One operand is the sign-extended entry, the other the table base from `lea`.
    for (entry_reg, base_reg) in [(a, b), (b, a)] {
        let Some(base) = lea_value(all, add_idx, base_reg, info) else {
            continue;
        };
        let Some((load_idx, Def::Write)) = find_def(all, add_idx, entry_reg, info) else {
            continue;
        };
        let load = &all[load_idx];
        if load.code() == Code::Movsxd_r64_rm32 && load.is_ip_rel_memory_operand() {
            // A switch on a constant (`movsxd rY,[rip+T]`): entry 0 is the target.
            // Reading the following entries too can only add refusals.
            let table = load.ip_rel_memory_address();
            return Some(check_offset_table(
                all[jmp_idx].ip(),
                table,
                base,
                range,
                body,
                mem,
            ));
        }
        if load.code() != Code::Movsxd_r64_rm32
            || load.op1_kind() != OpKind::Memory
            || load.memory_index_scale() != 4
            || load.memory_index() == Register::None
        {
            continue;
        }
        let table_base = match load.memory_base() {
            Register::None => 0,
            r => lea_value(all, load_idx, r, info)?,
        };
        let table = table_base.wrapping_add(load.memory_displacement64());
        return Some(check_offset_table(
            all[jmp_idx].ip(),
            table,
            base,
            range,
            body,
            mem,
        ));
    }
    None
}

/// Reads 32-bit offsets from `table` (target = `base + offset`) while they land in the
/// function, and refuses if one lands strictly inside the stolen bytes.
///
/// The table has no recorded length; the walk ends at the first entry that lands outside
/// the function or cannot be read. Entries past the real end of the table that happen to
/// land in the function can only add refusals, never hide one.
fn check_offset_table(
    jump: u64,
    table: u64,
    base: u64,
    range: Range,
    body: Range,
    mem: &dyn Memory,
) -> Result<(), Refusal> {
    for index in 0..MAX_TABLE_ENTRIES {
        let mut e = [0u8; 4];
        if !mem.read(table.wrapping_add(index * 4), &mut e) {
            break;
        }
        let target = base.wrapping_add(i32::from_le_bytes(e) as i64 as u64);
        if !body.contains(target) {
            break;
        }
        if range.strictly_inside(target) {
            return Err(Refusal::JumpTableIntoStolen {
                jump,
                table,
                index,
                target,
            });
        }
    }
    Ok(())
}

/// Same as [`check_offset_table`] for a table of absolute 8-byte code pointers.
fn check_pointer_table(
    jump: u64,
    table: u64,
    range: Range,
    body: Range,
    mem: &dyn Memory,
) -> Result<(), Refusal> {
    for index in 0..MAX_TABLE_ENTRIES {
        let mut e = [0u8; 8];
        if !mem.read(table.wrapping_add(index * 8), &mut e) {
            break;
        }
        let target = u64::from_le_bytes(e);
        if !body.contains(target) {
            break;
        }
        if range.strictly_inside(target) {
            return Err(Refusal::JumpTableIntoStolen {
                jump,
                table,
                index,
                target,
            });
        }
    }
    Ok(())
}

/// The references to addresses outside the stolen bytes that re-encoding must preserve.
fn external_targets(stolen: &Stolen) -> Vec<(u64, u64)> {
    let range = Range {
        start: stolen.site,
        end: stolen.resume(),
    };
    let mut out = Vec::new();
    for ins in &stolen.instructions {
        if let Some(t) = direct_target(ins) {
            if !range.contains(t) {
                out.push((ins.ip(), t));
            }
        }
        if is_rip_relative(ins) {
            out.push((ins.ip(), ins.ip_rel_memory_address()));
        }
    }
    out
}

/// Margin for the growth of the re-encoded block (widened branches, `loop` expansions)
/// in the reachability pre-check; the exact check happens after encoding.
const BLOCK_SLACK: i64 = 1024;

/// Re-encodes the stolen instructions to run at `new_ip`.
///
/// RIP-relative operands keep their absolute address, short branches are widened,
/// branches between stolen instructions stay internal, and calls are re-encoded so the
/// callee returns into the trampoline. The output is decoded again and checked: no
/// pointer slots, no 32-bit-address forms, every reference to the same absolute address.
pub fn relocate(stolen: &Stolen, new_ip: u64) -> Result<Relocated, Refusal> {
    let externals = external_targets(stolen);
    for &(address, target) in &externals {
        let d = target.wrapping_sub(new_ip) as i64;
        if d < i32::MIN as i64 + BLOCK_SLACK || d > i32::MAX as i64 - BLOCK_SLACK {
            return Err(Refusal::TooFar {
                address,
                target,
                new_ip,
            });
        }
    }
    let block = InstructionBlock::new(&stolen.instructions, new_ip);
    let result = BlockEncoder::encode(
        64,
        block,
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS
            | BlockEncoderOptions::RETURN_RELOC_INFOS,
    )
    .map_err(|e| Refusal::EncodeFailed {
        new_ip,
        message: e.to_string(),
    })?;

    let first_external = || {
        externals.first().map_or(
            Refusal::TooFar {
                address: stolen.site,
                target: stolen.site,
                new_ip,
            },
            |&(address, target)| Refusal::TooFar {
                address,
                target,
                new_ip,
            },
        )
    };
    // A branch or call the encoder could not reach goes through an absolute 8-byte
    // slot after the code, which it reports as a reloc info. (An offset of u32::MAX
    // alone is not a sign of that: `jrcxz`/`loop` expanded into a short hop over a
    // `jmp rel32` also get it.)
    if !result.reloc_infos.is_empty()
        || result.new_instruction_offsets.len() != stolen.instructions.len()
    {
        return Err(first_external());
    }
    verify(stolen, new_ip, &result.code_buffer, &externals)?;

    let falls_through = !stolen.instructions.last().is_some_and(ends_flow);
    Ok(Relocated {
        new_ip,
        bytes: result.code_buffer,
        resume: stolen.resume(),
        instruction_offsets: result.new_instruction_offsets,
        falls_through,
    })
}

/// Decodes the re-encoded block and checks every reference it makes.
fn verify(
    stolen: &Stolen,
    new_ip: u64,
    code: &[u8],
    externals: &[(u64, u64)],
) -> Result<(), Refusal> {
    let out = Range {
        start: new_ip,
        end: new_ip + code.len() as u64,
    };
    let allowed: HashSet<u64> = externals.iter().map(|&(_, t)| t).collect();
    let mut decoder = Decoder::with_ip(64, code, new_ip, DecoderOptions::NONE);
    let mut starts = HashSet::new();
    let mut decoded = Vec::new();
    while decoder.can_decode() {
        let ins = decoder.decode();
        if ins.is_invalid() {
            return Err(Refusal::EncodeFailed {
                new_ip,
                message: format!("the re-encoded bytes do not decode at {:#x}", ins.ip()),
            });
        }
        starts.insert(ins.ip());
        decoded.push(ins);
    }
    let bad = |ins: &Instruction, target: u64| -> Refusal {
        // Attribute the problem to the original instruction it came from.
        let original = externals
            .iter()
            .find(|&&(_, t)| t == target)
            .map_or(stolen.site, |&(a, _)| a);
        let _ = ins;
        Refusal::TooFar {
            address: original,
            target,
            new_ip,
        }
    };
    for ins in &decoded {
        if ins.memory_base() == Register::EIP {
            // A 32-bit address form: only correct if the trampoline is below 4 GiB.
            return Err(bad(ins, ins.ip_rel_memory_address()));
        }
        if is_rip_relative(ins) {
            let t = ins.ip_rel_memory_address();
            if out.contains(t) || !allowed.contains(&t) {
                // A pointer slot after the code, or a changed reference.
                return Err(bad(ins, t));
            }
        }
        if let Some(t) = direct_target(ins) {
            if out.contains(t) {
                if !starts.contains(&t) {
                    return Err(Refusal::EncodeFailed {
                        new_ip,
                        message: format!(
                            "the re-encoded branch at {:#x} lands inside an instruction",
                            ins.ip()
                        ),
                    });
                }
            } else if !allowed.contains(&t) {
                return Err(bad(ins, t));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::code_asm::*;
    use iced_x86::MemoryOperand;

    const BASE: u64 = 0x7f12_3456_0000;
    const GIB: u64 = 1 << 30;

    fn assemble(base: u64, build: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
        let mut a = CodeAssembler::new(64).unwrap();
        build(&mut a);
        a.assemble(base).unwrap()
    }

    fn entry(bytes: &[u8], size: Option<u64>) -> Result<Stolen, Refusal> {
        let mem = SliceMemory { base: BASE, bytes };
        let func = Function {
            address: BASE,
            size,
        };
        analyze(&func, BASE, ProbeKind::Entry, &mem)
    }

    fn sized(bytes: &[u8]) -> Result<Stolen, Refusal> {
        entry(bytes, Some(bytes.len() as u64))
    }

    /// `code` with a RIP-relative memory operand at the absolute address `target`
    /// (`CodeAssembler` takes a plain address as an absolute operand).
    fn rip_rel(a: &mut CodeAssembler, code: Code, reg: Option<Register>, target: u64) {
        let m = MemoryOperand::with_base_displ(Register::RIP, target as i64);
        let ins = match reg {
            Some(r) => Instruction::with2(code, r, m),
            None => Instruction::with1(code, m),
        };
        a.add_instruction(ins.unwrap()).unwrap();
    }

    fn decode_all(bytes: &[u8], ip: u64) -> Vec<Instruction> {
        Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE)
            .into_iter()
            .collect()
    }

    /// The 12-byte leaf Frida refuses: `lea rax,[rsi+rsi]; xor rax,rdi; add rax,7; ret`.
    const LEAF: [u8; 12] = [
        0x48, 0x8d, 0x04, 0x36, 0x48, 0x31, 0xf8, 0x48, 0x83, 0xc0, 0x07, 0xc3,
    ];

    #[test]
    fn twelve_byte_leaf_steals_lea_and_xor() {
        let s = sized(&LEAF).unwrap();
        assert_eq!(s.site, BASE);
        assert_eq!(s.len, 7);
        assert_eq!(s.original, LEAF[..7]);
        assert_eq!(s.instructions.len(), 2);
        assert!(!s.skipped_endbr64);
        let r = relocate(&s, BASE + GIB).unwrap();
        assert_eq!(r.bytes, LEAF[..7]);
        assert_eq!(r.resume, BASE + 7);
        assert_eq!(r.instruction_offsets, vec![0, 4]);
        assert!(r.falls_through);
        // Unknown size: the window scan gives the same answer.
        assert_eq!(entry(&LEAF, None).unwrap().len, 7);
    }

    #[test]
    fn endbr64_stays_in_place() {
        let code = assemble(BASE, |a| {
            a.endbr64().unwrap();
            a.push(rbp).unwrap();
            a.mov(rbp, rsp).unwrap();
            a.mov(eax, edi).unwrap();
            a.pop(rbp).unwrap();
            a.ret().unwrap();
        });
        let s = sized(&code).unwrap();
        assert!(s.skipped_endbr64);
        assert_eq!(s.site, BASE + 4);
        // push rbp (1) + mov rbp,rsp (3) + mov eax,edi (2)
        assert_eq!(s.len, 6);
        assert_eq!(s.original, code[4..10]);
        // An offset probe at the function start does not skip it.
        let mem = SliceMemory {
            base: BASE,
            bytes: &code,
        };
        let f = Function {
            address: BASE,
            size: Some(code.len() as u64),
        };
        let o = analyze(&f, BASE, ProbeKind::Offset, &mem).unwrap();
        assert_eq!((o.site, o.len), (BASE, 5));
    }

    #[test]
    fn rip_relative_operands_keep_their_absolute_address() {
        let data = BASE + 0x800;
        let code = assemble(BASE, |a| {
            rip_rel(a, Code::Mov_r64_rm64, Some(Register::RAX), data);
            rip_rel(a, Code::Lea_r64_m, Some(Register::RCX), data + 8);
            a.add(rax, rcx).unwrap();
            a.ret().unwrap();
        });
        let s = sized(&code).unwrap();
        assert_eq!(s.len, 7); // mov rax,[rip+X] alone covers the patch
        let first = decode_all(&code, BASE)[0];
        assert!(first.is_ip_rel_memory_operand());
        for new_ip in [BASE + GIB, BASE - GIB] {
            let r = relocate(&s, new_ip).unwrap();
            let out = decode_all(&r.bytes, new_ip);
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].memory_base(), Register::RIP);
            assert_eq!(out[0].ip_rel_memory_address(), data);
            assert_ne!(r.bytes, s.original, "the displacement must change");
        }
        // lea first (7 bytes too): same absolute address.
        let code = assemble(BASE, |a| {
            rip_rel(a, Code::Lea_r64_m, Some(Register::RAX), data);
            a.ret().unwrap();
        });
        let s = sized(&code).unwrap();
        let r = relocate(&s, BASE + GIB).unwrap();
        assert_eq!(
            decode_all(&r.bytes, BASE + GIB)[0].ip_rel_memory_address(),
            data
        );
    }

    #[test]
    fn short_jcc_is_widened_with_the_same_target() {
        let code = assemble(BASE, |a| {
            let mut l = a.create_label();
            a.test(rdi, rdi).unwrap();
            a.je(l).unwrap();
            a.mov(eax, 1).unwrap();
            a.ret().unwrap();
            a.set_label(&mut l).unwrap();
            a.mov(eax, 2).unwrap();
            a.ret().unwrap();
        });
        let ins = decode_all(&code, BASE);
        assert_eq!(ins[1].code(), Code::Je_rel8_64);
        let target_ip = ins[1].near_branch_target();
        let s = sized(&code).unwrap();
        assert_eq!(s.len, 5);
        let new_ip = BASE + GIB;
        let r = relocate(&s, new_ip).unwrap();
        let out = decode_all(&r.bytes, new_ip);
        assert_eq!(out[1].code(), Code::Je_rel32_64);
        assert_eq!(out[1].near_branch_target(), target_ip);
    }

    #[test]
    fn call_rel32_is_recreated_at_the_new_address() {
        let callee = BASE + 0x5000;
        let code = assemble(BASE, |a| {
            a.xor(eax, eax).unwrap();
            a.call(callee).unwrap();
            a.add(rax, 1).unwrap();
            a.ret().unwrap();
        });
        let s = sized(&code).unwrap();
        assert_eq!(s.len, 7);
        let new_ip = BASE - GIB;
        let r = relocate(&s, new_ip).unwrap();
        let out = decode_all(&r.bytes, new_ip);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].code(), Code::Call_rel32_64);
        assert_eq!(out[1].near_branch_target(), callee);
        // The return address is the end of the relocated block, where the trampoline
        // continues.
        assert_eq!(out[1].next_ip(), new_ip + r.bytes.len() as u64);
    }

    #[test]
    fn branch_between_stolen_instructions_stays_internal() {
        // test edi,edi; je next; lea eax,[rdi+1]; ret
        let code = [0x85, 0xff, 0x74, 0x00, 0x8d, 0x47, 0x01, 0xc3];
        let s = sized(&code).unwrap();
        assert_eq!(s.len, 7);
        let new_ip = BASE + GIB;
        let r = relocate(&s, new_ip).unwrap();
        let out = decode_all(&r.bytes, new_ip);
        let je = out.iter().find(|i| i.mnemonic() == Mnemonic::Je).unwrap();
        assert_eq!(
            je.near_branch_target(),
            new_ip + u64::from(r.instruction_offsets[2])
        );
    }

    #[test]
    fn jump_to_exactly_the_site_is_fine() {
        let code = assemble(BASE, |a| {
            let mut top = a.create_label();
            a.set_label(&mut top).unwrap();
            a.dec(edi).unwrap();
            a.add(eax, 3).unwrap();
            a.test(edi, edi).unwrap();
            a.jne(top).unwrap();
            a.ret().unwrap();
        });
        assert!(sized(&code).is_ok(), "{:?}", sized(&code));
    }

    #[test]
    fn back_jump_into_stolen_bytes_is_refused() {
        let code = assemble(BASE, |a| {
            let mut l = a.create_label();
            a.xor(eax, eax).unwrap();
            a.set_label(&mut l).unwrap();
            a.add(eax, 3).unwrap();
            a.dec(edi).unwrap();
            a.jne(l).unwrap();
            a.ret().unwrap();
        });
        let inner = BASE + 2; // the `add` after the 2-byte `xor`
        match sized(&code) {
            Err(Refusal::BranchIntoStolen {
                target,
                mnemonic: Mnemonic::Jne,
                stolen_start,
                stolen_end,
                ..
            }) => {
                assert_eq!(target, inner);
                assert_eq!(stolen_start, BASE);
                assert!(stolen_end > inner);
            }
            other => panic!("{other:?}"),
        }
        // Without a known size the window scan finds it too.
        assert!(matches!(
            entry(&code, None),
            Err(Refusal::BranchIntoStolen { .. })
        ));
    }

    #[test]
    fn neighbour_entering_the_stolen_bytes_is_refused() {
        // Like glibc's `mempcpy: mov rax,rdi; add rax,rdx; jmp memcpy+3` right before
        // `memcpy: mov rax,rdi; cmp rdx,0x10; ...`.
        let memcpy = BASE + 0x10;
        let code = assemble(BASE, |a| {
            a.mov(rax, rdi).unwrap();
            a.add(rax, rdx).unwrap();
            a.jmp(memcpy + 3).unwrap();
            a.nops_with_size(0x10 - 8).unwrap();
            a.mov(rax, rdi).unwrap();
            a.cmp(rdx, 0x10).unwrap();
            a.ret().unwrap();
        });
        assert_eq!(decode_all(&code, BASE)[2].len(), 2);
        let mem = SliceMemory {
            base: BASE,
            bytes: &code,
        };
        let f = Function {
            address: memcpy,
            size: Some(code.len() as u64 - 0x10),
        };
        match analyze(&f, memcpy, ProbeKind::Entry, &mem) {
            Err(Refusal::BranchIntoStolen { from, target, .. }) => {
                assert_eq!((from, target), (BASE + 6, memcpy + 3));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tiny_function_is_refused() {
        // lea eax,[rdi+1]; ret
        let code = [0x8d, 0x47, 0x01, 0xc3];
        assert!(matches!(
            sized(&code),
            Err(Refusal::FunctionTooShort { available: 4, .. })
        ));
        // Unknown size, followed by padding: the `ret` stops the steal.
        let padded = [0x8d, 0x47, 0x01, 0xc3, 0xcc, 0xcc, 0xcc, 0xcc];
        match entry(&padded, None) {
            Err(Refusal::EndsTooSoon {
                address,
                mnemonic: Mnemonic::Ret,
                covered: 4,
                ..
            }) => assert_eq!(address, BASE + 3),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn flow_enders_before_five_bytes_are_refused() {
        for (code, m) in [
            (vec![0x31, 0xc0, 0xeb, 0x10, 0x90, 0x90], Mnemonic::Jmp), // xor; jmp short
            (vec![0x31, 0xc0, 0x0f, 0x0b, 0x90, 0x90], Mnemonic::Ud2),
            (vec![0x31, 0xc0, 0xcc, 0x90, 0x90, 0x90], Mnemonic::Int3),
            (vec![0x31, 0xc0, 0xf4, 0x90, 0x90, 0x90], Mnemonic::Hlt),
            (vec![0x31, 0xc0, 0xff, 0xe0, 0x90, 0x90], Mnemonic::Jmp), // jmp rax
        ] {
            match sized(&code) {
                Err(Refusal::EndsTooSoon { mnemonic, .. }) => assert_eq!(mnemonic, m),
                other => panic!("{code:02x?}: {other:?}"),
            }
        }
    }

    #[test]
    fn jmp_rel32_thunk_is_stolen_whole() {
        let target = BASE + 0x12345;
        let code = assemble(BASE, |a| a.jmp(target).unwrap());
        assert_eq!(code.len(), 5);
        let s = sized(&code).unwrap();
        let r = relocate(&s, BASE + GIB).unwrap();
        assert!(!r.falls_through);
        assert_eq!(
            decode_all(&r.bytes, BASE + GIB)[0].near_branch_target(),
            target
        );
    }

    #[test]
    fn an_offset_inside_the_last_instruction_is_no_boundary() {
        // xor rax, rax; add rax, 1 (4 bytes, the function's last).
        let code = [0x48, 0x31, 0xc0, 0x48, 0x83, 0xc0, 0x01];
        let mem = SliceMemory {
            base: BASE,
            bytes: &code,
        };
        let f = Function {
            address: BASE,
            size: Some(code.len() as u64),
        };
        match analyze(&f, BASE + 5, ProbeKind::Offset, &mem) {
            Err(Refusal::NotInstructionBoundary {
                instruction,
                mnemonic: Mnemonic::Add,
                ..
            }) => assert_eq!(instruction, BASE + 3),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn offset_probes_need_an_instruction_boundary() {
        let mem = SliceMemory {
            base: BASE,
            bytes: &LEAF,
        };
        let f = Function {
            address: BASE,
            size: Some(12),
        };
        match analyze(&f, BASE + 2, ProbeKind::Offset, &mem) {
            Err(Refusal::NotInstructionBoundary {
                instruction,
                mnemonic: Mnemonic::Lea,
                ..
            }) => assert_eq!(instruction, BASE),
            other => panic!("{other:?}"),
        }
        // At the `xor`: xor (3) + add (4).
        let s = analyze(&f, BASE + 4, ProbeKind::Offset, &mem).unwrap();
        assert_eq!((s.site, s.len), (BASE + 4, 7));
        // At the `add`: `add` (4) + `ret` (1) cover exactly five bytes of the function.
        let s = analyze(&f, BASE + 7, ProbeKind::Offset, &mem).unwrap();
        assert_eq!((s.len, s.instructions.len()), (5, 2));
        assert!(!relocate(&s, BASE + GIB).unwrap().falls_through);
        // One byte further is inside `add`.
        assert!(matches!(
            analyze(&f, BASE + 8, ProbeKind::Offset, &mem),
            Err(Refusal::NotInstructionBoundary { .. })
        ));
        assert!(matches!(
            analyze(&f, BASE + 12, ProbeKind::Offset, &mem),
            Err(Refusal::SiteOutsideFunction { .. })
        ));
        assert!(matches!(
            analyze(&f, BASE + 4, ProbeKind::Entry, &mem),
            Err(Refusal::EntryNotAtFunctionStart { .. })
        ));
    }

    #[test]
    fn undecodable_and_unreadable_are_refused() {
        // 0x06 (push es) does not exist in 64-bit mode.
        let code = [0x06, 0x90, 0x90, 0x90, 0x90, 0xc3];
        assert!(matches!(
            sized(&code),
            Err(Refusal::Undecodable { address: BASE, .. })
        ));
        let mem = SliceMemory {
            base: BASE,
            bytes: &LEAF,
        };
        let f = Function {
            address: BASE,
            size: Some(100),
        };
        assert!(matches!(
            analyze(&f, BASE, ProbeKind::Entry, &mem),
            Err(Refusal::Unreadable { .. })
        ));
        let f = Function {
            address: BASE,
            size: Some(u64::MAX),
        };
        assert!(matches!(
            analyze(&f, BASE, ProbeKind::Entry, &mem),
            Err(Refusal::Unreadable { .. })
        ));
        let f = Function {
            address: BASE - 0x1000,
            size: None,
        };
        assert!(matches!(
            analyze(&f, BASE - 0x1000, ProbeKind::Entry, &mem),
            Err(Refusal::Unreadable { .. })
        ));
    }

    #[test]
    fn references_into_stolen_bytes_are_refused() {
        // mov rax,[rip+site+2] inside the stolen bytes: reads code the patch changes.
        let code = assemble(BASE, |a| {
            rip_rel(a, Code::Mov_r64_rm64, Some(Register::RAX), BASE + 2);
            a.ret().unwrap();
        });
        assert!(matches!(
            sized(&code),
            Err(Refusal::RipRelativeIntoStolen { target, .. }) if target == BASE + 2
        ));
        // Elsewhere in the function: lea of an address strictly inside.
        let code = assemble(BASE, |a| {
            a.push(rbx).unwrap();
            a.mov(rbx, rdi).unwrap();
            rip_rel(a, Code::Lea_r64_m, Some(Register::RAX), BASE + 1);
            a.pop(rbx).unwrap();
            a.ret().unwrap();
        });
        assert!(matches!(
            sized(&code),
            Err(Refusal::RipRelativeIntoStolen { target, .. }) if target == BASE + 1
        ));
        // ... but taking the function's own address is fine.
        let code = assemble(BASE, |a| {
            a.push(rbx).unwrap();
            a.mov(rbx, rdi).unwrap();
            rip_rel(a, Code::Lea_r64_m, Some(Register::RAX), BASE);
            a.pop(rbx).unwrap();
            a.ret().unwrap();
        });
        assert!(sized(&code).is_ok());
        // A call strictly inside the stolen bytes from later in the function.
        let code = assemble(BASE, |a| {
            a.push(rbx).unwrap();
            a.mov(rbx, rdi).unwrap();
            a.call(BASE + 1).unwrap();
            a.pop(rbx).unwrap();
            a.ret().unwrap();
        });
        assert!(matches!(
            sized(&code),
            Err(Refusal::BranchIntoStolen {
                mnemonic: Mnemonic::Call,
                ..
            })
        ));
        // The get-my-address idiom `call next; pop rax`.
        let code = [0xe8, 0, 0, 0, 0, 0x58, 0xc3];
        assert!(matches!(
            sized(&code),
            Err(Refusal::Unrelocatable {
                mnemonic: Mnemonic::Call,
                ..
            })
        ));
    }

    /// `lea rdx,[rip+T]; movsxd rax,[rdx+rdi*4]; add rax,rdx; jmp rax` with cases, and
    /// the table after the code. `case_offset` chooses where case 0 goes.
    fn switch(case0: Option<u64>) -> (Vec<u8>, u64) {
        let mut code = assemble(BASE, |a| {
            let mut table = a.create_label();
            a.push(rbx).unwrap();
            a.mov(ebx, edi).unwrap();
            a.lea(rdx, ptr(table)).unwrap();
            a.movsxd(rax, dword_ptr(rdx + rdi * 4)).unwrap();
            a.add(rax, rdx).unwrap();
            a.jmp(rax).unwrap();
            a.mov(eax, 1).unwrap();
            a.pop(rbx).unwrap();
            a.ret().unwrap();
            a.set_label(&mut table).unwrap();
            // Entry 0, entry 1, then something that is not an offset into the function.
            a.dd(&[0, 0, 0x4000_0000]).unwrap();
        });
        let table_ip = BASE + code.len() as u64 - 12;
        let ins = decode_all(&code[..code.len() - 12], BASE);
        let lea = ins.iter().find(|i| i.mnemonic() == Mnemonic::Lea).unwrap();
        assert_eq!(lea.ip_rel_memory_address(), table_ip);
        let case1 = ins
            .iter()
            .find(|i| i.code() == Code::Mov_r32_imm32)
            .unwrap()
            .ip();
        let entry = |t: u64| (t.wrapping_sub(table_ip) as i32).to_le_bytes();
        let n = code.len();
        code[n - 12..n - 8].copy_from_slice(&entry(case0.unwrap_or(case1)));
        code[n - 8..n - 4].copy_from_slice(&entry(case1));
        (code, table_ip)
    }

    #[test]
    fn jump_tables_are_read() {
        let (code, _) = switch(None);
        assert!(sized(&code).is_ok(), "{:?}", sized(&code));
        let (code, table) = switch(Some(BASE + 1));
        match sized(&code) {
            Err(Refusal::JumpTableIntoStolen {
                table: t,
                index: 0,
                target,
                ..
            }) => {
                assert_eq!(t, table);
                assert_eq!(target, BASE + 1);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn constant_switch_is_read() {
        // movsxd rax,[rip+T]; lea rsi,[rip+T]; add rax,rsi; jmp rax; T: dd entry
        let table = BASE + 0x40;
        let build = |entry: u64| {
            let mut code = assemble(BASE, |a| {
                a.push(rbx).unwrap();
                a.pop(rbx).unwrap();
                rip_rel(a, Code::Movsxd_r64_rm32, Some(Register::RAX), table);
                rip_rel(a, Code::Lea_r64_m, Some(Register::RSI), table);
                a.add(rax, rsi).unwrap();
                a.jmp(rax).unwrap();
                a.ret().unwrap();
            });
            code.resize(0x40, 0xcc);
            code.extend_from_slice(&(entry.wrapping_sub(table) as i32).to_le_bytes());
            code
        };
        // An entry landing in the function but outside the stolen bytes (the padding).
        let ok = build(BASE + 0x3f);
        assert_eq!(decode_all(&ok, BASE)[5].mnemonic(), Mnemonic::Jmp);
        assert!(sized(&ok).is_ok(), "{:?}", sized(&ok));
        assert!(matches!(
            sized(&build(BASE + 2)),
            Err(Refusal::JumpTableIntoStolen { table: t, index: 0, .. }) if t == table
        ));
    }

    #[test]
    fn indirect_jumps() {
        // Tail call through a structure pointer: fine.
        let code = assemble(BASE, |a| {
            a.mov(rax, qword_ptr(rdi + 8)).unwrap();
            a.mov(rdi, rsi).unwrap();
            a.jmp(rax).unwrap();
        });
        assert!(sized(&code).is_ok());
        // Tail call through the GOT: fine.
        let code = assemble(BASE, |a| {
            a.mov(rdi, rsi).unwrap();
            a.add(rdi, 8).unwrap();
            rip_rel(a, Code::Jmp_rm64, None, BASE + 0x2000);
        });
        assert!(sized(&code).is_ok());
        // A computed jump that is not a recognised table: refused.
        let code = assemble(BASE, |a| {
            a.push(rbx).unwrap();
            a.pop(rbx).unwrap();
            a.mov(rax, qword_ptr(rsi + rdi * 4)).unwrap();
            a.jmp(rax).unwrap();
        });
        assert!(matches!(
            sized(&code),
            Err(Refusal::IndirectJump {
                mnemonic: Mnemonic::Jmp,
                ..
            })
        ));
        let code = assemble(BASE, |a| {
            a.push(rbx).unwrap();
            a.pop(rbx).unwrap();
            a.add(rax, rdi).unwrap();
            a.jmp(rax).unwrap();
        });
        assert!(matches!(sized(&code), Err(Refusal::IndirectJump { .. })));
    }

    #[test]
    fn too_far_is_refused() {
        let data = BASE + 0x800;
        let code = assemble(BASE, |a| {
            rip_rel(a, Code::Mov_r64_rm64, Some(Register::RAX), data);
            a.ret().unwrap();
        });
        let s = sized(&code).unwrap();
        match relocate(&s, BASE + 3 * GIB) {
            Err(Refusal::TooFar {
                address, target, ..
            }) => assert_eq!((address, target), (BASE, data)),
            other => panic!("{other:?}"),
        }
        let code = assemble(BASE, |a| {
            a.call(BASE + 0x5000).unwrap();
            a.ret().unwrap();
        });
        let s = sized(&code).unwrap();
        assert!(matches!(
            relocate(&s, BASE - 3 * GIB),
            Err(Refusal::TooFar { .. })
        ));
        // A target below 4 GiB would let the encoder fall back to `[eip+X]`.
        let low = 0x4000_0000;
        let code = assemble(low, |a| {
            rip_rel(a, Code::Mov_r64_rm64, Some(Register::RAX), low + 0x800);
            a.ret().unwrap();
        });
        let mem = SliceMemory {
            base: low,
            bytes: &code,
        };
        let f = Function {
            address: low,
            size: Some(code.len() as u64),
        };
        let s = analyze(&f, low, ProbeKind::Entry, &mem).unwrap();
        assert!(matches!(
            relocate(&s, low + 3 * GIB),
            Err(Refusal::TooFar { .. })
        ));
        // No reference at all: any distance works.
        let s = sized(&LEAF).unwrap();
        assert!(relocate(&s, BASE + 100 * GIB).is_ok());
    }

    #[test]
    fn refusals_read_as_sentences() {
        let e = sized(&[0x8d, 0x47, 0x01, 0xc3]).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("fewer than the 5"), "{text}");
    }

    #[test]
    fn self_memory_reads_and_reports_unmapped() {
        let v = [1u8, 2, 3, 4];
        let mut b = [0u8; 4];
        assert!(SelfMemory.read(v.as_ptr() as u64, &mut b));
        assert_eq!(b, v);
        assert!(!SelfMemory.read(8, &mut b));
    }
}

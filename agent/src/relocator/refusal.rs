//! [`Refusal`]: why a site cannot be probed, in words a user can act on.

use super::PATCH_LEN;
use iced_x86::Mnemonic;
use std::fmt;

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
    /// A direct branch or call lands strictly inside the stolen bytes; or, at an entry,
    /// a jump of the function goes back to its first instruction (`target <=
    /// stolen_start`: a loop headed there, which would count each pass as a call).
    BranchIntoStolen {
        from: u64,
        mnemonic: Mnemonic,
        target: u64,
        stolen_start: u64,
        stolen_end: u64,
    },
    /// A stolen `call` that is not the last stolen instruction: its callee would return
    /// to `returns_to`, inside the bytes the patch overwrites (or into the trampoline).
    ReturnIntoStolen {
        address: u64,
        mnemonic: Mnemonic,
        returns_to: u64,
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
            Refusal::BranchIntoStolen { from, mnemonic, target, stolen_start, .. } if target <= stolen_start => write!(
                f,
                "the `{}` at {from:#x} jumps back to the function's entry {target:#x} (a loop there): each pass would count as a call",
                mn(mnemonic)
            ),
            Refusal::BranchIntoStolen { from, mnemonic, target, stolen_start, stolen_end } => write!(
                f,
                "the `{}` at {from:#x} goes to {target:#x}, inside the bytes {stolen_start:#x}..{stolen_end:#x} the patch would overwrite",
                mn(mnemonic)
            ),
            Refusal::ReturnIntoStolen { address, mnemonic, returns_to } => write!(
                f,
                "the `{}` at {address:#x} returns to {returns_to:#x}, inside the bytes the patch would overwrite",
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

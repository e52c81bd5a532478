//! The built-in call tracer's ABI (`tracer run --trace`): what the agent's entry and exit
//! actions write into their event ring, and where things sit in the trace region.
//!
//! The region is a sealed memfd the agent creates: a pack-style region with no maps (its
//! header and the event ring, `pack::abi::plan(&[], ring_bytes)`), followed by one byte
//! per probe id telling the entry action which argument registers hold C strings
//! ([`mask`]). The tracer writes those bytes through its own mapping before the probes
//! go live; the agent only reads them.

use crate::pack::abi;

/// The exported agent function that creates (or empties) the trace region and returns
/// the shims: `fn(ring_bytes, _, out: *mut StartResult) -> u64` (1 on success).
pub const START_SYMBOL: &str = "tracer_agent_trace_start";

/// Probe ids with a string mask; a probe with a higher id gets its registers only.
pub const MASK_SLOTS: usize = 1 << 20;

/// Bits of a probe's mask byte.
pub mod mask {
    /// Bits 0 to 5: integer argument n (rdi, rsi, rdx, rcx, r8, r9) is a `char *`.
    pub const ARGS: u8 = 0x3f;
    /// The return value is a `char *`.
    pub const RETURN: u8 = 0x40;
}

/// Bytes of a string copied per argument (more is marked truncated).
pub const STR_MAX: usize = 64;

/// [`RecordHead::kind`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    Entry = 1,
    Exit = 2,
}

impl RecordKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(RecordKind::Entry),
            2 => Some(RecordKind::Exit),
            _ => None,
        }
    }
}

/// One call event, the payload of a ring record; [`StrHead`]s and their bytes follow
/// (`strings` of them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RecordHead {
    /// A [`RecordKind`].
    pub kind: u8,
    /// How many strings follow.
    pub strings: u8,
    pub _pad: u16,
    /// The probe's id (its counter slot).
    pub probe: u32,
    /// The calling thread's kernel id.
    pub tid: u32,
    /// Calls of the thread whose returns are awaited, the one at hand excluded: the same
    /// at an entry and at its return, so that the tracer nests calls right even when
    /// records were dropped.
    pub depth: u32,
    /// The timestamp counter at the event.
    pub tsc: u64,
    /// Entry: `rdi rsi rdx rcx r8 r9`. Exit: `rax rdx`, then zeros.
    pub regs: [u64; 6],
    /// Entry: the low 64 bits of `xmm0-3`. Exit: `xmm0`, then zeros.
    pub fregs: [u64; 4],
}

pub const RECORD_HEAD: usize = std::mem::size_of::<RecordHead>();
const _: () = assert!(RECORD_HEAD == 104);

/// Before each string's bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StrHead {
    /// The argument (0 to 5), or [`STR_RETURN`].
    pub arg: u8,
    /// [`str_flags`].
    pub flags: u8,
    /// Bytes that follow (no NUL).
    pub len: u16,
}

pub const STR_HEAD: usize = std::mem::size_of::<StrHead>();
/// [`StrHead::arg`] of the return value's string.
pub const STR_RETURN: u8 = 6;

pub mod str_flags {
    /// The string went on past [`super::STR_MAX`] bytes or into unreadable memory.
    pub const TRUNCATED: u8 = 1;
    /// Not even its first byte was readable: a wild pointer.
    pub const UNREADABLE: u8 = 2;
}

/// The largest payload a record can have.
pub const RECORD_MAX: usize = RECORD_HEAD + 7 * (STR_HEAD + STR_MAX);

/// What [`START_SYMBOL`] returns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StartResult {
    /// The region's memfd in the target.
    pub fd: i32,
    pub _pad: u32,
    /// Its length.
    pub total: u64,
    /// The entry and exit shims (`pack::abi::Shim`) to put in every probe's slots.
    pub entry_shim: u64,
    pub exit_shim: u64,
}

/// The trace region's layout: the pack-style part (header and ring), then the masks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub ring: abi::Plan,
    pub masks: usize,
    pub total: usize,
}

pub fn layout(ring_bytes: usize) -> Result<Layout, abi::PlanError> {
    let ring = abi::plan(&[], ring_bytes)?;
    let masks = ring.total;
    Ok(Layout {
        masks,
        total: masks + MASK_SLOTS,
        ring,
    })
}

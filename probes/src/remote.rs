//! The calls the tracer makes into the agent, by remote function call with every thread
//! stopped. Arguments and results are these `#[repr(C)]` records in target memory.

/// Exported by the agent: `extern "C" fn(capacity: u64) -> *const AgentInfo` (null on
/// failure). Creates the interceptor and the shared counters, with room for `capacity`
/// probes at first (the region grows when preparing needs more: map the memfd at its
/// length after preparing); later calls describe the existing ones.
pub const INIT_SYMBOL: &str = "tracer_agent_init";
/// Exported by the agent: `extern "C" fn(*const PrepareRequest, n: u64, *mut
/// PrepareResult) -> u64`, returning how many probes were prepared.
pub const PREPARE_SYMBOL: &str = "tracer_agent_prepare";
/// Exported by the agent: `extern "C" fn(names: *const c_char, n: u64, out: *mut u64)
/// -> u64`: `n` NUL-terminated names back to back, each resolved in the global scope as
/// the program's own calls are (IFUNCs to the implementation the loader picked); 0 for a
/// name not found. Returns how many were found.
pub const RESOLVE_SYMBOL: &str = "tracer_agent_resolve";
/// Exported by the agent: `extern "C" fn(_: *const u8, cap: u64, out: *mut PrepareResult)
/// -> u64`: the
/// agent's own probes (unwinder hooks that keep C++ exceptions working through
/// exit-probed frames), to be patched along with the user's exit probes.
pub const INTERNAL_SYMBOL: &str = "tracer_agent_internal";
/// Exported by the agent: `extern "C" fn(_: *const u8, cap: u64, out: *mut
/// PrepareResult) -> u64`: every prepared probe whose patch is in the code now (left by
/// a tracer that was killed), at most `cap` written; returns how many there are.
pub const LIVE_SYMBOL: &str = "tracer_agent_live";

pub const AGENT_MAGIC: u64 = u64::from_le_bytes(*b"TRAGENT1");

/// What `tracer_agent_init` returns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AgentInfo {
    pub magic: u64,
    /// The shared counters memfd, in the target's fd table.
    pub shared_fd: i32,
    pub _pad: u32,
    pub shared_len: u64,
    pub capacity: u64,
}

/// One probe to prepare.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PrepareRequest {
    /// Function start.
    pub function: u64,
    /// Function size, 0 when unknown.
    pub size: u64,
    /// Instruction offset for offset probes.
    pub offset: u64,
    /// [`crate::ProbeKind`] as a number.
    pub kind: u32,
    pub _pad: u32,
}

/// Status of a [`PrepareResult`].
pub mod status {
    pub const PREPARED: u32 = 0;
    /// The relocator refused the site; `message` says why.
    pub const REFUSED: u32 = 1;
    /// Another failure (memory, code generation, capacity); `message` says which.
    pub const FAILED: u32 = 2;
}

/// Bits of [`PrepareResult::flags`].
pub mod result_flags {
    /// One of the agent's own probes (an unwinder hook), not one a user asked for.
    pub const INTERNAL: u32 = 1;
}

/// The outcome for one [`PrepareRequest`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PrepareResult {
    pub status: u32,
    /// Counter slot of the probe.
    pub id: u32,
    /// Where the patch goes (past a leading `endbr64`).
    pub site: u64,
    pub trampoline: u64,
    /// `jmp rel32` to write at `site` (5 bytes used).
    pub patch: [u8; 8],
    /// The bytes it replaces (5 bytes used).
    pub original: [u8; 8],
    /// Length of the instructions taken over: no thread may be strictly inside
    /// `site..site + stolen_len` when the patch is written.
    pub stolen_len: u32,
    /// How the trampoline reaches the agent (`rel32`, `rip-slot`, `abs32`, `abs64` as 0-3).
    pub encoding: u32,
    /// [`result_flags`] bits.
    pub flags: u32,
    /// NUL-terminated reason when not prepared.
    pub message: [u8; 212],
}

impl Default for PrepareResult {
    fn default() -> Self {
        PrepareResult {
            status: status::FAILED,
            id: 0,
            site: 0,
            trampoline: 0,
            patch: [0; 8],
            original: [0; 8],
            stolen_len: 0,
            encoding: 0,
            flags: 0,
            message: [0; 212],
        }
    }
}

impl PrepareResult {
    pub fn message(&self) -> String {
        let end = self
            .message
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.message.len());
        String::from_utf8_lossy(&self.message[..end]).into_owned()
    }

    pub fn set_message(&mut self, m: &str) {
        let n = m.len().min(self.message.len() - 1);
        self.message[..n].copy_from_slice(&m.as_bytes()[..n]);
        self.message[n] = 0;
    }
}

const _: () = assert!(std::mem::size_of::<PrepareResult>() == 264);

//! The calls the tracer makes into the agent, by remote function call with every thread
//! stopped. Arguments and results are these `#[repr(C)]` records in target memory.

/// Exported by the agent: `extern "C" fn(capacity: u64) -> *const AgentInfo` (null on
/// failure). Creates the interceptor and the shared counters, with room for `capacity`
/// probes at first (the region grows when preparing needs more: map the memfd at its
/// length after preparing); later calls describe the existing ones.
pub const INIT_SYMBOL: &str = "tracer_agent_init";
/// Exported by the agent: the [`AgentInfo`] its last [`INIT_SYMBOL`] call returned (its
/// `magic` is 0 until the first call completed). A later session reads it instead of
/// calling init again, which would only describe the same interceptor.
pub const INFO_SYMBOL: &str = "tracer_agent_info";
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
/// Exported by the agent: `extern "C" fn(*const PrepareRequest, n: u64, *mut
/// PrepareResult) -> u64`: [`LIVE_SYMBOL`] then [`PREPARE_SYMBOL`] in one call (a later
/// session's adoption and preparation, one remote call and one read of the maps fewer).
/// `out` has room for [`LIVE_CAP_WITH_PREPARE`] live probes followed by the `n` results
/// of the requests; returns how many probes were live (more than the cap: ask
/// [`LIVE_SYMBOL`] for them all, preparing patches nothing).
pub const PREPARE_LIVE_SYMBOL: &str = "tracer_agent_prepare_live";
/// Room for live probes at the head of [`PREPARE_LIVE_SYMBOL`]'s output.
pub const LIVE_CAP_WITH_PREPARE: usize = 16;

/// Exported by the agent: `extern "C" fn(input: *const u8, n: u64, out: *mut u8) -> u64`:
/// `input` is the rendezvous socket's abstract name, a NUL, and the agent file's path, a
/// NUL. Sets [`FOLLOW_ENV`] and puts the path first in `LD_PRELOAD` in the process's
/// environment (so that what it execs loads the agent and checks in), and has its
/// forked children take counters of their own. Returns 1, 0 on bad input.
pub const FOLLOW_SYMBOL: &str = "tracer_agent_follow";
/// The environment variable naming the rendezvous (an abstract unix socket) of a
/// `tracer run` that follows children.
pub const FOLLOW_ENV: &str = "TRACER_FOLLOW";
/// First bytes of what a process says on the rendezvous: a new program image that waits
/// for its probes (the tracer answers [`FOLLOW_GO`] once they are in, or when it gives
/// up), ...
pub const FOLLOW_EXEC: &[u8] = b"exec";
/// ... or a forked child, followed by ` INODE` (the inode of the counter region it copied,
/// its parent's) and carrying its own region's memfd (`SCM_RIGHTS`); no answer.
pub const FOLLOW_FORK: &[u8] = b"fork";
/// The tracer's answer to [`FOLLOW_EXEC`]: run on.
pub const FOLLOW_GO: &[u8] = b"go";
/// How long a new program image waits for the tracer before it runs on untraced.
pub const FOLLOW_WAIT_MS: u64 = 5000;

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

/// Exported by the agent: `extern "C" fn(input: *const u8, n: u64, out: *mut u8) ->
/// u64`: `input` is a [`PackLoadRequest`] followed by its [`PackSymbol`]s (maps, then
/// shims); creates the pack's shared region, binds the pack's maps and ring to it, calls
/// its init, and writes a [`PackLoadResult`] followed by one `u64` address per shim to
/// `out`. With `swap` set, binds the new build to the region of the pack of the same
/// name loaded last (maps kept) and writes its shims into the slots that held the old
/// build's, instead. Returns 1 on success, 0 on failure (the message says why).
pub const LOAD_PACK_SYMBOL: &str = "tracer_agent_load_pack";

/// Longest label a probe's handler sees as its name (longer ones are cut).
pub const LABEL_LEN: usize = 120;

/// One probe to prepare.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PrepareRequest {
    /// Function start.
    pub function: u64,
    /// Function size, 0 when unknown.
    pub size: u64,
    /// Instruction offset for offset probes.
    pub offset: u64,
    /// [`crate::ProbeKind`] as a number.
    pub kind: u32,
    /// Bytes of `label` used.
    pub label_len: u32,
    /// A pack shim (`probes::pack::abi::Shim`) run at entry (or at the offset), 0 for none.
    pub entry_shim: u64,
    /// A pack shim run at return (exit probes), 0 for none.
    pub exit_shim: u64,
    /// The probe's `module:symbol[+offset]`, what a pack handler's `probe_name()` says.
    pub label: [u8; LABEL_LEN],
}

impl Default for PrepareRequest {
    fn default() -> Self {
        PrepareRequest {
            function: 0,
            size: 0,
            offset: 0,
            kind: 0,
            label_len: 0,
            entry_shim: 0,
            exit_shim: 0,
            label: [0; LABEL_LEN],
        }
    }
}

impl PrepareRequest {
    /// Store `label`, cut at a character boundary to fit.
    pub fn set_label(&mut self, label: &str) {
        let mut n = label.len().min(LABEL_LEN);
        while !label.is_char_boundary(n) {
            n -= 1;
        }
        self.label[..n].copy_from_slice(&label.as_bytes()[..n]);
        self.label_len = n as u32;
    }

    /// Whether a pack handler runs at this probe.
    pub fn has_shim(&self) -> bool {
        self.entry_shim != 0 || self.exit_shim != 0
    }
}

/// Head of the input of [`LOAD_PACK_SYMBOL`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PackLoadRequest {
    /// The pack's `dlopen` handle in the target.
    pub handle: u64,
    /// Event ring capacity in bytes.
    pub ring_bytes: u64,
    pub maps: u32,
    pub shims: u32,
    /// Nonzero: hot swap (see [`LOAD_PACK_SYMBOL`]).
    pub swap: u32,
    pub _pad: u32,
    /// The pack's name (its library's), NUL-padded: what a swap matches.
    pub name: [u8; 64],
}

impl Default for PackLoadRequest {
    fn default() -> Self {
        PackLoadRequest {
            handle: 0,
            ring_bytes: 0,
            maps: 0,
            shims: 0,
            swap: 0,
            _pad: 0,
            name: [0; 64],
        }
    }
}

/// A map (kind, params, exported handle) or a shim (symbol only) of a pack to load.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PackSymbol {
    pub kind: u32,
    pub _pad: u32,
    pub params: [u64; 4],
    /// NUL-terminated exported symbol.
    pub symbol: [u8; 88],
}

impl PackSymbol {
    /// None when the name does not fit.
    pub fn new(kind: u32, params: [u64; 4], symbol: &str) -> Option<Self> {
        let mut s = PackSymbol {
            kind,
            _pad: 0,
            params,
            symbol: [0; 88],
        };
        if symbol.len() >= s.symbol.len() || symbol.contains('\0') {
            return None;
        }
        s.symbol[..symbol.len()].copy_from_slice(symbol.as_bytes());
        Some(s)
    }

    pub fn symbol(&self) -> &[u8] {
        let end = self.symbol.iter().position(|&b| b == 0).unwrap_or(0);
        &self.symbol[..end]
    }
}

/// The text of a fixed NUL-terminated message field (all of it when it has no NUL).
fn read_c_message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Writes `m` into a fixed message field, cut to leave room for the NUL that ends it.
fn write_c_message(buf: &mut [u8], m: &str) {
    let n = m.len().min(buf.len() - 1);
    buf[..n].copy_from_slice(&m.as_bytes()[..n]);
    buf[n] = 0;
}

/// Head of the output of [`LOAD_PACK_SYMBOL`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PackLoadResult {
    /// The region's memfd in the target's fd table, -1 on failure.
    pub fd: i32,
    /// The ABI version the pack's init reported.
    pub abi: u32,
    /// The region's length.
    pub total: u64,
    /// Swap: how many handler slots now hold the new build's shims.
    pub swapped: u64,
    /// NUL-terminated reason on failure.
    pub message: [u8; 240],
}

impl Default for PackLoadResult {
    fn default() -> Self {
        PackLoadResult {
            fd: -1,
            abi: 0,
            total: 0,
            swapped: 0,
            message: [0; 240],
        }
    }
}

impl PackLoadResult {
    pub fn message(&self) -> String {
        read_c_message(&self.message)
    }

    pub fn set_message(&mut self, m: &str) {
        write_c_message(&mut self.message, m);
    }
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
    /// Bytes of trampoline code made for this probe, and how many of them are its
    /// relocated instructions (0 and 0 for a probe reused from an earlier session).
    pub code_len: u16,
    pub relocated_len: u16,
    /// NUL-terminated reason when not prepared.
    pub message: [u8; 208],
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
            code_len: 0,
            relocated_len: 0,
            message: [0; 208],
        }
    }
}

impl PrepareResult {
    pub fn message(&self) -> String {
        read_c_message(&self.message)
    }

    pub fn set_message(&mut self, m: &str) {
        write_c_message(&mut self.message, m);
    }
}

/// Marks a record `Pod` after checking at compile time that its size is the sum of its
/// fields' sizes, so no padding byte (uninitialised) can be read through it.
macro_rules! pod_record {
    ($($t:ident { $($f:ty),* }),* $(,)?) => { $(
        const _: () = assert!(std::mem::size_of::<$t>() == 0 $(+ std::mem::size_of::<$f>())*);
        // SAFETY: repr(C) with integer and byte-array fields only, no padding (checked
        // above): every byte pattern is a valid record.
        unsafe impl crate::pod::Pod for $t {}
    )* };
}

pod_record! {
    AgentInfo { u64, i32, u32, u64, u64 },
    PrepareRequest { u64, u64, u64, u32, u32, u64, u64, [u8; LABEL_LEN] },
    PackLoadRequest { u64, u64, u32, u32, u32, u32, [u8; 64] },
    PackSymbol { u32, u32, [u64; 4], [u8; 88] },
    PackLoadResult { i32, u32, u64, u64, [u8; 240] },
    PrepareResult { u32, u32, u64, u64, [u8; 8], [u8; 8], u32, u32, u32, u16, u16, [u8; 208] },
}

const _: () = assert!(std::mem::size_of::<PrepareResult>() == 264);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_long_ones_are_cut_before_the_nul() {
        let mut p = PrepareResult::default();
        p.set_message("refused: jump into stolen bytes");
        assert_eq!(p.message(), "refused: jump into stolen bytes");
        let long = "x".repeat(500);
        p.set_message(&long);
        assert_eq!(p.message(), long[..p.message.len() - 1]);
        let mut l = PackLoadResult::default();
        l.set_message(&long);
        assert_eq!(l.message(), long[..l.message.len() - 1]);
        l.set_message("short");
        assert_eq!(l.message(), "short");
    }

    /// Records cross the ABI as bytes: a slice of them read back from its bytes is the
    /// same records, and a partial trailing record is not read.
    #[test]
    fn records_round_trip_through_their_bytes() {
        use crate::pod::{bytes_of_slice, vec_from_bytes};
        let mut a = PrepareResult {
            site: 0x1234,
            encoding: 3,
            ..PrepareResult::default()
        };
        a.set_message("first");
        let mut b = a;
        b.site = 0x5678;
        b.set_message("second");
        let mut bytes = bytes_of_slice(&[a, b]).to_vec();
        bytes.extend_from_slice(&[0xff; 7]);
        let back: Vec<PrepareResult> = vec_from_bytes(&bytes);
        assert_eq!(back.len(), 2);
        assert_eq!((back[0].site, back[0].message()), (0x1234, "first".into()));
        assert_eq!((back[1].site, back[1].message()), (0x5678, "second".into()));
        assert_eq!(back[1].encoding, 3);
    }
}

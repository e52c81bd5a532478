//! What the tracer, the agent and a pack agree on: descriptors, the handler shim's
//! signature and the layout of the shared region. Pack authors never import this; the
//! macros and `emit!` expand to it.
//!
//! Descriptors are read by the tracer from the pack's ELF file before anything is
//! injected, so they hold no pointer (nothing needing a relocation): fixed-size inline
//! strings, and handlers named by exported symbols. They live in the section
//! [`SECTION`], one [`Descriptor`] after another.

/// Bumped on any change to the layouts in this module, to the context structs handed to
/// handlers or to the record encoding. The tracer refuses a pack built against another.
pub const ABI_VERSION: u32 = 1;
/// First field of every descriptor: "TPK" and a zero.
pub const DESC_MAGIC: u32 = u32::from_le_bytes(*b"TPK\0");
/// The ELF section holding the descriptors.
pub const SECTION: &str = "tracer_pack";
pub const NAME_LEN: usize = 64;
pub const TEXT_LEN: usize = 256;

/// Prefix of a handler shim's exported symbol; the handler's name follows.
pub const PROBE_SYMBOL_PREFIX: &str = "__tracer_probe_";
/// Prefix of the exported pointer to a map's handle; the static's name follows.
pub const MAP_SYMBOL_PREFIX: &str = "__tracer_map_";
/// The exported pointer to the event ring's handle.
pub const RING_SYMBOL: &str = "__tracer_ring";

/// [`Descriptor::kind`] values.
pub mod desc_kind {
    pub const PROBE: u32 = 1;
    pub const MAP: u32 = 2;
    pub const FORMAT: u32 = 3;
}

/// [`Descriptor::sub`] of a probe: the same numbers as [`crate::ProbeKind`].
pub mod probe_kind {
    pub const ENTRY: u32 = crate::ProbeKind::Entry as u32;
    pub const EXIT: u32 = crate::ProbeKind::Exit as u32;
    pub const AT: u32 = crate::ProbeKind::Offset as u32;
}

/// Bits of a probe descriptor's `params[0]`. Zero, what packs built before these flags
/// carry, is the conservative reading.
pub mod probe_flags {
    /// The handler never reads the time since the entry (`ExitCtx::elapsed_ns`): the
    /// probe need not read the timestamp counter, which costs 14-24 ns in some guests.
    pub const NO_TIME: u64 = 1;
    /// An entry handler that never reads nor writes the float arguments (`xmm0-7`): the
    /// trampoline need not put them in its context.
    pub const NO_FLOATS: u64 = 2;
}

/// [`Descriptor::sub`] of a map.
pub mod map_kind {
    pub const COUNTER: u32 = 1;
    /// params: none. Buckets `0`, then `[2^(k-1), 2^k)` for k = 1..=64.
    pub const HIST_LOG2: u32 = 2;
    /// params: `[min, step, buckets]`; an underflow and an overflow bucket are added.
    pub const HIST_LINEAR: u32 = 3;
    /// params: `[key_size, key_type, capacity, value_type]` (types: [`super::value_type`]).
    pub const HASH: u32 = 4;
}

/// How the tracer prints a key or value.
pub mod value_type {
    pub const BYTES: u64 = 0;
    pub const UNSIGNED: u64 = 1;
    pub const SIGNED: u64 = 2;
}

/// One entry of the descriptor section: a probe, a map or an event format.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Descriptor {
    pub magic: u32,
    pub abi: u32,
    /// [`desc_kind`].
    pub kind: u32,
    /// [`probe_kind`] or [`map_kind`]; for a format, the number of arguments.
    pub sub: u32,
    /// Map parameters; for a format, `[id, line]`.
    pub params: [u64; 4],
    /// Probe: the handler's name (its shim is [`PROBE_SYMBOL_PREFIX`] + name). Map: the
    /// static's name. Format: the source file.
    pub name: [u8; NAME_LEN],
    /// Probe: the spec. Format: the format string.
    pub text: [u8; TEXT_LEN],
}

pub const DESCRIPTOR_SIZE: usize = std::mem::size_of::<Descriptor>();
const _: () = assert!(DESCRIPTOR_SIZE == 368 && DESCRIPTOR_SIZE.is_multiple_of(8));

const fn fixed<const N: usize>(s: &str, what: &str) -> [u8; N] {
    let b = s.as_bytes();
    if b.len() > N {
        // A compile-time error in the pack when a name or spec does not fit.
        let _ = what;
        panic!("a probe pack name, spec or format string is longer than its descriptor field");
    }
    let mut out = [0u8; N];
    let mut i = 0;
    while i < b.len() {
        out[i] = b[i];
        i += 1;
    }
    out
}

/// Keeps the tail of a path that does not fit (the file name matters more than its root).
const fn fixed_tail<const N: usize>(s: &str) -> [u8; N] {
    let b = s.as_bytes();
    let skip = if b.len() > N { b.len() - N } else { 0 };
    let mut out = [0u8; N];
    let mut i = skip;
    while i < b.len() {
        out[i - skip] = b[i];
        i += 1;
    }
    out
}

impl Descriptor {
    const fn new(kind: u32, sub: u32, params: [u64; 4]) -> Self {
        Descriptor {
            magic: DESC_MAGIC,
            abi: ABI_VERSION,
            kind,
            sub,
            params,
            name: [0; NAME_LEN],
            text: [0; TEXT_LEN],
        }
    }

    /// `flags`: [`probe_flags`].
    pub const fn probe(kind: u32, handler: &str, spec: &str, flags: u64) -> Self {
        let mut d = Self::new(desc_kind::PROBE, kind, [flags, 0, 0, 0]);
        d.name = fixed(handler, "handler name");
        d.text = fixed(spec, "spec");
        d
    }

    pub const fn map(name: &str, kind: u32, params: [u64; 4]) -> Self {
        let mut d = Self::new(desc_kind::MAP, kind, params);
        d.name = fixed(name, "map name");
        d
    }

    pub const fn format(id: u32, file: &str, line: u32, nargs: u32, fmt: &str) -> Self {
        let mut d = Self::new(desc_kind::FORMAT, nargs, [id as u64, line as u64, 0, 0]);
        d.name = fixed_tail(file);
        d.text = fixed(fmt, "format string");
        d
    }
}

/// FNV-1a over the parts, as a format's identity: computed at compile time at the
/// `emit!` site and stored in its descriptor, so records carry no pointer.
pub const fn format_id(file: &str, line: u32, column: u32, fmt: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    h = fnv(h, file.as_bytes());
    h = fnv(h, &line.to_le_bytes());
    h = fnv(h, &column.to_le_bytes());
    fnv(h, fmt.as_bytes())
}

const fn fnv(mut h: u32, b: &[u8]) -> u32 {
    let mut i = 0;
    while i < b.len() {
        h ^= b[i] as u32;
        h = h.wrapping_mul(0x0100_0193);
        i += 1;
    }
    h
}

/// Whether every placeholder is one the tracer formats: `{}`, `{:?}`, `{:x}`, `{:#x}`.
pub const fn placeholders_supported(fmt: &str) -> bool {
    let b = fmt.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'{' && i + 1 < b.len() && b[i + 1] == b'{' {
            i += 2;
            continue;
        }
        if b[i] == b'{' {
            let start = i + 1;
            let mut end = start;
            while end < b.len() && b[end] != b'}' {
                end += 1;
            }
            let n = end - start;
            let ok = end < b.len()
                && (n == 0
                    || (n == 2
                        && b[start] == b':'
                        && (b[start + 1] == b'?' || b[start + 1] == b'x'))
                    || (n == 3
                        && b[start] == b':'
                        && b[start + 1] == b'#'
                        && b[start + 2] == b'x'));
            if !ok {
                return false;
            }
            i = end + 1;
            continue;
        }
        i += 1;
    }
    true
}

/// Number of `{...}` placeholders in a format string (`{{` and `}}` are literal braces).
pub const fn placeholders(fmt: &str) -> usize {
    let b = fmt.as_bytes();
    let (mut i, mut n) = (0, 0);
    while i < b.len() {
        if b[i] == b'{' {
            if i + 1 < b.len() && b[i + 1] == b'{' {
                i += 2;
                continue;
            }
            n += 1;
        } else if b[i] == b'}' && i + 1 < b.len() && b[i + 1] == b'}' {
            i += 1;
        }
        i += 1;
    }
    n
}

/// What the agent hands a handler shim besides the register context.
#[repr(C)]
#[derive(Debug)]
pub struct HitInfo {
    /// The probe's index in the session.
    pub probe: u32,
    /// The thread's kernel id; 0 when the caller does not know it (asked then).
    pub tid: u32,
    /// The probed symbol as `module:symbol[+offset]`, UTF-8, not NUL-terminated.
    pub name: *const u8,
    pub name_len: usize,
}

/// The signature of every shim the macros generate:
/// `ctx` is an `EntryContext`, `ExitContext` or `OffsetContext` by the probe's kind.
/// Returns [`SHIM_OK`], or [`SHIM_PANICKED`] when the handler panicked (the panic was
/// caught in the pack and never unwinds into the target).
pub type Shim = unsafe extern "C" fn(ctx: *mut u8, hit: *const HitInfo) -> u32;
pub const SHIM_OK: u32 = 0;
pub const SHIM_PANICKED: u32 = 1;

/// Map handles and the ring are bound at load time: the agent reads the handle's address
/// from its exported pointer ([`MAP_SYMBOL_PREFIX`], [`RING_SYMBOL`]) and writes the
/// address of the storage in the shared region into the handle's first field, this
/// `Binding`. Until then a handle is null and updates are ignored.
#[repr(C)]
pub struct Binding(std::sync::atomic::AtomicPtr<u8>);

impl Binding {
    pub const fn unbound() -> Self {
        Binding(std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()))
    }

    #[inline(always)]
    pub fn get(&self) -> Option<*mut u8> {
        let p = self.0.load(std::sync::atomic::Ordering::Acquire);
        (!p.is_null()).then_some(p)
    }

    /// Point the handle at its storage.
    ///
    /// # Safety
    /// `storage` must be the storage laid out by [`plan`] for this handle's map (or the
    /// ring), initialised by [`init_region`], and stay mapped for as long as the handle
    /// can be used.
    pub unsafe fn bind(&self, storage: *mut u8) {
        self.0.store(storage, std::sync::atomic::Ordering::Release)
    }
}

// ---------------------------------------------------------------------------------------
// The shared region: a header, the event ring, then the maps in descriptor order, each at
// a 64-byte boundary so that maps never share a cache line.

/// "TRPACKv1" at offset 0 of the region.
pub const REGION_MAGIC: u64 = u64::from_le_bytes(*b"TRPACKv1");
pub const REGION_HEADER: usize = 64;
/// Each map starts with a header line: magic, kind, drops, params.
pub const MAP_HEADER: usize = 64;
pub const MAP_MAGIC: u32 = u32::from_le_bytes(*b"TMAP");
/// Offsets inside a map header.
pub mod map_header {
    pub const MAGIC: usize = 0;
    pub const KIND: usize = 4;
    /// Updates lost because the map was full (hash maps).
    pub const DROPS: usize = 8;
    pub const PARAMS: usize = 16;
}
/// Ring control: three cache lines (reserve, consumer tail, drops), then the data.
pub const RING_CONTROL: usize = 192;
pub mod ring_control {
    pub const RESERVE: usize = 0;
    pub const TAIL: usize = 64;
    pub const DROPS: usize = 128;
    /// Data capacity in bytes (a power of two), written at init for the tracer to check.
    pub const CAPACITY: usize = 136;
}
/// Default ring capacity (bytes of records).
pub const RING_BYTES: usize = 1 << 20;

/// Counters and histograms are sharded by thread into this many cache-line-aligned copies,
/// summed by the reader (see `cargo bench -p tracer --bench packs`, rows `contention`).
pub const SHARDS: usize = 8;
pub const LOG2_BUCKETS: usize = 65;
/// Longest linear histogram accepted (plus underflow and overflow).
pub const MAX_LINEAR_BUCKETS: u64 = 4096;
pub const MAX_HASH_CAPACITY: u64 = 1 << 20;
pub const MAX_KEY_SIZE: u64 = 256;

const fn line_up(n: usize) -> usize {
    (n + 63) & !63
}

/// Bytes of one hash map slot: state word, key rounded up to 8, value word.
pub const fn hash_slot_size(key_size: usize) -> usize {
    16 + ((key_size + 7) & !7)
}

/// Bytes of one shard of a histogram.
pub fn hist_shard_size(kind: u32, params: &[u64; 4]) -> usize {
    let buckets = if kind == map_kind::HIST_LOG2 {
        LOG2_BUCKETS
    } else {
        params[2] as usize + 2
    };
    line_up(buckets * 8)
}

/// Why maps and a ring do not make a region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanError {
    /// The ring is not a power of two of at least 4096 bytes.
    RingSize(usize),
    /// A linear histogram with no step, or no or too many buckets.
    LinearHistogram,
    /// A hash map with an empty or too long key, or no or too many slots.
    HashMap,
    /// A map kind this version does not know.
    UnknownKind(u32),
}

impl core::fmt::Display for PlanError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PlanError::RingSize(n) => write!(f, "ring size {n} is not a power of two >= 4096"),
            PlanError::LinearHistogram => write!(
                f,
                "linear histogram needs a step > 0 and 1 to {MAX_LINEAR_BUCKETS} buckets"
            ),
            PlanError::HashMap => write!(
                f,
                "hash map needs a key of 1 to {MAX_KEY_SIZE} bytes and 1 to {MAX_HASH_CAPACITY} slots"
            ),
            PlanError::UnknownKind(k) => write!(f, "unknown map kind {k}"),
        }
    }
}

impl std::error::Error for PlanError {}

/// Bytes a map's storage takes after its header, or why the parameters are refused.
pub fn map_size(kind: u32, params: &[u64; 4]) -> Result<usize, PlanError> {
    Ok(match kind {
        map_kind::COUNTER => SHARDS * 64,
        map_kind::HIST_LOG2 => SHARDS * hist_shard_size(kind, params),
        map_kind::HIST_LINEAR => {
            if params[1] == 0 || params[2] == 0 || params[2] > MAX_LINEAR_BUCKETS {
                return Err(PlanError::LinearHistogram);
            }
            SHARDS * hist_shard_size(kind, params)
        }
        map_kind::HASH => {
            let (key, cap) = (params[0], params[2]);
            if key == 0 || key > MAX_KEY_SIZE || cap == 0 || cap > MAX_HASH_CAPACITY {
                return Err(PlanError::HashMap);
            }
            line_up(cap as usize * hash_slot_size(key as usize))
        }
        k => return Err(PlanError::UnknownKind(k)),
    })
}

/// Where everything sits in the region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub ring_offset: usize,
    pub ring_bytes: usize,
    /// Offset of each map's header, in the order given.
    pub maps: Vec<usize>,
    pub total: usize,
}

/// Lay out a region for `maps` (kind and params of each) and a ring of `ring_bytes` (a
/// power of two, at least 4096). The agent and the tracer each compute it from the same
/// descriptors; the tracer never takes an offset from the shared memory itself.
pub fn plan(maps: &[(u32, [u64; 4])], ring_bytes: usize) -> Result<Plan, PlanError> {
    if !ring_bytes.is_power_of_two() || ring_bytes < 4096 {
        return Err(PlanError::RingSize(ring_bytes));
    }
    let ring_offset = REGION_HEADER;
    let mut at = ring_offset + RING_CONTROL + ring_bytes;
    let mut offsets = Vec::with_capacity(maps.len());
    for (kind, params) in maps {
        offsets.push(at);
        at += MAP_HEADER + map_size(*kind, params)?;
    }
    Ok(Plan {
        ring_offset,
        ring_bytes,
        maps: offsets,
        total: (at + 4095) & !4095,
    })
}

/// Write the region's headers into zeroed memory laid out by `plan`.
///
/// # Safety
/// `base` points at `plan.total` writable zeroed bytes, 64-byte aligned.
pub unsafe fn init_region(base: *mut u8, plan: &Plan, maps: &[(u32, [u64; 4])]) {
    // SAFETY: every offset written is inside `plan.total` by construction of `plan`.
    unsafe {
        (base as *mut u64).write(REGION_MAGIC);
        (base.add(8) as *mut u32).write(ABI_VERSION);
        (base.add(12) as *mut u32).write(maps.len() as u32);
        (base.add(16) as *mut u64).write(plan.total as u64);
        let ring = base.add(plan.ring_offset);
        (ring.add(ring_control::CAPACITY) as *mut u64).write(plan.ring_bytes as u64);
        for ((kind, params), off) in maps.iter().zip(&plan.maps) {
            let h = base.add(*off);
            (h.add(map_header::MAGIC) as *mut u32).write(MAP_MAGIC);
            (h.add(map_header::KIND) as *mut u32).write(*kind);
            (h.add(map_header::PARAMS) as *mut [u64; 4]).write(*params);
        }
    }
}

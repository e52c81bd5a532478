//! Probes in two phases: *prepare* (decode, relocate, JIT the trampoline, compute the
//! patch) and *commit* (write the 5-byte `jmp` at the site).
//!
//! Preparing touches nothing the target executes, so it can run while the target runs.
//! Committing is the only step that changes executing code: in-process callers (tests)
//! commit themselves; the tracer commits from outside with every thread stopped and no
//! instruction pointer inside a patched range.

use crate::allocator::{AllocError, NearAllocator};
use crate::counting_entry::{self, CountingEntry};
use crate::dispatch::{self, Probe};
use crate::emitter::{CallEncoding, EmitError, Emitter, Policy};
use crate::jit::{self, JitError};
use crate::maps::MapEntry;
use crate::relocator::{self, Function, Memory, NeighbourIndex, Refusal, SelfMemory};
use crate::shared::SharedRegion;
use crate::shared_general;
use crate::trampoline;
use probes::abi::shared::{flags, Counts, ProbeKind};
use probes::context::OffsetHandler;
use probes::{EntryHandler, ExitHandler};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// What to probe and what to run.
#[derive(Clone, Debug)]
pub struct ProbeRequest {
    /// The function the site belongs to.
    pub function: Function,
    pub kind: ProbeKind,
    /// For offset probes: the instruction's offset from the function start.
    pub offset: u64,
    pub on_entry: Option<EntryHandler>,
    pub on_exit: Option<ExitHandler>,
    /// Pack handlers (shim addresses) and the name they see.
    pub pack: Option<PackHandlers>,
}

/// A pack's handlers on one probe, reached through slots in the probe.
#[derive(Clone, Copy, Debug)]
pub struct PackHandlers {
    /// Shim run at entry (or at the offset), 0 for none.
    pub entry: u64,
    /// Shim run at return, 0 for none.
    pub exit: u64,
    /// Whether the return handler reads the time since the entry (the timestamp counter
    /// is read at entry and return only then).
    pub exit_timed: bool,
    pub name: &'static str,
}

impl ProbeRequest {
    /// Count calls of the function at `address`.
    pub fn entry(address: u64, size: Option<u64>) -> Self {
        ProbeRequest {
            function: Function { address, size },
            kind: ProbeKind::Entry,
            offset: 0,
            on_entry: None,
            on_exit: None,
            pack: None,
        }
    }

    pub fn on_entry(mut self, h: EntryHandler) -> Self {
        self.on_entry = Some(h);
        self
    }

    /// Probe returns too, running `h` at each.
    pub fn on_exit(mut self, h: ExitHandler) -> Self {
        self.kind = ProbeKind::Exit;
        self.on_exit = Some(h);
        self
    }

    /// Probe returns, counting them, with no handler.
    pub fn with_exit(mut self) -> Self {
        self.kind = ProbeKind::Exit;
        self
    }
}

/// Why a probe was not prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The site cannot be patched safely.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// No memory within reach of the site, or the kernel refused memory.
    #[error("no memory for a trampoline within reach: {0}")]
    NoTrampolineMemory(#[source] AllocError),
    /// Code generation failed (a bug, reported as such).
    #[error("trampoline generation failed: {0}")]
    Codegen(#[from] EmitError),
    /// The trampoline landed beyond `jmp rel32` reach of the site (a bug: it is placed
    /// near the site).
    #[error("trampoline generation failed: trampoline out of rel32 reach")]
    OutOfReach,
    /// `prepare_offset` was given a request of another kind.
    #[error(
        "trampoline generation failed: prepare_offset needs an offset probe request, not {0:?}"
    )]
    NotOffset(ProbeKind),
    /// Offset probes save the vector state with xsave, which the OS has not enabled.
    #[error(
        "trampoline generation failed: the OS has not enabled xsave (CPUID OSXSAVE): offset \
         probes cannot save the vector state"
    )]
    NoXsave,
    /// All counter slots are in use.
    #[error("more than {0} probes")]
    TooManyProbes(usize),
    /// The shared counters could not grow.
    #[error("no memory for more probe counters: {0}")]
    NoCounterMemory(#[source] io::Error),
}

impl From<JitError> for PrepareError {
    fn from(e: JitError) -> Self {
        match e {
            JitError::Alloc(a) => PrepareError::NoTrampolineMemory(a),
            JitError::Emit(e) => PrepareError::Codegen(e),
            JitError::Refused(r) => PrepareError::Refused(r),
        }
    }
}

/// A probe ready to be committed.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub id: u32,
    /// Where the patch goes.
    pub site: u64,
    /// The `jmp rel32` to write at `site`.
    pub patch: [u8; 5],
    /// The bytes the patch replaces.
    pub original: [u8; 5],
    /// Bytes of whole instructions taken over (>= 5): no thread may be strictly inside
    /// `site..site + stolen_len` when the patch is written.
    pub stolen_len: usize,
    pub trampoline: u64,
    /// How the trampoline reaches the agent.
    pub encoding: CallEncoding,
    /// Bytes of the trampoline, and of the relocated instructions in it.
    pub code_len: usize,
    pub relocated_len: usize,
}

/// Owns trampolines, probes and their counters.
pub struct Interceptor {
    alloc: NearAllocator,
    shared: SharedRegion,
    probes: Vec<&'static Probe>,
    prepared: Vec<Prepared>,
    /// Patches written in this process, by site, with the bytes they replaced and the
    /// stolen length: the relocator reads code as it was before them, so that probing a
    /// function whose entry is already patched still sees its real instructions.
    committed: BTreeMap<u64, ([u8; 5], u64)>,
    /// Handler-less probes by what was asked (function, offset, kind), as indices into
    /// `prepared`: asking again reuses the trampoline and counter slot, so repeated
    /// sessions do not grow the process.
    reusable: HashMap<(u64, u64, u32, bool), Reusable>,
    /// This process's mappings as last read, to tell where code came from.
    maps: Vec<MapEntry>,
    exit_trampoline: Option<u64>,
    policy: Policy,
    /// The thread state's offset from the thread pointer, for inline fast paths.
    tls: Option<i32>,
    xsave: Option<trampoline::XsaveInfo>,
    /// Unwinder hooks, and those of them not yet committed in process.
    internal: Vec<Prepared>,
    internal_pending: Vec<usize>,
    /// The neighbour scan of the batch being prepared (see [`Interceptor::plan_batch`]).
    neighbours: Option<NeighbourIndex>,
    /// The general entry path shared by handler-less exit probes (`shared_general`).
    general_stub: Option<u64>,
    /// Pack handlers' stubs by shim and by the vector registers the caller keeps.
    stubs: HashMap<(u64, u16), PackStub>,
}

/// A pack handler as the probes' slots reach it: its stub (the shim itself when the
/// handler writes no vector register its caller does not keep), and why.
#[derive(Clone, Debug)]
pub struct PackStub {
    pub addr: u64,
    pub analysis: crate::clobbers::Analysis,
    /// The vector state the stub saves.
    pub saves: crate::clobbers::Saves,
    /// For a trampoline calling the handler directly: what the stub does.
    pub direct: Option<trampoline::DirectStub>,
}

/// What the direct stub of a handler with `c` and descriptor flags `flags` does: fill
/// the float arguments when the handler uses them, keep the vector registers it writes
/// beyond those.
fn direct_stub(
    c: &crate::clobbers::Clobbers,
    flags: u64,
    v: trampoline::Vectors,
) -> trampoline::DirectStub {
    let floats = flags & probes::pack::abi::probe_flags::NO_FLOATS == 0;
    trampoline::DirectStub {
        floats,
        vectors: crate::clobbers::vectors_to_save(c, if floats { 0x00ff } else { 0 }, v),
    }
}

impl Interceptor {
    /// An interceptor with room for `capacity` probes.
    pub fn new(capacity: usize) -> io::Result<Self> {
        dispatch::calibrate_tsc();
        Ok(Interceptor {
            alloc: NearAllocator::new().map_err(io::Error::other)?,
            shared: SharedRegion::create(capacity)?,
            probes: Vec::new(),
            prepared: Vec::new(),
            committed: BTreeMap::new(),
            reusable: HashMap::new(),
            maps: Vec::new(),
            exit_trampoline: None,
            policy: Policy::Best,
            tls: crate::thread_state::offset_from_thread_pointer(),
            xsave: trampoline::XsaveInfo::detect(),
            internal: Vec::new(),
            internal_pending: Vec::new(),
            neighbours: None,
            general_stub: None,
            stubs: HashMap::new(),
        })
    }

    /// Force how trampolines reach the agent (benchmarks and tests).
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    pub fn shared(&self) -> &SharedRegion {
        &self.shared
    }

    pub fn allocator(&self) -> &NearAllocator {
        &self.alloc
    }

    pub fn counters(&self, id: u32) -> probes::abi::shared::Counts<'_> {
        self.shared.counters(id as usize)
    }

    pub fn prepared(&self) -> &[Prepared] {
        &self.prepared
    }

    /// Decode, relocate and JIT the trampoline for `req`; nothing the target runs changes.
    pub fn prepare(&mut self, req: &ProbeRequest) -> Result<Prepared, PrepareError> {
        self.prepare_with(req, None)
    }

    /// Like [`prepare`](Self::prepare), but a handler-less request made before gets the
    /// probe prepared then: same trampoline, same patch, same counter slot, its counters
    /// zeroed so that the new session counts its own hits. Trampolines are never freed
    /// (a thread may still run in one after its patch is gone), so reuse is what keeps
    /// repeated sessions from growing the process. A request with pack handlers reuses a
    /// probe made for pack handlers before, the new handlers written into its slots.
    /// Returns whether it was reused.
    pub fn prepare_reusing(
        &mut self,
        req: &ProbeRequest,
    ) -> Result<(Prepared, bool), PrepareError> {
        if req.on_entry.is_some() || req.on_exit.is_some() {
            return self.prepare(req).map(|p| (p, false));
        }
        // Probes without handlers count in an inline path that never reads the slots:
        // they are kept apart from those made for pack handlers.
        let key = (
            req.function.address,
            req.offset,
            req.kind as u32,
            req.pack.is_some(),
        );
        if let Some(r) = self.reusable.remove(&key) {
            let p = self.prepared[r.index].clone();
            // The same code from the same file: a library unloaded and another loaded
            // at the same address would otherwise run stale relocated instructions.
            if r.code == self.code_at(&p) && r.origin == self.origin(p.site) {
                let index = r.index;
                self.reusable.insert(key, r);
                self.shared.reset(p.id as usize);
                if let Some(h) = req.pack {
                    let (entry, direct, exit) = self.pack_slots(&h, self.direct_pack(req))?;
                    let probe = self.probes[index];
                    probe.pack_entry.store(entry, Ordering::Release);
                    probe.pack_entry_direct.store(direct, Ordering::Release);
                    probe.pack_exit_timed.store(h.exit_timed, Ordering::Release);
                    probe.pack_exit.store(exit, Ordering::Release);
                    self.record_saves(probe, &h, self.direct_pack(req));
                }
                return Ok((p, true));
            }
        }
        let p = self.prepare(req)?;
        let r = Reusable {
            index: self.prepared.len() - 1,
            code: self.code_at(&p),
            origin: self.origin(p.site),
        };
        self.reusable.insert(key, r);
        Ok((p, false))
    }

    /// The code a probe took over, as it is now under any live patch.
    fn code_at(&self, p: &Prepared) -> Option<Vec<u8>> {
        let unpatched = UnpatchedMemory {
            patches: &self.committed,
        };
        let mem = self.batch_memory(&unpatched);
        let mut code = vec![0u8; p.stolen_len];
        mem.read(p.site, &mut code).then_some(code)
    }

    /// Device, inode and file offset of the code at `addr` (anonymous memory has inode 0).
    fn origin(&mut self, addr: u64) -> Option<(String, u64, u64)> {
        if !self.maps.iter().any(|m| m.contains(addr)) {
            self.maps = crate::maps::read_self().unwrap_or_default();
        }
        let m = self.maps.iter().find(|m| m.contains(addr))?;
        Some((m.dev.clone(), m.inode, m.offset + (addr - m.start)))
    }

    /// Re-read which prepared probes have their patch in memory now, as the tracer
    /// writes and removes patches from outside (and a tracer that was killed leaves them
    /// in place). Call before preparing for a new session, so that code under a live
    /// patch is analysed as it was before it.
    pub fn refresh_live(&mut self) {
        self.maps = crate::maps::read_self().unwrap_or_default();
        let mut live = BTreeMap::new();
        let sites: Vec<u64> = self.prepared.iter().map(|p| p.site).collect();
        for (p, now) in self.prepared.iter().zip(read_sites(&sites)) {
            if now == Some(p.patch) {
                live.insert(p.site, (p.original, p.stolen_len as u64));
            }
        }
        self.committed = live;
    }

    /// Decode the surroundings of the functions about to be prepared once, for all of
    /// them, instead of 8 KiB per probe (see `relocator::NeighbourIndex`); until
    /// [`end_batch`](Self::end_batch), probes of these functions use that scan.
    pub fn plan_batch(&mut self, functions: &[Function]) {
        self.alloc.recheck_owner();
        let mem = UnpatchedMemory {
            patches: &self.committed,
        };
        self.neighbours = Some(NeighbourIndex::build(functions, &mem));
    }

    /// `unpatched` read through the batch's code first when a batch is being prepared.
    fn batch_memory<'a>(&'a self, unpatched: &'a UnpatchedMemory<'a>) -> Box<dyn Memory + 'a> {
        match &self.neighbours {
            Some(index) => Box::new(relocator::BatchMemory {
                index,
                inner: unpatched,
            }),
            None => Box::new(UnpatchedMemory {
                patches: unpatched.patches,
            }),
        }
    }

    /// Forget the batch's scan: code may change before the next one.
    pub fn end_batch(&mut self) {
        self.neighbours = None;
    }

    /// Prepared probes whose patch is in memory (as of the last
    /// [`refresh_live`](Self::refresh_live) or in-process commit), one per site.
    pub fn live(&self) -> Vec<Prepared> {
        let mut out: Vec<Prepared> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let sites: Vec<u64> = self.prepared.iter().map(|p| p.site).collect();
        for (p, now) in self.prepared.iter().zip(read_sites(&sites)) {
            if self.committed.contains_key(&p.site) && now == Some(p.patch) && seen.insert(p.site) {
                out.push(p.clone());
            }
        }
        out
    }

    /// Whether `id` is one of the agent's own probes (an unwinder hook).
    pub fn is_internal(&self, id: u32) -> bool {
        self.internal.iter().any(|p| p.id == id)
    }

    /// Prepare an offset probe (`req.kind` must be [`ProbeKind::Offset`]) running `h`
    /// with every register at the instruction `req.offset` bytes into the function.
    pub fn prepare_offset(
        &mut self,
        req: &ProbeRequest,
        h: Option<OffsetHandler>,
    ) -> Result<Prepared, PrepareError> {
        if req.kind != ProbeKind::Offset {
            return Err(PrepareError::NotOffset(req.kind));
        }
        self.prepare_with(req, h)
    }

    fn prepare_with(
        &mut self,
        req: &ProbeRequest,
        on_offset: Option<OffsetHandler>,
    ) -> Result<Prepared, PrepareError> {
        dispatch::finish_tsc_calibration();
        let stolen = self.analyze_site(req)?;
        let exit_trampoline = match req.kind {
            ProbeKind::Exit => self.exit_trampoline()?,
            _ => 0,
        };
        let id = self.claim_counters()?;
        let counters = self.shared.counters_static(id);
        let probe = self.new_probe(req, id, counters, exit_trampoline, on_offset)?;
        let xsave = match req.kind {
            ProbeKind::Offset => Some(self.xsave.ok_or(PrepareError::NoXsave)?),
            _ => None,
        };
        let path = self.entry_path(req, id, counters, exit_trampoline);
        let avx = self.vectors();
        let stub = match &path {
            trampoline::EntryPath::Fast(f) if f.pack.is_none() && f.exit_trampoline != 0 => {
                self.general_stub()?
            }
            _ => 0,
        };
        let placed = self.place_trampoline(&stolen, |e| {
            emit_trampoline(e, probe, &stolen, xsave, path, avx, stub)
        })?;
        let tramp = placed.value;
        let patch =
            trampoline::patch_bytes(stolen.site, placed.addr).ok_or(PrepareError::OutOfReach)?;
        let mut original = [0u8; 5];
        original.copy_from_slice(&stolen.original[..5]);
        counters
            .line
            .encoding
            .store(tramp.encoding as u32, Ordering::Relaxed);
        self.probes.push(probe);
        let prepared = Prepared {
            id: id as u32,
            site: stolen.site,
            patch,
            original,
            stolen_len: stolen.len,
            trampoline: placed.addr,
            encoding: tramp.encoding,
            code_len: placed.len,
            relocated_len: tramp.relocated.bytes.len(),
        };
        self.prepared.push(prepared.clone());
        Ok(prepared)
    }

    /// The instructions the patch at the probe's site would overwrite, read as the code
    /// was before any patch of ours, or why none can go there.
    fn analyze_site(&self, req: &ProbeRequest) -> Result<relocator::Stolen, PrepareError> {
        let site = match req.kind {
            ProbeKind::Entry | ProbeKind::Exit => req.function.address,
            ProbeKind::Offset => req.function.address + req.offset,
        };
        let unpatched = UnpatchedMemory {
            patches: &self.committed,
        };
        let mem = self.batch_memory(&unpatched);
        relocator::analyze_with(
            &req.function,
            site,
            req.kind,
            &*mem,
            self.neighbours.as_ref(),
        )
        .map_err(PrepareError::Refused)
    }

    /// A free counter slot in the shared region: its probe id.
    fn claim_counters(&mut self) -> Result<usize, PrepareError> {
        self.shared.claim().map_err(|e| {
            if self.shared.capacity() >= crate::shared::MAX_CAPACITY {
                PrepareError::TooManyProbes(crate::shared::MAX_CAPACITY)
            } else {
                PrepareError::NoCounterMemory(e)
            }
        })
    }

    /// The probe's record the trampolines and dispatch read, for the life of the process.
    fn new_probe(
        &mut self,
        req: &ProbeRequest,
        id: usize,
        counters: Counts<'static>,
        exit_trampoline: u64,
        on_offset: Option<OffsetHandler>,
    ) -> Result<&'static Probe, PrepareError> {
        let (pack_entry, pack_entry_direct, pack_exit) = match &req.pack {
            Some(h) => self.pack_slots(h, self.direct_pack(req))?,
            None => (0, 0, 0),
        };
        let probe: &'static Probe = Box::leak(Box::new(Probe {
            counters,
            on_entry: req.on_entry,
            on_exit: req.on_exit,
            exit_trampoline,
            id: id as u32,
            on_offset,
            return_point: Default::default(),
            pack_entry: AtomicU64::new(pack_entry),
            pack_entry_direct: AtomicU64::new(pack_entry_direct),
            pack_exit: AtomicU64::new(pack_exit),
            pack_exit_timed: req.pack.is_some_and(|p| p.exit_timed).into(),
            name: req.pack.map_or("", |p| p.name),
        }));
        if let Some(h) = &req.pack {
            self.record_saves(probe, h, self.direct_pack(req));
        }
        Ok(probe)
    }

    /// Counting-only probes take the inline path; a handler needs the full one.
    fn entry_path(
        &self,
        req: &ProbeRequest,
        id: usize,
        counters: Counts<'static>,
        exit_trampoline: u64,
    ) -> trampoline::EntryPath {
        match (req.on_entry, req.on_exit, req.pack, req.kind, self.tls) {
            (None, None, None, ProbeKind::Entry | ProbeKind::Exit, Some(tls)) => {
                trampoline::EntryPath::Fast(trampoline::FastEntry {
                    tls,
                    counters: counters.line,
                    exit_trampoline,
                    pack: None,
                })
            }
            (None, None, Some(h), ProbeKind::Entry, Some(tls)) if self.direct_pack(req) => {
                trampoline::EntryPath::Pack(trampoline::PackEntry {
                    tls,
                    counters: counters.line,
                    hit: hit_info(id as u32, &h),
                })
            }
            // An exit probe whose handlers are a pack's: the inline exit path calls them.
            (None, None, Some(h), ProbeKind::Exit, Some(tls)) if self.direct_pack(req) => {
                trampoline::EntryPath::Fast(trampoline::FastEntry {
                    tls,
                    counters: counters.line,
                    exit_trampoline,
                    pack: Some(trampoline::PackExit {
                        hit: hit_info(id as u32, &h),
                        id: id as u32,
                        tsc_scale: dispatch::tsc_scale(),
                    }),
                })
            }
            _ => trampoline::EntryPath::General,
        }
    }

    /// Places the trampoline near the site and the agent when one block can reach both;
    /// else near the site.
    fn place_trampoline(
        &mut self,
        stolen: &relocator::Stolen,
        mut emit: impl FnMut(&mut Emitter) -> Result<trampoline::EntryTrampoline, JitError>,
    ) -> Result<jit::Placed<trampoline::EntryTrampoline>, PrepareError> {
        let on_entry = dispatch::on_entry as *const () as u64;
        for near in [&[stolen.site, on_entry][..], &[stolen.site][..]] {
            match jit::place(&mut self.alloc, near, self.policy, &mut emit) {
                Ok(p) => return Ok(p),
                Err(JitError::Alloc(AllocError::TargetsTooFarApart { .. }))
                | Err(JitError::Alloc(AllocError::OutOfRange { .. }))
                    if near.len() > 1 => {}
                Err(e) => return Err(e.into()),
            }
        }
        unreachable!("the last attempt returns or places")
    }

    /// Whether `req` gets a direct pack path: an entry probe whose only handler is a
    /// pack's, or an exit probe whose handlers are a pack's, in a process whose thread
    /// state the trampoline can reach.
    fn direct_pack(&self, req: &ProbeRequest) -> bool {
        let handlers = match req.kind {
            ProbeKind::Entry => req.pack.is_some_and(|h| h.entry != 0 && h.exit == 0),
            ProbeKind::Exit => req.pack.is_some_and(|h| h.exit != 0),
            ProbeKind::Offset => false,
        };
        handlers && req.on_entry.is_none() && req.on_exit.is_none() && self.tls.is_some()
    }

    /// The vector state the OS enabled, which trampolines keep across handlers.
    fn vectors(&self) -> trampoline::Vectors {
        self.xsave.map_or(trampoline::Vectors::Sse, |x| x.vectors())
    }

    /// The general entry path of handler-less exit probes, emitted on first use.
    fn general_stub(&mut self) -> Result<u64, PrepareError> {
        if let Some(a) = self.general_stub {
            return Ok(a);
        }
        let on_entry = dispatch::on_entry as *const () as u64;
        let avx = self.vectors();
        let placed = jit::place(&mut self.alloc, &[on_entry], self.policy, |e| {
            Ok(shared_general::emit_stub(e, avx)?)
        })
        .or_else(|_| {
            jit::place(&mut self.alloc, &[], self.policy, |e| {
                Ok(shared_general::emit_stub(e, avx)?)
            })
        })?;
        self.general_stub = Some(placed.addr);
        Ok(placed.addr)
    }

    fn exit_trampoline(&mut self) -> Result<u64, PrepareError> {
        if let Some(a) = self.exit_trampoline {
            return Ok(a);
        }
        let on_exit = dispatch::on_exit as *const () as u64;
        let avx = self.vectors();
        let placed = jit::place(&mut self.alloc, &[on_exit], self.policy, |e| {
            Ok(trampoline::emit_exit(e, self.tls, avx)?)
        })
        .or_else(|_| {
            jit::place(&mut self.alloc, &[], self.policy, |e| {
                Ok(trampoline::emit_exit(e, self.tls, avx)?)
            })
        })?;
        self.exit_trampoline = Some(placed.addr);
        self.hook_unwinder();
        Ok(placed.addr)
    }

    /// Prepare entry probes on the unwinder's entry points, when it is loaded, so that
    /// exceptions thrown through exit-probed frames still find real return addresses
    /// (see [`dispatch::unwind_hook`]). A function that cannot be probed is skipped: only
    /// exceptions through exit-probed frames are then affected.
    fn hook_unwinder(&mut self) {
        for name in UNWINDER_ENTRIES {
            // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name.
            let addr = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) } as u64;
            if addr == 0 {
                continue;
            }
            let req = ProbeRequest::entry(addr, None).on_entry(dispatch::unwind_hook);
            if let Ok(p) = self.prepare(&req) {
                self.internal_pending.push(self.internal.len());
                self.internal.push(p);
            }
        }
    }

    /// Internal probes (the unwinder hooks) prepared along with exit probes. They are in
    /// [`prepared`](Self::prepared) too, and must be committed with the exit probes;
    /// [`commit_in_process`](Self::commit_in_process) does so.
    pub fn internal(&self) -> &[Prepared] {
        &self.internal
    }

    /// Enable the probe's counters and handlers. The tracer calls this before it writes
    /// the patch; in-process callers use [`commit_in_process`](Self::commit_in_process).
    pub fn enable(&self, id: u32) {
        self.counters(id)
            .line
            .flags
            .fetch_or(flags::ENABLED, Ordering::Release);
    }

    /// Enable and write the patch of a prepared probe into this process.
    pub fn commit_in_process(&mut self, p: &Prepared) -> io::Result<()> {
        for i in std::mem::take(&mut self.internal_pending) {
            let q = self.internal[i].clone();
            self.enable(q.id);
            write_self_code(q.site, &q.patch)?;
            self.committed
                .insert(q.site, (q.original, q.stolen_len as u64));
        }
        let end = p.site + p.stolen_len as u64;
        // Neither patch may land in the other's stolen bytes: the first trampoline
        // resumes after them, the second would relocate bytes the first changed.
        if let Some((&other, _)) = self
            .committed
            .range(..end)
            .find(|&(&s, &(_, len))| p.site < s + len)
        {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "the patch at {:#x} would overlap the probe at {other:#x}",
                    p.site
                ),
            ));
        }
        self.enable(p.id);
        write_self_code(p.site, &p.patch)?;
        self.committed
            .insert(p.site, (p.original, p.stolen_len as u64));
        Ok(())
    }

    /// Restore the original bytes. The trampoline stays mapped: a thread may still be in
    /// it, or return through the exit trampoline later.
    pub fn revert_in_process(&mut self, p: &Prepared) -> io::Result<()> {
        write_self_code(p.site, &p.original)?;
        self.committed.remove(&p.site);
        self.counters(p.id)
            .line
            .flags
            .fetch_and(!flags::ENABLED, Ordering::Release);
        Ok(())
    }
}

/// Emit the trampoline `probe` needs: the full-context one at an offset, the inline
/// counting one for a handler-less entry, the fast paths with the shared general path
/// (`stub`) for a handler-less exit probe, or else (probes with handlers) the trampoline
/// with its own general path or direct pack call.
fn emit_trampoline(
    e: &mut Emitter,
    probe: &'static Probe,
    stolen: &relocator::Stolen,
    xsave: Option<trampoline::XsaveInfo>,
    path: trampoline::EntryPath,
    avx: trampoline::Vectors,
    stub: u64,
) -> Result<trampoline::EntryTrampoline, JitError> {
    match (xsave, path) {
        (Some(xs), _) => trampoline::emit_offset(e, probe, stolen, xs),
        (None, trampoline::EntryPath::Fast(f)) if f.pack.is_none() && f.exit_trampoline == 0 => {
            let c = CountingEntry {
                tls: f.tls,
                counters: f.counters,
                sharding: crate::shared::sharding(),
            };
            // Nothing is called: the encoding reported is that of no far call.
            Ok(trampoline::EntryTrampoline {
                encoding: CallEncoding::Rel32,
                relocated: counting_entry::emit(e, c, stolen)??,
            })
        }
        (None, trampoline::EntryPath::Fast(f)) if f.pack.is_none() => {
            shared_general::emit_entry(e, probe, stolen, f, stub)
        }
        (None, path) => trampoline::emit_entry(e, probe, stolen, path, avx),
    }
}

/// What a probe's pack handlers get as `HitInfo`: made once, alive forever.
fn hit_info(id: u32, h: &PackHandlers) -> &'static probes::pack::abi::HitInfo {
    Box::leak(Box::new(probes::pack::abi::HitInfo {
        probe: id,
        tid: 0,
        name: h.name.as_ptr(),
        name_len: h.name.len(),
    }))
}

/// A handler-less probe kept for the next request of the same thing.
struct Reusable {
    /// Index in `Interceptor::prepared`.
    index: usize,
    /// The code taken over and where it came from, when the probe was prepared.
    code: Option<Vec<u8>>,
    origin: Option<(String, u64, u64)>,
}

/// This process's memory as it was before our patches.
struct UnpatchedMemory<'a> {
    patches: &'a BTreeMap<u64, ([u8; 5], u64)>,
}

impl Memory for UnpatchedMemory<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        if !SelfMemory.read(addr, buf) {
            return false;
        }
        let end = addr + buf.len() as u64;
        for (&site, &(original, _)) in self.patches.range(addr.saturating_sub(4)..end) {
            for (k, &b) in original.iter().enumerate() {
                let a = site + k as u64;
                if a >= addr && a < end {
                    buf[(a - addr) as usize] = b;
                }
            }
        }
        true
    }
}

/// The five bytes at each of `sites` now, None where unreadable. Sites within a page of
/// each other are read as one span: a read is a system call (`process_vm_readv`, several
/// microseconds here), and 10,000 probes made a later session start with 10,000 of them.
fn read_sites(sites: &[u64]) -> Vec<Option<[u8; 5]>> {
    const SPAN: u64 = 4096;
    let mut order: Vec<usize> = (0..sites.len()).collect();
    order.sort_unstable_by_key(|&i| sites[i]);
    let mut out = vec![None; sites.len()];
    let mut k = 0;
    while k < order.len() {
        let start = sites[order[k]];
        let mut end = k + 1;
        while end < order.len() && sites[order[end]] + 5 - start <= SPAN {
            end += 1;
        }
        let group = &order[k..end];
        let len = (sites[order[end - 1]] + 5 - start) as usize;
        let mut span = vec![0u8; len];
        let whole = SelfMemory.read(start, &mut span);
        for &i in group {
            let mut b = [0u8; 5];
            let off = (sites[i] - start) as usize;
            if whole {
                b.copy_from_slice(&span[off..off + 5]);
                out[i] = Some(b);
            } else if SelfMemory.read(sites[i], &mut b) {
                out[i] = Some(b);
            }
        }
        k = end;
    }
    out
}

/// Where exceptions start unwinding (libgcc_s, also used by Rust panics).
const UNWINDER_ENTRIES: [&std::ffi::CStr; 3] = [
    c"_Unwind_RaiseException",
    c"_Unwind_ForcedUnwind",
    c"_Unwind_Resume_or_Rethrow",
];

/// Write code of this process through `/proc/self/mem`, which the kernel lets through on
/// read-only and executable pages (copy-on-write for file mappings), so no page is ever
/// made writable and executable.
pub fn write_self_code(addr: u64, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/proc/self/mem")?;
    f.write_all_at(bytes, addr)
}

impl Interceptor {
    /// Point every pack handler slot holding one of `swaps`' old shims at its new one:
    /// a store per slot, so each hit runs one build's handler or the other's, never
    /// neither. Returns how many slots changed.
    pub fn swap_pack_shims(&mut self, swaps: &[(u64, u64)]) -> Result<u64, PrepareError> {
        // Slots hold stubs, made for the kind of slot: the old shims' and the new ones'.
        const KINDS: [u16; 3] = [
            trampoline::PACK_ENTRY_KEEPS,
            trampoline::PACK_ENTRY_DIRECT,
            trampoline::PACK_EXIT_KEEPS,
        ];
        let mut pairs = [Vec::new(), Vec::new(), Vec::new()];
        for (k, kind) in KINDS.into_iter().enumerate() {
            for &(old, new) in swaps {
                if let Some(s) = self.stubs.get(&(old, kind)) {
                    let old_stub = s.addr;
                    pairs[k].push((old_stub, self.pack_stub(new, kind)?.addr));
                }
            }
        }
        let timed: Vec<(u64, bool)> = swaps
            .iter()
            .filter_map(|&(_, new)| {
                let stub = self.stubs.get(&(new, trampoline::PACK_EXIT_KEEPS))?;
                Some((stub.addr, crate::pack_loader::shim_needs_time(new)))
            })
            .collect();
        let mut n = 0;
        for p in &self.probes {
            let slots = [&p.pack_entry, &p.pack_entry_direct, &p.pack_exit];
            for (k, (slot, pairs)) in slots.into_iter().zip(&pairs).enumerate() {
                let old = slot.load(Ordering::Acquire);
                if let Some(&(_, new)) = pairs.iter().find(|(o, _)| *o == old && old != 0) {
                    let exit = KINDS[k] == trampoline::PACK_EXIT_KEEPS;
                    let t = timed
                        .iter()
                        .find(|(s, _)| exit && *s == new)
                        .map(|&(_, t)| t);
                    // A handler that reads the time: entries start taking it before it
                    // runs (an entry taken just before reads as 0 ns).
                    if t == Some(true) {
                        p.pack_exit_timed.store(true, Ordering::Release);
                    }
                    slot.store(new, Ordering::Release);
                    if t == Some(false) {
                        p.pack_exit_timed.store(false, Ordering::Release);
                    }
                    // The direct slot and the plain one hold one handler: counted once.
                    if KINDS[k] != trampoline::PACK_ENTRY_DIRECT {
                        n += 1;
                    }
                }
            }
        }
        Ok(n)
    }

    /// Publish in the probe's counters what its handlers' stubs save, for reports.
    /// `direct`: the handlers are called straight from the trampoline; else they run
    /// from the general path, whose frame saves every vector register.
    fn record_saves(&self, probe: &Probe, h: &PackHandlers, direct: bool) {
        use probes::abi::shared::saves;
        let mut v = 0u64;
        let entry_kind = if direct {
            trampoline::PACK_ENTRY_DIRECT
        } else {
            trampoline::PACK_ENTRY_KEEPS
        };
        let mut avx512 = 0u64;
        let all = crate::clobbers::Saves::ALL.for_state(self.vectors());
        if let Some(s) = self.stubs.get(&(h.entry, entry_kind)) {
            let bits = if direct { s.saves } else { all };
            v |= saves::HAS_ENTRY | (bits.low as u64) << saves::ENTRY_SHIFT;
            avx512 |= saves::avx512::pack(bits.zmm16, bits.masks, saves::avx512::ENTRY_SHIFT);
        }
        if let Some(s) = self.stubs.get(&(h.exit, trampoline::PACK_EXIT_KEEPS)) {
            let bits = if direct { s.saves } else { all };
            v |= saves::HAS_EXIT | (bits.low as u64) << saves::EXIT_SHIFT;
            avx512 |= saves::avx512::pack(bits.zmm16, bits.masks, saves::avx512::EXIT_SHIFT);
        }
        probe.counters.line.saves.store(v, Ordering::Relaxed);
        let c = &probe.counters.line.saves_avx512;
        c.store(avx512, Ordering::Relaxed);
    }

    /// What a probe's slots hold for pack handlers `h`: their stubs (entry, entry for
    /// a trampoline calling it directly when `direct`, exit).
    fn pack_slots(
        &mut self,
        h: &PackHandlers,
        direct: bool,
    ) -> Result<(u64, u64, u64), PrepareError> {
        let mut stub = |shim: u64, kind: u16| match shim {
            0 => Ok(0),
            shim => self.pack_stub(shim, kind).map(|s| s.addr),
        };
        let entry = stub(h.entry, trampoline::PACK_ENTRY_KEEPS)?;
        let entry_direct = match direct {
            true => stub(h.entry, trampoline::PACK_ENTRY_DIRECT)?,
            false => 0,
        };
        let exit = stub(h.exit, trampoline::PACK_EXIT_KEEPS)?;
        Ok((entry, entry_direct, exit))
    }

    /// The stub of the pack handler whose shim is at `shim`, called by code that keeps
    /// the low halves of the vector registers in `keeps` itself, or for a trampoline
    /// calling it directly (`keeps` = [`trampoline::PACK_ENTRY_DIRECT`]): made on first
    /// use from the analysis of the handler's code (`crate::clobbers`) and its
    /// descriptor's flags, saving only what it can change; the shim itself when nothing.
    pub fn pack_stub(&mut self, shim: u64, keeps: u16) -> Result<&PackStub, PrepareError> {
        if !self.stubs.contains_key(&(shim, keeps)) {
            let analysis = crate::clobbers::analyse_here(shim);
            let avx = self.vectors();
            let direct = (keeps == trampoline::PACK_ENTRY_DIRECT).then(|| {
                direct_stub(
                    &analysis.clobbers,
                    crate::pack_loader::shim_flags(shim),
                    avx,
                )
            });
            let saves = match direct {
                Some(d) => d.vectors,
                None => crate::clobbers::vectors_to_save(&analysis.clobbers, keeps, avx),
            };
            let bare = direct.is_none_or(|d| d.bare());
            let addr = if saves.is_empty() && bare {
                shim
            } else {
                let emit = |e: &mut crate::emitter::Emitter| -> Result<_, JitError> {
                    Ok(match direct {
                        Some(d) => trampoline::emit_pack_direct_stub(e, shim, d, avx)?,
                        None => trampoline::emit_pack_stub(e, shim, saves, avx)?,
                    })
                };
                let placed = jit::place(&mut self.alloc, &[shim], self.policy, emit)
                    .or_else(|_| jit::place(&mut self.alloc, &[], self.policy, emit))?;
                placed.addr
            };
            self.stubs.insert(
                (shim, keeps),
                PackStub {
                    addr,
                    analysis,
                    saves,
                    direct,
                },
            );
        }
        Ok(&self.stubs[&(shim, keeps)])
    }
}

#[cfg(test)]
mod tests {
    use super::read_sites;

    /// Sites are read by spans, and a span that cannot be read whole still gives the
    /// bytes of each site that can.
    #[test]
    fn sites_read_by_spans_and_one_by_one_past_a_hole() {
        // Two pages, the second unmapped after writing known bytes into the first.
        // SAFETY: a fresh anonymous mapping of our own.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let base = p as u64;
        // SAFETY: inside the first page, mapped read-write above.
        unsafe {
            for i in 0..4096u64 {
                *((base + i) as *mut u8) = i as u8;
            }
            libc::munmap((base + 4096) as *mut libc::c_void, 4096);
        }
        let sites = [base + 4000, base + 10, base + 4096 + 100, base + 4093];
        let got = read_sites(&sites);
        let at = |a: u64| Some(std::array::from_fn(|k| (a - base + k as u64) as u8));
        assert_eq!(got[0], at(base + 4000));
        assert_eq!(got[1], at(base + 10));
        assert_eq!(got[2], None, "unmapped");
        assert_eq!(got[3], None, "runs into the unmapped page");
        // SAFETY: the first page, still ours.
        unsafe { libc::munmap(p, 4096) };
    }
}

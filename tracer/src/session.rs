//! A probing session: inject the agent, prepare every probe in one remote call, patch the
//! sites with every thread stopped, read the shared counters, and undo the patches.

use crate::agent_blob::agent_so;
use crate::inject::{self, LibcFunctions};
use crate::library_file;
use crate::probeable;
use crate::remote_call;
use crate::session_lock::{self, SessionLock};
use crate::spec::ResolvedProbe;
use crate::symbols::ProcessModules;
use crate::threads::{AttachError, Process};
use crate::timings;
use probes::remote::{
    result_flags, status, AgentInfo, PrepareRequest, PrepareResult, AGENT_MAGIC, INIT_SYMBOL,
    INTERNAL_SYMBOL, LIVE_SYMBOL, PREPARE_SYMBOL, RESOLVE_SYMBOL,
};
use probes::shared::{Counts, SharedHeader, MAGIC};
use probes::ProbeKind;
use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// A probe whose patch is in place.
#[derive(Clone, Debug)]
pub struct Installed {
    /// `module:symbol[+offset]`, as shown to users.
    pub label: String,
    pub module: String,
    pub symbol: String,
    /// The patched address (past a leading `endbr64`).
    pub site: u64,
    pub id: u32,
    pub encoding: agent::emitter::CallEncoding,
    patch: [u8; 5],
    original: [u8; 5],
    stolen_len: u64,
    /// The agent's own probe (an unwinder hook): patched and restored, not reported.
    hidden: bool,
}

impl Installed {
    fn from_result(r: &PrepareResult, label: String, module: String, symbol: String) -> Self {
        let mut patch = [0u8; 5];
        patch.copy_from_slice(&r.patch[..5]);
        let mut original = [0u8; 5];
        original.copy_from_slice(&r.original[..5]);
        Installed {
            label,
            module,
            symbol,
            site: r.site,
            id: r.id,
            encoding: agent::emitter::CallEncoding::from_u8(r.encoding as u8)
                .unwrap_or(agent::emitter::CallEncoding::Abs64),
            patch,
            original,
            stolen_len: r.stolen_len as u64,
            hidden: false,
        }
    }
}

/// A probe that was not installed, with the reason users read.
#[derive(Clone, Debug)]
pub struct NotInstalled {
    pub label: String,
    pub address: u64,
    pub reason: String,
}

/// Counters of one probe, read from shared memory.
#[derive(Clone, Debug)]
pub struct ProbeReport {
    pub label: String,
    pub module: String,
    pub symbol: String,
    pub address: u64,
    pub hits: u64,
    pub exits: u64,
    pub skipped: u64,
    pub panics: u64,
    pub lost_exits: u64,
    pub encoding: agent::emitter::CallEncoding,
    /// Pack probes: the vector registers saved around their handlers
    /// (`probes::shared::saves`), 0 for other probes.
    pub saves: u64,
}

#[derive(Debug)]
pub enum SessionError {
    Attach(AttachError),
    Inject(inject::InjectError),
    Remote(remote_call::RemoteCallError),
    /// The agent answered with something unexpected.
    Agent(String),
    /// No probe could be installed; the reasons per probe.
    NothingInstalled(Vec<NotInstalled>),
    /// A patch did not read back as written.
    PatchVerify {
        site: u64,
    },
    /// Another tracer's session holds the target.
    Lock(session_lock::LockError),
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionError::Attach(e) => e.fmt(f),
            SessionError::Inject(e) => e.fmt(f),
            SessionError::Remote(e) => e.fmt(f),
            SessionError::Agent(e) => write!(f, "agent: {e}"),
            // One refusal fits on one line, as every other error does.
            SessionError::NothingInstalled(v) if v.len() == 1 => write!(
                f,
                "cannot probe {} at {:#x}: {}",
                v[0].label, v[0].address, v[0].reason
            ),
            SessionError::NothingInstalled(v) => {
                write!(f, "no probe could be installed:")?;
                for n in v.iter().take(10) {
                    write!(f, "\n  {} at {:#x}: {}", n.label, n.address, n.reason)?;
                }
                if v.len() > 10 {
                    write!(f, "\n  ... and {} more", v.len() - 10)?;
                }
                Ok(())
            }
            SessionError::PatchVerify { site } => {
                write!(f, "the patch at {site:#x} did not read back as written")
            }
            SessionError::Lock(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for SessionError {}

impl From<AttachError> for SessionError {
    fn from(e: AttachError) -> Self {
        SessionError::Attach(e)
    }
}
impl From<inject::InjectError> for SessionError {
    fn from(e: inject::InjectError) -> Self {
        SessionError::Inject(e)
    }
}
impl From<remote_call::RemoteCallError> for SessionError {
    fn from(e: remote_call::RemoteCallError) -> Self {
        SessionError::Remote(e)
    }
}

/// The shared counters, mapped read-only from the target's memfd. Stays valid after the
/// target exits.
struct Counters {
    base: *const u8,
    len: usize,
    /// Shards per slot, from the header (fixed when the agent created the region).
    shards: usize,
    inode: u64,
}

// SAFETY: a read-only mapping owned by this value; its atomics may be read from any thread.
unsafe impl Send for Counters {}

impl Counters {
    /// Map the region at the memfd's current length: the agent extends it when it
    /// needs more counter slots, so map after preparing.
    fn map(pid: i32, info: &AgentInfo) -> Result<Counters, SessionError> {
        let path = format!("/proc/{pid}/fd/{}", info.shared_fd);
        let f = File::open(&path)
            .map_err(|e| SessionError::Agent(format!("cannot open {path}: {e}")))?;
        Counters::map_file(&f, &path)
    }

    /// Map the counter region open as `f` (`path` names it in messages).
    fn map_file(f: &File, path: &str) -> Result<Counters, SessionError> {
        use std::os::unix::fs::MetadataExt;
        let meta = f
            .metadata()
            .map_err(|e| SessionError::Agent(format!("cannot stat {path}: {e}")))?;
        let len = meta.len() as usize;
        if len < SharedHeader::COUNTERS_OFFSET {
            return Err(SessionError::Agent(format!(
                "shared region {path} is {len} bytes, too short"
            )));
        }
        // SAFETY: a new read-only shared mapping of the agent's memfd.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(SessionError::Agent(format!(
                "cannot map {path}: {}",
                std::io::Error::last_os_error()
            )));
        }
        let mut c = Counters {
            base: p as *const u8,
            len,
            shards: 0,
            inode: meta.ino(),
        };
        // SAFETY: the mapping is at least a header long (the agent sized it).
        let h = unsafe { &*(c.base as *const SharedHeader) };
        if h.magic != MAGIC {
            return Err(SessionError::Agent(
                "shared region has a wrong magic".into(),
            ));
        }
        c.shards = h.shards as usize;
        Ok(c)
    }

    /// A probe's counts, summed over its shards.
    fn get(&self, id: u32) -> Counts<'_> {
        let off = SharedHeader::slot_offset(id as usize, self.shards);
        assert!(off + SharedHeader::slot_size(self.shards) <= self.len);
        // SAFETY: in bounds, aligned, atomics written by the agent, laid out as the
        // header says.
        unsafe { Counts::from_slot(self.base.add(off), self.shards) }
    }
}

impl Drop for Counters {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// Probes live in a target.
pub struct Session {
    installed: Vec<Installed>,
    refused: Vec<NotInstalled>,
    notes: Vec<String>,
    counters: Counters,
    /// Whether the patches are still in the target.
    patched: bool,
    /// Held while the probes are live: no other tracer takes them over meanwhile.
    _lock: SessionLock,
    /// The loaded pack's shared region: its memfd in the target and its length.
    pack_region: Option<(i32, u64)>,
    /// The built-in latency aggregates (`--hist`, `--summary`), mapped.
    latency: Option<crate::builtin::latency::LatencyRegion>,
}

/// A pack to load with the session, and where its handlers run.
pub struct PackRequest<'a> {
    pub pack: &'a crate::pack::load::Pack,
    pub sites: &'a [crate::pack::load::PackSite],
}

/// Why `p` gets its entries probed and not its returns, if it does (see
/// [`probeable::entries_only`]); any alias of the function counts.
fn entries_only(modules: &ProcessModules, p: &ResolvedProbe) -> Option<&'static str> {
    let by_name = probeable::entries_only(std::slice::from_ref(&p.symbol), false);
    by_name.or_else(|| {
        modules
            .module_containing(p.address)
            .and_then(|m| probeable::entries_only_at(m, p.address))
    })
}

/// A label such as `libc:malloc` for a resolved probe.
pub fn label(p: &ResolvedProbe, modules: &ProcessModules) -> String {
    let is_main = modules.main().is_some_and(|m| m.path == p.module_path);
    let base = p.module_path.rsplit('/').next().unwrap_or(&p.module_path);
    let short = if is_main {
        "main"
    } else {
        base.split(['.', '-']).next().unwrap_or(base)
    };
    if p.offset != 0 {
        format!("{short}:{}+{:#x}", p.symbol, p.offset)
    } else {
        format!("{short}:{}", p.symbol)
    }
}

/// Calls an exported agent function `f(input, n, out)`: (symbol, input, n, output bytes).
pub type AgentCall<'a> =
    dyn FnMut(&str, &[u8], u64, usize) -> Result<(u64, Vec<u8>), SessionError> + 'a;

/// An action built into the agent (the call tracer) run at every `-p` probe of a
/// session through the probe's handler slots.
pub trait Builtin {
    /// Called once the agent is loaded, before anything is prepared; returns the entry
    /// and exit shims for every probe.
    fn start(&mut self, call: &mut AgentCall<'_>) -> Result<(u64, u64), SessionError>;
}

impl Session {
    /// Inject the agent into a stopped process and install `probes`. Leaves every thread
    /// stopped. On error nothing is patched.
    pub fn install(
        proc: &mut Process,
        modules: &ProcessModules,
        probes: &[ResolvedProbe],
        exit: bool,
        pack: Option<PackRequest<'_>>,
        latency: bool,
    ) -> Result<Session, SessionError> {
        Self::install_with(proc, modules, probes, exit, pack, latency, None)
    }

    /// [`Self::install`] with a built-in action at every `-p` probe (whose returns are
    /// then probed too).
    pub fn install_with(
        proc: &mut Process,
        modules: &ProcessModules,
        probes: &[ResolvedProbe],
        exit: bool,
        pack: Option<PackRequest<'_>>,
        latency: bool,
        builtin: Option<&mut dyn Builtin>,
    ) -> Result<Session, SessionError> {
        let fns = timings::time("libc functions", || inject::libc_functions(proc.pid()))?;
        // An agent left by an earlier session stays loaded (its trampolines may still be
        // in use): reuse it rather than load another copy, each of which would take more
        // of the target's static TLS.
        let earlier = loaded_agent(proc.pid());
        // Started on its own first, so that what follows is timed apart from it.
        timings::time("agent thread", || {
            crate::agent_thread::ensure(proc, &fns, inject::DLOPEN_TIMEOUT)
        })?;
        let base = match earlier {
            Some(base) => base,
            None => {
                timings::time("agent load (dlopen)", || {
                    inject::inject_with(
                        proc,
                        &fns,
                        agent_so(),
                        library_file::AGENT_NAME,
                        Some(crate::agent_blob::agent_hash()),
                        inject::DLOPEN_TIMEOUT,
                    )
                })?
                .base
            }
        };
        let init = base + agent_symbol(INIT_SYMBOL)?;
        let prepare = base + agent_symbol(PREPARE_SYMBOL)?;
        let resolve = base + agent_symbol(RESOLVE_SYMBOL)?;
        let internal = base + agent_symbol(INTERNAL_SYMBOL)?;
        let live = base + agent_symbol(LIVE_SYMBOL)?;
        // Timing is the agent's exit shim in each `-p` probe's return slot.
        let latency_shim = match latency {
            true => base + agent_symbol(probes::latency::EXIT_SHIM_SYMBOL)?,
            false => 0,
        };

        let capacity = (probes.len() as u64 + 64).next_power_of_two().max(1024);
        let info_addr = timings::time("agent init", || {
            inject::call_safely(proc, &fns, init, &[capacity], TIMEOUT)
        })?;
        if info_addr == 0 {
            return Err(SessionError::Agent("initialisation failed".into()));
        }
        let info: AgentInfo = read_struct(proc, info_addr)?;
        if info.magic != AGENT_MAGIC {
            return Err(SessionError::Agent(
                "initialisation returned garbage".into(),
            ));
        }
        // Before anything is adopted or reused: another live tracer's probes are its own.
        let lock = SessionLock::take(proc.pid(), info.shared_fd).map_err(SessionError::Lock)?;
        // Patches a killed tracer left in the code: this session takes them over.
        // An agent loaded just now has none: one remote call less.
        let mut adopted = match earlier {
            Some(_) => timings::time("live probes (adoption)", || live_probes(proc, &fns, live))?,
            None => Vec::new(),
        };
        let left = adopted
            .iter()
            .filter(|a| a.flags & result_flags::INTERNAL == 0)
            .count();

        // IFUNC symbols name resolvers: ask the target's loader what they resolved to,
        // all in one call (below, with the pack's sites).
        let (pack_region, shims) = match &pack {
            Some(pr) => {
                let (res, shims) = load_pack(proc, &fns, base, pr.pack, false)?;
                (Some((res.fd, res.total)), shims)
            }
            None => (None, Vec::new()),
        };
        // Each site: the resolved probe, and the pack's shims there (entry, exit). The
        // pack's come first: a `-p` probe of the same code gives way (the pack's probe
        // counts its hits too).
        let mut all: Vec<(&ResolvedProbe, u64, u64)> = Vec::new();
        if let Some(pr) = &pack {
            let shim = |i: Option<usize>| i.map_or(0, |i| shims[i]);
            for s in pr.sites {
                all.push((&s.probe, shim(s.entry), shim(s.exit)));
            }
        }
        let (entry_action, exit_action) = match builtin {
            Some(b) => b.start(&mut |symbol, input, n, out_len| {
                let f = base + agent_symbol(symbol)?;
                call_with_buffers(proc, &fns, f, input, n, out_len)
            })?,
            None => (0, 0),
        };
        let mut pack_counts = Vec::new();
        for p in probes {
            if all.iter().any(|(q, _, _)| q.address == p.address) {
                pack_counts.push(label(p, modules));
            } else {
                all.push((p, entry_action, exit_action));
            }
        }
        let ifunc_names: Vec<&str> = all
            .iter()
            .filter(|p| p.0.is_ifunc)
            .map(|p| p.0.symbol.split('@').next().unwrap_or(&p.0.symbol))
            .collect();
        let mut ifuncs = timings::time("IFUNC resolution", || {
            resolve_ifuncs(proc, &fns, resolve, &ifunc_names)
        })?
        .into_iter();
        let mut requests = Vec::new();
        let mut labels = Vec::new();
        let mut refused = Vec::new();
        let mut notes: Vec<String> = pack_counts
            .into_iter()
            .map(|l| format!("{l}: probed by the pack, whose probe counts its hits"))
            .collect();
        for &(p, entry_shim, mut exit_shim) in &all {
            let l = label(p, modules);
            let (function, size) = if p.is_ifunc {
                match ifuncs.next().unwrap_or(0) {
                    0 => {
                        refused.push(NotInstalled {
                            label: l,
                            address: p.address,
                            reason: format!(
                                "the target's loader does not resolve the IFUNC {}",
                                p.symbol
                            ),
                        });
                        continue;
                    }
                    addr => {
                        // The implementation's own symbol, when a table has it, gives
                        // its size; otherwise the relocator scans a bounded window.
                        let size = modules
                            .symbol_containing(addr)
                            .filter(|(_, f)| f.address == addr)
                            .map(|(_, f)| f.size)
                            .unwrap_or(0);
                        (addr, size)
                    }
                }
            } else {
                (p.address - p.offset, p.size)
            };
            if latency_shim != 0 && entry_shim == 0 && exit_shim == 0 && p.offset == 0 {
                exit_shim = latency_shim;
            }
            let wants_exit = exit || exit_shim != 0;
            let entries_only = if wants_exit && p.offset == 0 {
                entries_only(modules, p)
            } else {
                None
            };
            if let Some(why) = entries_only {
                notes.push(format!("{l}: only entries are probed: {why}"));
                exit_shim = 0;
            }
            let kind = if p.offset != 0 {
                ProbeKind::Offset
            } else if wants_exit && entries_only.is_none() {
                ProbeKind::Exit
            } else {
                ProbeKind::Entry
            };
            let mut req = PrepareRequest {
                function,
                size,
                offset: p.offset,
                kind: kind as u32,
                entry_shim,
                exit_shim,
                ..PrepareRequest::default()
            };
            req.set_label(&l);
            requests.push(req);
            labels.push((l, p));
        }

        let rss_before = timings::enabled()
            .then(|| timings::rss_kib(proc.pid()))
            .flatten();
        let results = timings::time("prepare (remote)", || {
            prepare_remote(proc, &fns, prepare, &requests)
        })?;
        record_trampoline_spacing(&results);
        record_probe_memory(proc.pid(), rss_before, &results);
        let counters = timings::time("counters mapped", || Counters::map(proc.pid(), &info))?;
        let mut installed = Vec::new();
        for ((r, (l, p)), req) in results.iter().zip(&labels).zip(&requests) {
            if r.status != status::PREPARED {
                refused.push(NotInstalled {
                    label: l.clone(),
                    address: req.function + req.offset,
                    reason: r.message(),
                });
                continue;
            }
            // Two probes whose patched ranges overlap would write one jump into the
            // other (an IFUNC named both ways, an offset inside another probe's stolen
            // bytes): the first one stays, the other is refused.
            let end = r.site + r.stolen_len as u64;
            if let Some(other) = installed
                .iter()
                .find(|o: &&Installed| r.site < o.site + o.stolen_len && o.site < end)
            {
                refused.push(NotInstalled {
                    label: l.clone(),
                    address: r.site,
                    reason: if other.site == r.site {
                        format!("the same code as {} is already probed", other.label)
                    } else {
                        format!(
                            "its patch would overlap that of {} at {:#x}",
                            other.label, other.site
                        )
                    },
                });
                continue;
            }
            // A site an earlier tracer left patched is simply taken over; a probe whose
            // patch would overlap such a patch without being the same site is refused.
            adopted.retain(|a| a.site != r.site);
            if let Some(a) = adopted
                .iter()
                .find(|a| r.site < a.site + a.stolen_len as u64 && a.site < end)
            {
                refused.push(NotInstalled {
                    label: l.clone(),
                    address: r.site,
                    reason: format!(
                        "its patch would overlap that of a probe an earlier tracer left at \
                         {:#x}",
                        a.site
                    ),
                });
                continue;
            }
            installed.push(Installed::from_result(
                r,
                l.clone(),
                p.module_path.clone(),
                p.symbol.clone(),
            ));
        }
        if installed.is_empty() {
            return Err(SessionError::NothingInstalled(refused));
        }
        // Exit probes need the agent's unwinder hooks patched too, so that C++
        // exceptions thrown through probed frames find real return addresses.
        let any_exit = requests.iter().any(|r| r.kind == ProbeKind::Exit as u32);
        if any_exit {
            let hooks = timings::time("exception hooks", || internal_probes(proc, &fns, internal))?;
            for r in hooks {
                // Without the hook, an exception thrown while returns are probed aborts
                // the program: a probe the user asked for on the same code gives way.
                if let Some(i) = installed.iter().position(|p| p.site == r.site && !p.hidden) {
                    let user = installed.remove(i);
                    refused.push(NotInstalled {
                        label: user.label,
                        address: user.site,
                        reason: "tracer's own exception hook sits there while returns are \
                                 probed (-x); probe it without -x"
                            .into(),
                    });
                }
                if !installed.iter().any(|p| p.site == r.site)
                    && !adopted.iter().any(|a| a.site == r.site)
                {
                    installed.push(Installed::from_result(
                        &r,
                        String::new(),
                        String::new(),
                        String::new(),
                    ));
                    installed.last_mut().expect("pushed").hidden = true;
                }
            }
        }
        if installed.iter().all(|p| p.hidden) {
            return Err(SessionError::NothingInstalled(refused));
        }
        if left > 0 {
            notes.push(format!(
                "adopted {left} probe(s) left by an earlier tracer that did not detach; \
                 they are removed when this session detaches"
            ));
        }
        // Restored at detach like this session's own, not reported.
        for a in &adopted {
            let mut p = Installed::from_result(a, String::new(), String::new(), String::new());
            p.hidden = true;
            installed.push(p);
        }
        let latency = match latency {
            true => Some(open_latency(proc, &fns, base, &installed)?),
            false => None,
        };
        let mut s = Session {
            installed,
            refused,
            notes,
            counters,
            patched: false,
            _lock: lock,
            pack_region,
            latency,
        };
        timings::time("patch", || s.write_patches(proc, true))?;
        Ok(s)
    }

    /// Write the patches (or the original bytes) with every thread stopped and no thread
    /// strictly inside a patched range.
    fn write_patches(&mut self, proc: &mut Process, install: bool) -> Result<(), SessionError> {
        if !proc.all_stopped() {
            proc.stop_all()?;
        }
        if install {
            // Each thread's registers read once, not once per probe (10,000 probes times
            // every thread were as many ptrace calls).
            for tid in proc.threads() {
                let mut rip = proc.regs(tid)?.rip;
                for p in &self.installed {
                    if rip > p.site && rip < p.site + p.stolen_len {
                        rip = proc.step_out_of(tid, p.site + 1, p.site + p.stolen_len, 64)?;
                    }
                }
            }
        }
        let writes: Vec<(u64, [u8; 5])> = self
            .installed
            .iter()
            .map(|p| (p.site, if install { p.patch } else { p.original }))
            .collect();
        write_all_verified(proc, &writes)?;
        self.patched = install;
        Ok(())
    }

    /// Stop every thread, restore every original byte (read back to check). Trampolines
    /// stay mapped: threads may be inside them or return through them.
    ///
    /// Only sites that still hold our patch are restored: the target ran untraced since
    /// the install and may have exec'd another program (or rewritten its code), and
    /// writing there would corrupt code that is not ours. Returns the labels of the
    /// probes whose patch was gone (left alone).
    pub fn remove(&mut self, proc: &mut Process) -> Result<Vec<String>, SessionError> {
        if !self.patched {
            return Ok(Vec::new());
        }
        let gone = self.restore_in(proc)?;
        self.patched = false;
        Ok(gone)
    }

    /// [`Session::remove`] in another process holding a copy of these patches (a forked
    /// child of the process the session installed them in); the session stays as it is.
    pub fn restore_in(&self, proc: &mut Process) -> Result<Vec<String>, SessionError> {
        let mut gone = Vec::new();
        if !proc.all_stopped() {
            proc.stop_all()?;
        }
        let sites: Vec<u64> = self.installed.iter().map(|p| p.site).collect();
        let now = read_sites(proc, &sites);
        let mut writes = Vec::new();
        for (p, now) in self.installed.iter().zip(now) {
            if now != Some(p.patch) {
                gone.push(if p.hidden {
                    format!("the agent's hook at {:#x}", p.site)
                } else {
                    p.label.clone()
                });
                continue;
            }
            writes.push((p.site, p.original));
        }
        write_all_verified(proc, &writes)?;
        Ok(gone)
    }

    /// The loaded pack's shared region: `/proc/PID/fd/N` for its memfd `N`, and its length.
    pub fn pack_region(&self) -> Option<(i32, u64)> {
        self.pack_region
    }

    /// The built-in latency aggregates, when asked for.
    pub fn latency(&self) -> Option<&crate::builtin::latency::LatencyRegion> {
        self.latency.as_ref()
    }

    /// The user's probes that are installed.
    pub fn installed(&self) -> Vec<&Installed> {
        self.installed.iter().filter(|p| !p.hidden).collect()
    }

    pub fn refused(&self) -> &[NotInstalled] {
        &self.refused
    }

    /// Things users should know about how their probes were installed.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The inode of the counter region's memfd: a forked child names its parent's region
    /// by it.
    pub fn counters_inode(&self) -> u64 {
        self.counters.inode
    }

    /// The counters of every installed probe as `region` holds them: the counter region
    /// of a forked child of the process (same probes, same slots, counts of its own).
    pub fn report_from(&self, region: &File) -> Result<Vec<ProbeReport>, SessionError> {
        Ok(self.report_with(&Counters::map_file(region, "a forked child's counters")?))
    }

    /// Current counters of every installed probe.
    pub fn report(&self) -> Vec<ProbeReport> {
        self.report_with(&self.counters)
    }

    fn report_with(&self, counters: &Counters) -> Vec<ProbeReport> {
        self.installed()
            .into_iter()
            .map(|p| {
                let c = counters.get(p.id);
                ProbeReport {
                    label: p.label.clone(),
                    module: p.module.clone(),
                    symbol: p.symbol.clone(),
                    address: p.site,
                    hits: c.hits(),
                    exits: c.exits(),
                    skipped: c.skipped(),
                    panics: c.panics(),
                    lost_exits: c.lost_exits(),
                    encoding: p.encoding,
                    saves: c.line.saves.load(std::sync::atomic::Ordering::Relaxed),
                }
            })
            .collect()
    }
}

/// For `--timings`: the mean distance between consecutive trampolines of this prepare
/// (code, relocated bytes, jump back and alignment padding; gaps over a page, between
/// chunks, left out).
fn record_trampoline_spacing(results: &[PrepareResult]) {
    let mut t: Vec<u64> = results
        .iter()
        .filter(|r| r.status == status::PREPARED)
        .map(|r| r.trampoline)
        .collect();
    t.sort_unstable();
    t.dedup();
    let gaps: Vec<u64> = t
        .windows(2)
        .map(|w| w[1] - w[0])
        .filter(|&g| g <= 4096)
        .collect();
    if !gaps.is_empty() {
        let mean = gaps.iter().sum::<u64>() / gaps.len() as u64;
        timings::figure("trampoline bytes per probe (mean spacing)", mean);
        timings::figure("trampolines measured", gaps.len() as u64 + 1);
    }
}

/// For `--timings`: the trampoline code made per new probe, its relocated instructions
/// aside (what a probe costs in code whatever it takes over), and what preparing added
/// to the target's resident memory per probe (trampolines, counters, the agent's
/// bookkeeping; the agent itself is loaded before).
fn record_probe_memory(pid: i32, rss_before: Option<u64>, results: &[PrepareResult]) {
    let made: Vec<&PrepareResult> = results
        .iter()
        .filter(|r| r.status == status::PREPARED && r.code_len > 0)
        .collect();
    if !made.is_empty() {
        let code: u64 = made
            .iter()
            .map(|r| (r.code_len - r.relocated_len.min(r.code_len)) as u64)
            .sum();
        let relocated: u64 = made.iter().map(|r| r.relocated_len as u64).sum();
        let n = made.len() as u64;
        timings::figure(
            "trampoline code bytes per probe (relocated aside)",
            code / n,
        );
        timings::figure("relocated bytes per probe", relocated / n);
    }
    if let (Some(before), Some(after)) = (rss_before, timings::rss_kib(pid)) {
        let n = results.len().max(1) as u64;
        timings::figure(
            "target RSS added by prepare per probe (bytes)",
            after.saturating_sub(before) * 1024 / n,
        );
    }
}

/// Sites close together (within [`SPAN`] bytes) are read and written as one span: 10,000
/// patches were 20,000 system calls on `/proc/PID/mem`, now a few per page. Every thread
/// is stopped, so the bytes between the sites are written back as they were just read.
const SPAN: u64 = 4096;

/// `sites` grouped into spans: (start, end, indices into `sites`), `sites` in any order.
fn spans(sites: &[u64]) -> Vec<(u64, u64, Vec<usize>)> {
    let mut order: Vec<usize> = (0..sites.len()).collect();
    order.sort_by_key(|&i| sites[i]);
    let mut out: Vec<(u64, u64, Vec<usize>)> = Vec::new();
    for i in order {
        let (start, end) = (sites[i], sites[i] + 5);
        match out.last_mut() {
            // Only sites starting in a page the span already covers: every byte written
            // back is then in a page some patch needs mapped.
            Some(s) if end - s.0 <= SPAN && start / 4096 <= (s.1 - 1) / 4096 => {
                s.1 = s.1.max(end);
                s.2.push(i);
            }
            _ => out.push((start, end, vec![i])),
        }
    }
    out
}

/// The 5 bytes at each site (None where unreadable).
fn read_sites(proc: &Process, sites: &[u64]) -> Vec<Option<[u8; 5]>> {
    let mut out = vec![None; sites.len()];
    for (start, end, members) in spans(sites) {
        let mut buf = vec![0u8; (end - start) as usize];
        let whole = proc.read_memory(start, &mut buf).is_ok();
        for i in members {
            let mut b = [0u8; 5];
            let ok = if whole {
                let off = (sites[i] - start) as usize;
                b.copy_from_slice(&buf[off..off + 5]);
                true
            } else {
                proc.read_memory(sites[i], &mut b).is_ok()
            };
            out[i] = ok.then_some(b);
        }
    }
    out
}

/// Writes each (site, bytes) and reads it back to check, span by span.
fn write_all_verified(proc: &Process, writes: &[(u64, [u8; 5])]) -> Result<(), SessionError> {
    let sites: Vec<u64> = writes.iter().map(|w| w.0).collect();
    for (start, end, members) in spans(&sites) {
        let fail = || SessionError::PatchVerify {
            site: sites[members[0]],
        };
        let mut buf = vec![0u8; (end - start) as usize];
        proc.read_memory(start, &mut buf).map_err(|_| fail())?;
        for &i in &members {
            let off = (sites[i] - start) as usize;
            buf[off..off + 5].copy_from_slice(&writes[i].1);
        }
        proc.write_memory(start, &buf).map_err(|_| fail())?;
        let mut back = vec![0u8; buf.len()];
        proc.read_memory(start, &mut back).map_err(|_| fail())?;
        if let Some(&i) = members.iter().find(|&&i| {
            let off = (sites[i] - start) as usize;
            back[off..off + 5] != writes[i].1
        }) {
            return Err(SessionError::PatchVerify { site: sites[i] });
        }
    }
    Ok(())
}

const TIMEOUT: Duration = Duration::from_secs(20);

/// Have the agent make its latency region, with a slot for every probe id installed
/// (ids are known once prepared), and map it.
fn open_latency(
    proc: &mut Process,
    fns: &LibcFunctions,
    base: u64,
    installed: &[Installed],
) -> Result<crate::builtin::latency::LatencyRegion, SessionError> {
    let slots = installed.iter().map(|p| p.id as u64 + 1).max().unwrap_or(1);
    let f = base + agent_symbol(probes::latency::REGION_SYMBOL)?;
    let at = inject::call_safely(proc, fns, f, &[slots], TIMEOUT)?;
    if at == 0 {
        return Err(SessionError::Agent(
            "the agent could not create its latency region".into(),
        ));
    }
    let info: probes::latency::LatencyInfo = read_struct(proc, at)?;
    crate::builtin::latency::LatencyRegion::open(proc.pid(), &info).map_err(SessionError::Agent)
}

/// Load address of an agent an earlier session left in the target, if any.
pub(crate) fn loaded_agent(pid: i32) -> Option<u64> {
    let maps = agent::maps::read_pid(pid).ok()?;
    maps.iter()
        .filter(|m| library_file::is_agent(&m.path) && m.offset == 0)
        .map(|m| m.start)
        .min()
}

/// Offset of an exported function in the embedded agent (linked at address 0).
pub(crate) fn agent_symbol(name: &str) -> Result<u64, SessionError> {
    use object::{Object, ObjectSymbol};
    let file = object::File::parse(agent_so())
        .map_err(|e| SessionError::Agent(format!("embedded agent unreadable: {e}")))?;
    file.dynamic_symbols()
        .find(|s| s.name() == Ok(name))
        .map(|s| s.address())
        .ok_or_else(|| SessionError::Agent(format!("embedded agent lacks {name}")))
}

fn read_struct<T: Copy + Default>(proc: &Process, addr: u64) -> Result<T, SessionError> {
    let mut v = T::default();
    // SAFETY: T is a plain-old-data repr(C) record; any bytes make a valid value of the
    // integer fields it holds.
    let buf =
        unsafe { std::slice::from_raw_parts_mut(&mut v as *mut T as *mut u8, size_of::<T>()) };
    proc.read_memory(addr, buf)
        .map_err(|e| SessionError::Agent(format!("cannot read agent memory: {e}")))?;
    Ok(v)
}

fn as_bytes<T>(v: &[T]) -> &[u8] {
    // SAFETY: viewing plain-old-data records as bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// Run `function(input, n, output)` in the target, `input` copied into a fresh private
/// mapping and `out_len` bytes of output read back from the same mapping.
pub(crate) fn call_with_buffers(
    proc: &mut Process,
    fns: &LibcFunctions,
    function: u64,
    input: &[u8],
    n: u64,
    out_len: usize,
) -> Result<(u64, Vec<u8>), SessionError> {
    // Output records are read in place by the agent: keep them aligned.
    let out_off = input.len().next_multiple_of(64);
    let len = (out_off + out_len).max(1).next_multiple_of(4096);
    let tid = proc.threads()[0];
    // Small buffers go in the scratch area: two remote system calls fewer (0.1 to 0.2 ms).
    let scratch = proc.scratch().filter(|s| len as u64 <= s.data_len);
    let buf = match scratch {
        Some(s) => s.data,
        None => remote_call::syscall_ok(
            proc,
            tid,
            libc::SYS_mmap,
            &[
                0,
                len as u64,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
        )?,
    };
    let out = buf + out_off as u64;
    let result = (|| {
        proc.write_memory(buf, input)
            .map_err(|e| SessionError::Agent(format!("cannot write to the target: {e}")))?;
        let ret = inject::call_safely(proc, fns, function, &[buf, n, out], TIMEOUT)?;
        let mut bytes = vec![0u8; out_len];
        proc.read_memory(out, &mut bytes)
            .map_err(|e| SessionError::Agent(format!("cannot read from the target: {e}")))?;
        Ok((ret, bytes))
    })();
    if scratch.is_none() {
        let tid = proc.threads()[0];
        let _ = remote_call::syscall(proc, tid, libc::SYS_munmap, &[buf, len as u64]);
    }
    result
}

/// Load a pack next to the agent: inject its library, then in one remote call create its
/// shared region, bind its maps and ring and look up its shims. Returns the region and
/// each handler's shim address, in the order of the pack's probe descriptors.
fn load_pack(
    proc: &mut Process,
    fns: &LibcFunctions,
    agent_base: u64,
    pack: &crate::pack::load::Pack,
    swap: bool,
) -> Result<(probes::remote::PackLoadResult, Vec<u64>), SessionError> {
    use probes::remote::{PackLoadRequest, PackLoadResult, PackSymbol};
    let info = &pack.info;
    let symbol = |kind, params, name: &str| {
        PackSymbol::new(kind, params, name)
            .ok_or_else(|| SessionError::Agent(format!("pack symbol {name} is too long")))
    };
    let mut syms = Vec::new();
    for m in &info.maps {
        syms.push(symbol(m.kind, m.params, &m.symbol)?);
    }
    for p in &info.probes {
        syms.push(symbol(0, [p.flags, 0, 0, 0], &p.symbol)?);
    }
    let loaded = inject::inject_named(proc, &pack.bytes, &pack.name)?;
    let mut head = PackLoadRequest {
        handle: loaded.handle,
        ring_bytes: probes::pack::abi::RING_BYTES as u64,
        maps: info.maps.len() as u32,
        shims: info.probes.len() as u32,
        swap: swap as u32,
        ..PackLoadRequest::default()
    };
    let n = pack.name.len().min(head.name.len() - 1);
    head.name[..n].copy_from_slice(&pack.name.as_bytes()[..n]);
    let mut input = as_bytes(std::slice::from_ref(&head)).to_vec();
    input.extend_from_slice(as_bytes(&syms));
    let out_len = size_of::<PackLoadResult>() + 8 * info.probes.len();
    let function = agent_base + agent_symbol(probes::remote::LOAD_PACK_SYMBOL)?;
    let (ok, bytes) = call_with_buffers(proc, fns, function, &input, 1, out_len)?;
    // SAFETY: PackLoadResult is plain old data and `bytes` holds at least one.
    let res = unsafe { (bytes.as_ptr() as *const PackLoadResult).read_unaligned() };
    if ok != 1 {
        return Err(SessionError::Agent(format!(
            "cannot {} the pack {}: {}",
            if swap { "swap in" } else { "load" },
            info.path.display(),
            res.message()
        )));
    }
    if res.abi != probes::pack::abi::ABI_VERSION {
        return Err(SessionError::Agent(format!(
            "the pack {} reports probes ABI v{} once loaded, this tracer speaks v{}: rebuild it",
            info.path.display(),
            res.abi,
            probes::pack::abi::ABI_VERSION
        )));
    }
    let shims = bytes[size_of::<PackLoadResult>()..]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    Ok((res, shims))
}

/// Whether another tracer's session holds `pid` now (it has the agent's shared memory
/// locked), found without touching the process.
pub fn other_session_live(pid: i32) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        let is_agent = std::fs::read_link(fd.path())
            .is_ok_and(|l| l.to_string_lossy().starts_with("/memfd:tracer-shared"));
        is_agent && File::open(fd.path()).is_ok_and(|f| session_lock::held(&f))
    })
}

/// Hot swap: replace the handlers of the pack of the same name running in the stopped
/// process `proc` (another tracer's session) by `pack`'s, its maps kept. Nothing is
/// patched. Returns how many handler slots changed.
pub fn swap_pack(proc: &mut Process, pack: &crate::pack::load::Pack) -> Result<u64, SessionError> {
    let fns = inject::libc_functions(proc.pid())?;
    let base = loaded_agent(proc.pid())
        .ok_or_else(|| SessionError::Agent("no tracer agent in the process".into()))?;
    let (res, _) = load_pack(proc, &fns, base, pack, true)?;
    Ok(res.swapped)
}

/// Send the requests to the agent in one remote call and read the results back.
fn prepare_remote(
    proc: &mut Process,
    fns: &LibcFunctions,
    prepare: u64,
    requests: &[PrepareRequest],
) -> Result<Vec<PrepareResult>, SessionError> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let res_len = requests.len() * size_of::<PrepareResult>();
    let (_, bytes) = call_with_buffers(
        proc,
        fns,
        prepare,
        as_bytes(requests),
        requests.len() as u64,
        res_len,
    )?;
    let mut results = vec![PrepareResult::default(); requests.len()];
    // SAFETY: PrepareResult is plain old data; the agent wrote `res_len` bytes of them.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), results.as_mut_ptr() as *mut u8, res_len)
    };
    Ok(results)
}

/// The agent's own probes, to patch along with exit probes.
fn internal_probes(
    proc: &mut Process,
    fns: &LibcFunctions,
    internal: u64,
) -> Result<Vec<PrepareResult>, SessionError> {
    Ok(list_remote(proc, fns, internal, 16)?.1)
}

/// The probes whose patches are in the code now: left by a tracer that was killed.
fn live_probes(
    proc: &mut Process,
    fns: &LibcFunctions,
    live: u64,
) -> Result<Vec<PrepareResult>, SessionError> {
    // 128 results (33 KiB) fit the scratch area: no buffer to map and unmap.
    let mut cap = 128;
    loop {
        let (count, v) = list_remote(proc, fns, live, cap)?;
        if count <= cap {
            return Ok(v);
        }
        // Every thread is stopped: the count does not change before the next call.
        cap = count;
    }
}

/// Call an agent function `f(_, cap, out) -> count` that writes up to `cap` results;
/// returns the count and the results written.
fn list_remote(
    proc: &mut Process,
    fns: &LibcFunctions,
    function: u64,
    cap: usize,
) -> Result<(usize, Vec<PrepareResult>), SessionError> {
    let (count, bytes) = call_with_buffers(
        proc,
        fns,
        function,
        &[],
        cap as u64,
        cap * size_of::<PrepareResult>(),
    )?;
    let mut results = vec![PrepareResult::default(); cap];
    // SAFETY: PrepareResult is plain old data; the agent wrote up to `cap` of them.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), results.as_mut_ptr() as *mut u8, bytes.len())
    };
    results.truncate((count as usize).min(cap));
    Ok((count as usize, results))
}

/// Where the target's loader resolved each IFUNC (0 when it did not), in one remote call.
fn resolve_ifuncs(
    proc: &mut Process,
    fns: &LibcFunctions,
    resolve: u64,
    names: &[&str],
) -> Result<Vec<u64>, SessionError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let mut input = Vec::new();
    for n in names {
        input.extend_from_slice(n.as_bytes());
        input.push(0);
    }
    let (_, bytes) = call_with_buffers(
        proc,
        fns,
        resolve,
        &input,
        names.len() as u64,
        names.len() * 8,
    )?;
    Ok(bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::spans;

    /// Sites close together share a span; a site starting in a page the span does not
    /// cover starts another (the bytes between might not be mapped); every site is in exactly
    /// one span, whatever the input order.
    #[test]
    fn spans_join_sites_within_the_pages_they_cover() {
        let sites = [0x1010, 0x1ffd, 0x1000, 0x2008, 0x5000, 0x5004];
        let s = spans(&sites);
        assert_eq!(
            s.iter().map(|(a, b, _)| (*a, *b)).collect::<Vec<_>>(),
            // A span stays within SPAN bytes: 0x1ffd starts another, whose bytes reach
            // into page 0x2000, so 0x2008 joins it.
            vec![(0x1000, 0x1015), (0x1ffd, 0x200d), (0x5000, 0x5009)]
        );
        let mut all: Vec<usize> = s.iter().flat_map(|(_, _, m)| m.clone()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..sites.len()).collect::<Vec<_>>());
        assert_eq!(spans(&[0x1ff0, 0x3000]).len(), 2);
    }
}

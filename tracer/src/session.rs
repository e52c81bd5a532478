//! A probing session: inject the agent, prepare every probe in one remote call, patch the
//! sites with every thread stopped, read the shared counters, and undo the patches.
//!
//! Parts: `agent_calls` loads (or reuses) the agent and makes the remote calls into it,
//! `install` turns resolved probes into requests and prepared results into installed
//! probes, `patch` writes and restores the patches, `report` reads the counters.
//! [`Session::install`] is the sequence of those steps.

mod agent_calls;
mod install;
mod patch;
mod report;

pub(crate) use agent_calls::{agent_symbol, call_with_buffers, loaded_agent};
pub use agent_calls::{other_session_live, swap_pack};

use crate::inject;
use crate::remote_call;
use crate::session_lock::{self, SessionLock};
use crate::spec::ResolvedProbe;
use crate::symbols::ProcessModules;
use crate::threads::{AttachError, Process};
use crate::timings;
use probes::abi::remote::{result_flags, PrepareResult};
use report::Counters;
use std::fmt;

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
    fn from_result(
        r: &PrepareResult,
        label: String,
        module: String,
        symbol: String,
    ) -> Result<Self, SessionError> {
        let encoding = agent::emitter::CallEncoding::try_from(r.encoding).map_err(|n| {
            SessionError::Agent(format!(
                "unknown call encoding {n} for the probe at {:#x}: the tracer and its agent \
                 were built apart",
                r.site
            ))
        })?;
        let mut patch = [0u8; 5];
        patch.copy_from_slice(&r.patch[..5]);
        let mut original = [0u8; 5];
        original.copy_from_slice(&r.original[..5]);
        Ok(Installed {
            label,
            module,
            symbol,
            site: r.site,
            id: r.id,
            encoding,
            patch,
            original,
            stolen_len: r.stolen_len as u64,
            hidden: false,
        })
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
    /// (`probes::abi::shared::saves`), 0 for other probes.
    pub saves: u64,
    /// The same for `zmm16-31` and `k0-7` (`probes::abi::shared::saves::avx512`).
    pub saves_avx512: u64,
}

#[derive(Debug)]
pub enum SessionError {
    Attach(AttachError),
    Inject(inject::InjectError),
    Remote(remote_call::RemoteCallError),
    /// The agent answered with something unexpected.
    Agent(String),
    /// The agent's latency region cannot be read.
    Latency(crate::builtin::latency::LatencyError),
    /// Reading or writing the agent's memory or its shared region failed.
    AgentIo {
        what: String,
        error: std::io::Error,
    },
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
            SessionError::Latency(e) => write!(f, "agent: {e}"),
            SessionError::AgentIo { what, error } => write!(f, "agent: {what}: {error}"),
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

impl std::error::Error for SessionError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // Each wrapped layer is shown as itself: its cause is this one's.
        match self {
            SessionError::Attach(e) => e.source(),
            SessionError::Inject(e) => e.source(),
            SessionError::Remote(e) => e.source(),
            SessionError::Lock(e) => e.source(),
            SessionError::AgentIo { error, .. } => Some(error),
            SessionError::Latency(e) => Some(e),
            _ => None,
        }
    }
}

/// `SessionError::AgentIo` for what failed.
fn agent_io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SessionError {
    let what = what.into();
    move |error| SessionError::AgentIo { what, error }
}

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
        let agent = agent_calls::Agent::load(proc, probes.len(), modules)?;
        // Timing is the agent's exit shim in each `-p` probe's return slot.
        let latency_shim = match latency {
            true => agent.base + agent_calls::agent_symbol(probes::latency::EXIT_SHIM_SYMBOL)?,
            false => 0,
        };
        // Before anything is adopted or reused: another live tracer's probes are its own.
        let lock =
            SessionLock::take(proc.pid(), agent.info.shared_fd).map_err(SessionError::Lock)?;
        let (pack_region, shims) = match &pack {
            Some(pr) => {
                let (res, shims) =
                    agent_calls::load_pack(proc, &agent.fns, agent.base, pr.pack, false)?;
                (Some((res.fd, res.total)), shims)
            }
            None => (None, Vec::new()),
        };
        let actions = Self::start_builtin(proc, &agent, builtin)?;
        let (sites, pack_counts) = install::sites(pack.as_ref(), &shims, probes, modules, actions);
        let mut req = install::requests(
            &sites,
            Self::resolve_ifuncs(proc, &agent, &sites)?,
            modules,
            exit,
            pack_counts,
            latency_shim,
        );
        let (results, mut adopted) = Self::prepare(proc, &agent, &req)?;
        let counters = timings::time("counters mapped", || Counters::map(proc.pid(), &agent.info))?;
        let installed = Self::probes_to_patch(proc, &agent, &results, &mut req, &mut adopted)?;
        let latency = match latency {
            true => Some(agent_calls::open_latency(
                proc, &agent.fns, agent.base, &installed,
            )?),
            false => None,
        };
        let mut s = Session {
            installed,
            refused: req.refused,
            notes: req.notes,
            counters,
            patched: false,
            _lock: lock,
            pack_region,
            latency,
        };
        timings::time("patch", || s.write_patches(proc, true))?;
        Ok(s)
    }

    /// The built-in action's entry and exit shims (0, 0 without one), once it started.
    fn start_builtin(
        proc: &mut Process,
        agent: &agent_calls::Agent,
        builtin: Option<&mut dyn Builtin>,
    ) -> Result<(u64, u64), SessionError> {
        match builtin {
            Some(b) => b.start(&mut |symbol, input, n, out_len| {
                let f = agent.base + agent_calls::agent_symbol(symbol)?;
                agent_calls::call_with_buffers(proc, &agent.fns, f, input, n, out_len)
            }),
            None => Ok((0, 0)),
        }
    }

    /// Where the target's loader resolved each IFUNC site, in order: IFUNC symbols name
    /// resolvers, so the loader is asked, all in one call.
    fn resolve_ifuncs(
        proc: &mut Process,
        agent: &agent_calls::Agent,
        sites: &[install::Site<'_>],
    ) -> Result<Vec<u64>, SessionError> {
        timings::time("IFUNC resolution", || {
            agent_calls::resolve_ifuncs(
                proc,
                &agent.fns,
                agent.resolve,
                &install::ifunc_names(sites),
            )
        })
    }

    /// The agent prepares every request (trampolines built, nothing patched yet).
    fn prepare(
        proc: &mut Process,
        agent: &agent_calls::Agent,
        req: &install::Requests<'_>,
    ) -> Result<(Vec<PrepareResult>, Vec<PrepareResult>), SessionError> {
        let rss_before = timings::enabled()
            .then(|| timings::rss_kib(proc.pid()))
            .flatten();
        // With the patches a killed tracer left in the code: this session takes them over.
        let (results, adopted) = timings::time("prepare (remote)", || {
            agent.prepare_adopting(proc, &req.requests)
        })?;
        install::record_trampoline_spacing(&results);
        install::record_probe_memory(proc.pid(), rss_before, &results);
        Ok((results, adopted))
    }

    /// The probes to patch: the prepared ones that do not overlap, the agent's unwinder
    /// hooks when returns are probed, and what an earlier tracer left (`adopted`,
    /// hidden). `NothingInstalled` when no probe asked for is among them.
    fn probes_to_patch(
        proc: &mut Process,
        agent: &agent_calls::Agent,
        results: &[PrepareResult],
        req: &mut install::Requests<'_>,
        adopted: &mut Vec<PrepareResult>,
    ) -> Result<Vec<Installed>, SessionError> {
        let left = adopted
            .iter()
            .filter(|a| a.flags & result_flags::INTERNAL == 0)
            .count();
        // Nothing asked (a followed command none of whose specs match in the launched
        // program itself, e.g. `sh -c ./prog`): an empty session that loads the agent,
        // so that the programs it starts are followed.
        let asked = !req.requests.is_empty();
        let mut installed = install::collect(results, req, adopted)?;
        if installed.is_empty() && !asked {
            return Ok(installed);
        }
        if installed.is_empty() {
            return Err(SessionError::NothingInstalled(std::mem::take(
                &mut req.refused,
            )));
        }
        // Exit probes need the agent's unwinder hooks patched too, so that C++
        // exceptions thrown through probed frames find real return addresses.
        if req.any_exit() {
            let hooks = timings::time("exception hooks", || {
                agent_calls::internal_probes(proc, &agent.fns, agent.internal)
            })?;
            install::add_hooks(hooks, &mut installed, &mut req.refused, adopted)?;
        }
        if installed.iter().all(|p| p.hidden) {
            return Err(SessionError::NothingInstalled(std::mem::take(
                &mut req.refused,
            )));
        }
        if left > 0 {
            req.notes.push(format!(
                "adopted {left} probe(s) left by an earlier tracer that did not detach; \
                 they are removed when this session detaches"
            ));
        }
        // Restored at detach like this session's own, not reported.
        for a in adopted.iter() {
            let mut p = Installed::from_result(a, String::new(), String::new(), String::new())?;
            p.hidden = true;
            installed.push(p);
        }
        Ok(installed)
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
}

#[cfg(test)]
mod tests {
    use super::{Installed, PrepareResult};

    /// A layer's error keeps the cause under it: the OS error of a failed /proc read is
    /// reachable from the session error that wraps it, with the same one-line message.
    #[test]
    fn session_errors_keep_their_cause() {
        use std::error::Error;
        let io = std::io::Error::from_raw_os_error(libc::ESRCH);
        let e = super::SessionError::Attach(crate::threads::AttachError::Io {
            pid: 1,
            what: "status".into(),
            error: io,
        });
        let cause = e.source().expect("a cause");
        let io = cause
            .downcast_ref::<std::io::Error>()
            .expect("the io error");
        assert_eq!(io.raw_os_error(), Some(libc::ESRCH));
        assert!(!e.to_string().contains('\n'), "{e}");
    }

    /// An encoding number the agent should never send is refused, not read as another
    /// encoding: the report would name a call form the trampoline does not use.
    #[test]
    fn an_unknown_call_encoding_from_the_agent_is_an_error() {
        let mut r = PrepareResult {
            encoding: 1,
            ..PrepareResult::default()
        };
        let ok = Installed::from_result(&r, "l".into(), "m".into(), "s".into()).unwrap();
        assert_eq!(ok.encoding, agent::emitter::CallEncoding::RipSlot);
        r.encoding = 9;
        let e = Installed::from_result(&r, "l".into(), "m".into(), "s".into())
            .expect_err("encoding 9 names nothing");
        assert!(e.to_string().contains("unknown call encoding 9"), "{e}");
    }
}

//! The agent in the target: loading it (or reusing the one an earlier session left),
//! and the remote calls into it, each with its records in a private mapping.

use super::SessionError;
use crate::agent_blob::agent_so;
use crate::inject::{self, LibcFunctions};
use crate::library_file;
use crate::remote_call;
use crate::session_lock;
use crate::symbols::ProcessModules;
use crate::threads::Process;
use crate::timings;
use probes::abi::remote::{
    AgentInfo, PrepareRequest, PrepareResult, AGENT_MAGIC, INFO_SYMBOL, INIT_SYMBOL,
    INTERNAL_SYMBOL, LIVE_CAP_WITH_PREPARE, LIVE_SYMBOL, PREPARE_LIVE_SYMBOL, PREPARE_SYMBOL,
    RESOLVE_SYMBOL,
};
use probes::pod::{self, Pod};
use std::fs::File;
use std::time::Duration;

/// The agent loaded in the target: libc's functions there, where the agent is, what its
/// init said, and its entry points.
pub(super) struct Agent {
    pub fns: LibcFunctions,
    pub base: u64,
    /// Whether an earlier session loaded it (it may have probes left to adopt).
    pub reused: bool,
    pub info: AgentInfo,
    pub prepare: u64,
    pub resolve: u64,
    pub internal: u64,
    pub live: u64,
    pub prepare_live: u64,
}

impl Agent {
    /// Inject the agent, or reuse the one an earlier session left, and initialise it with
    /// room for `probes` probes.
    pub fn load(
        proc: &mut Process,
        probes: usize,
        modules: &ProcessModules,
    ) -> Result<Agent, SessionError> {
        let (fns, earlier) =
            timings::time("libc functions", || libc_and_earlier_agent(proc, modules))?;
        // Started on its own first, so that what follows is timed apart from it.
        timings::time("agent thread", || {
            crate::agent_thread::ensure(proc, &fns, inject::DLOPEN_TIMEOUT)
        })?;
        let base = match earlier {
            Some(base) => base,
            None => timings::time("agent load (dlopen)", || load_agent(proc, &fns))?,
        };
        let info = match earlier.map(|base| initialised_info(proc, base)) {
            Some(Ok(Some(info))) => info,
            _ => init_agent(proc, &fns, base, probes)?,
        };
        Ok(Agent {
            fns,
            base,
            reused: earlier.is_some(),
            info,
            prepare: base + agent_symbol(PREPARE_SYMBOL)?,
            resolve: base + agent_symbol(RESOLVE_SYMBOL)?,
            internal: base + agent_symbol(INTERNAL_SYMBOL)?,
            live: base + agent_symbol(LIVE_SYMBOL)?,
            prepare_live: base + agent_symbol(PREPARE_LIVE_SYMBOL)?,
        })
    }

    /// Prepares `requests` (see [`prepare_remote`]) and returns with the results the
    /// patches a killed tracer left in the code, which this session takes over. An agent
    /// loaded just now has none; a reused one lists them in the same remote call.
    pub fn prepare_adopting(
        &self,
        proc: &mut Process,
        requests: &[PrepareRequest],
    ) -> Result<(Vec<PrepareResult>, Vec<PrepareResult>), SessionError> {
        if !self.reused {
            return Ok((
                prepare_remote(proc, &self.fns, self.prepare, requests)?,
                Vec::new(),
            ));
        }
        let (live, mut results) = call_with_buffers(
            proc,
            &self.fns,
            self.prepare_live,
            pod::bytes_of_slice(requests),
            requests.len() as u64,
            (LIVE_CAP_WITH_PREPARE + requests.len()) * size_of::<PrepareResult>(),
        )
        .map(|(live, bytes)| (live as usize, pod::vec_from_bytes::<PrepareResult>(&bytes)))?;
        let mut adopted: Vec<PrepareResult> = results.drain(..LIVE_CAP_WITH_PREPARE).collect();
        if live > LIVE_CAP_WITH_PREPARE {
            // Preparing patched nothing: the list is the same as before it.
            adopted = live_probes(proc, &self.fns, self.live)?;
        } else {
            adopted.truncate(live);
        }
        Ok((results, adopted))
    }
}

/// Calls the agent's init with room for `probes` probes; its description.
fn init_agent(
    proc: &mut Process,
    fns: &LibcFunctions,
    base: u64,
    probes: usize,
) -> Result<AgentInfo, SessionError> {
    let init = base + agent_symbol(INIT_SYMBOL)?;
    let capacity = (probes as u64 + 64).next_power_of_two().max(1024);
    let info_addr = timings::time("agent init", || {
        inject::call_safely(proc, fns, init, &[capacity], TIMEOUT)
    })?;
    if info_addr == 0 {
        return Err(SessionError::Agent("initialisation failed".into()));
    }
    let info: AgentInfo = read_pod(proc, info_addr)?;
    if info.magic != AGENT_MAGIC {
        return Err(SessionError::Agent(
            "initialisation returned garbage".into(),
        ));
    }
    Ok(info)
}

/// The description an earlier session's init left in the agent at `base`, read from its
/// memory: a later init would only return it again (the interceptor exists; capacity
/// grows when preparing needs more), so a later attach makes no remote call for it.
/// None when that init never completed.
fn initialised_info(proc: &Process, base: u64) -> Result<Option<AgentInfo>, SessionError> {
    let addr = base + agent_symbol(INFO_SYMBOL)?;
    let info: AgentInfo = timings::time("agent info read", || read_pod(proc, addr))?;
    Ok((info.magic == AGENT_MAGIC && info.shared_fd >= 0).then_some(info))
}

pub(super) const TIMEOUT: Duration = Duration::from_secs(20);

/// Load address of an agent an earlier session left in the target, if any.
pub(crate) fn loaded_agent(pid: i32) -> Option<u64> {
    agent_in(&agent::maps::read_pid(pid).ok()?)
}

/// Load address of an agent among the maps `entries`, if any.
fn agent_in(entries: &[agent::maps::MapEntry]) -> Option<u64> {
    entries
        .iter()
        .filter(|m| library_file::is_agent(&m.path) && m.offset == 0)
        .map(|m| m.start)
        .min()
}

/// Offset of an exported function in the embedded agent (linked at address 0).
pub(crate) fn agent_symbol(name: &str) -> Result<u64, SessionError> {
    // Parsed once per tracer: an attach asks for six or more of them.
    static EXPORTS: std::sync::OnceLock<Result<Vec<(String, u64)>, String>> =
        std::sync::OnceLock::new();
    let exports = EXPORTS.get_or_init(|| {
        use object::{Object, ObjectSymbol};
        let file = object::File::parse(agent_so()).map_err(|e| e.to_string())?;
        Ok(file
            .dynamic_symbols()
            .filter(|s| s.is_definition())
            .filter_map(|s| Some((s.name().ok()?.to_string(), s.address())))
            .collect())
    });
    let exports = exports
        .as_ref()
        .map_err(|e| SessionError::Agent(format!("embedded agent unreadable: {e}")))?;
    exports
        .iter()
        .find(|(n, _)| n == name)
        .map(|&(_, a)| a)
        .ok_or_else(|| SessionError::Agent(format!("embedded agent lacks {name}")))
}

pub(super) fn read_pod<T: Pod>(proc: &Process, addr: u64) -> Result<T, SessionError> {
    let mut buf = vec![0u8; size_of::<T>()];
    proc.read_memory(addr, &mut buf)
        .map_err(super::agent_io("cannot read agent memory"))?;
    Ok(pod::from_bytes(&buf).expect("a buffer of the record's size"))
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
            .map_err(super::agent_io("cannot write to the target"))?;
        let ret = inject::call_safely(proc, fns, function, &[buf, n, out], TIMEOUT)?;
        let mut bytes = vec![0u8; out_len];
        proc.read_memory(out, &mut bytes)
            .map_err(super::agent_io("cannot read from the target"))?;
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
pub(super) fn load_pack(
    proc: &mut Process,
    fns: &LibcFunctions,
    agent_base: u64,
    pack: &crate::pack::load::Pack,
    swap: bool,
) -> Result<(probes::abi::remote::PackLoadResult, Vec<u64>), SessionError> {
    use probes::abi::remote::{PackLoadRequest, PackLoadResult, PackSymbol};
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
    let mut input = pod::bytes_of(&head).to_vec();
    input.extend_from_slice(pod::bytes_of_slice(&syms));
    let out_len = size_of::<PackLoadResult>() + 8 * info.probes.len();
    let function = agent_base + agent_symbol(probes::abi::remote::LOAD_PACK_SYMBOL)?;
    let (ok, bytes) = call_with_buffers(proc, fns, function, &input, 1, out_len)?;
    let res: PackLoadResult = pod::from_bytes(&bytes).expect("room for one result");
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
pub(super) fn prepare_remote(
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
        pod::bytes_of_slice(requests),
        requests.len() as u64,
        res_len,
    )?;
    Ok(pod::vec_from_bytes(&bytes))
}

/// The agent's own probes, to patch along with exit probes.
pub(super) fn internal_probes(
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
    let mut results: Vec<PrepareResult> = pod::vec_from_bytes(&bytes);
    results.truncate((count as usize).min(cap));
    Ok((count as usize, results))
}

/// Where the target's loader resolved each IFUNC (0 when it did not), in one remote call.
pub(super) fn resolve_ifuncs(
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

/// Have the agent make its latency region, with a slot for every probe id installed
/// (ids are known once prepared), and map it.
pub(super) fn open_latency(
    proc: &mut Process,
    fns: &LibcFunctions,
    base: u64,
    installed: &[super::Installed],
) -> Result<crate::builtin::latency::LatencyRegion, SessionError> {
    let slots = installed.iter().map(|p| p.id as u64 + 1).max().unwrap_or(1);
    let f = base + agent_symbol(probes::latency::REGION_SYMBOL)?;
    let at = inject::call_safely(proc, fns, f, &[slots], TIMEOUT)?;
    if at == 0 {
        return Err(SessionError::Agent(
            "the agent could not create its latency region".into(),
        ));
    }
    let info: probes::latency::LatencyInfo = read_pod(proc, at)?;
    crate::builtin::latency::LatencyRegion::open(proc.pid(), &info).map_err(SessionError::Latency)
}

/// libc's functions in the target, and the base of an agent an earlier session left
/// loaded, from the maps the modules were read from (the process has stayed stopped
/// since), or from one read (75 to 100 us a read).
fn libc_and_earlier_agent(
    proc: &mut Process,
    modules: &ProcessModules,
) -> Result<(LibcFunctions, Option<u64>), inject::InjectError> {
    let pid = proc.pid();
    let read;
    let (dir, entries) = match modules.maps_of(pid) {
        Some(m) => m,
        None => {
            let dir = crate::process_kind::proc_dir(pid);
            let entries = agent::maps::read_path(&format!("{dir}/maps"))
                .map_err(|error| inject::InjectError::Maps { pid, error })?;
            read = (dir, entries);
            (read.0.as_str(), read.1.as_slice())
        }
    };
    crate::agent_thread::note_page(proc, entries);
    let fns = inject::libc_functions_in(pid, dir, entries)?;
    // An agent left by an earlier session stays loaded (its trampolines may still be in
    // use): reuse it rather than load another copy, each of which would take more of the
    // target's static TLS.
    Ok((fns, agent_in(entries)))
}

/// Place the embedded agent's file and `dlopen` it in the target: its base.
fn load_agent(proc: &mut Process, fns: &LibcFunctions) -> Result<u64, inject::InjectError> {
    Ok(inject::inject_with(
        proc,
        fns,
        agent_so(),
        library_file::AGENT_NAME,
        Some(crate::agent_blob::agent_hash()),
        inject::DLOPEN_TIMEOUT,
    )?
    .base)
}
